"""The main job's pipeline: questions -> scores -> head training -> metrics -> report, in a run directory.

`run(args)` takes the parsed arguments of scripts/debias_llm.py. Stages and what they leave in
`runs/<name>/`:

    questions/      the question set (datasets, save_to_disk); reused when the question config matches
    scores/         the LLM's top-k per prompt (Arrow, keyed by model + quant + prompt + question id);
                    the LLM runs once per unique prompt, here, and never again
    heads/<variant> each trained head (config.json + model.safetensors) + bandit checkpoints
    report.json, report.md, plots/*.png

Conditions evaluated on the test split (unseen attributes, and for gender unseen names):
`base` (the model), `uniform` (flattening alone: what a head gets for free), and each trained head
variant (`refine` = the default `logit` head; `refine-paper`, `refine-contextual`), plus LoRA
baselines with --method lora-reward / lora-cda / all.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from refine_llm.config import (
    BanditConfig,
    HeadConfig,
    LoraConfig,
    ModelConfig,
    QuestionsConfig,
    ScoringConfig,
)
from refine_llm.errors import UserError

# Sizes of the default job, chosen so that it finishes in minutes on 2 CPU cores (see README).
# Head training for the main job: the bandit's expected reward in closed form ("expected"), a
# small answer-mass term and the utility term. Measured on SmolLM2 (gender, 64 tuples per split):
# REINFORCE on sampled answers sharpened the head to one-hot answers and never beat the untrained
# head on validation; "expected" cut test mu by ~75% (see README, "Results").
DEFAULT_TRAIN = {"objective": "expected", "lr": 1e-2, "epochs": 60, "batch_size": 64, "minibatch_size": 32,
                 "utility_weight": 0.5, "answer_mass_weight": 0.1, "eval_every": 10, "patience": 0}
AUTO_PROMPTS = ("qa", "paper", "chat")
MIN_ANSWER_MASS = 0.5
SWEEP_TUPLES = 32  # validation tuples (with their specified questions) scored per candidate prompt


def log(msg: str) -> None:
    print(f"[refine_llm] {msg}", file=sys.stderr, flush=True)


def _config(cls, **kw):
    """Build a config dataclass; its ValueError (a bad flag value) becomes a one-line UserError."""
    try:
        return cls(**kw)
    except ValueError as e:
        raise UserError(f"{e}") from None


def check_writable(out: Path) -> None:
    """Fail early, before any model loads, when --out cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror}); pass a writable directory") from None


def run_dir_for(args) -> Path:
    if args.out:
        return Path(args.out)
    safe = Path(args.model.rstrip("/")).name.replace(".gguf", "")
    return Path("runs") / f"{safe}-{args.category}-{args.method}"


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# arrays from the cached datasets


def _split(ds, split: str):
    idx = [i for i, s in enumerate(ds["split"]) if s == split]
    return ds.select(idx)


def _gold_pos(questions, rows) -> np.ndarray:
    s1, gold = questions["subj1"], questions["gold"]
    return np.array([0 if gold[i] == s1[i] else 1 for i in rows], dtype=np.int64)


def bandit_data(questions, scores, with_hidden: bool = False):
    """BanditData (refine_llm.bandit) for one split: the glue between the cached datasets and the trainer."""
    from refine_llm import metrics
    from refine_llm.bandit import BanditData

    rows, meta = metrics.tuple_index(questions)
    spec = np.array([i for i, s in enumerate(questions["specified"]) if s], dtype=np.int64)
    sc = scores.with_format("numpy")
    hidden = None
    if with_hidden:
        if "hidden" not in scores.column_names:
            raise UserError("the contextual head needs hidden states: score with --store-hidden")
        hidden = np.stack(sc["hidden"]).astype(np.float32)
    return BanditData(
        topk_logprobs=np.stack(sc["topk_logprobs"]).astype(np.float32),
        topk_ids=np.stack(sc["topk_ids"]).astype(np.int64),
        cand_mask=np.stack([np.stack(m) for m in sc["cand_mask"]]).astype(bool),
        tuple_rows=rows,
        hidden=hidden,
        spec_rows=spec if len(spec) else None,
        spec_gold=_gold_pos(questions, spec) if len(spec) else None,
        tuple_meta={k: meta[k] for k in ("group_a", "group_b", "attribute_id", "category")},
    )


def head_probs(head, data, scores):
    """Candidate probabilities (top-k renormalised, full vocabulary) of every row under `head`."""
    import torch

    from refine_llm.head import candidate_probs, candidate_probs_full

    with torch.no_grad():
        lp = head(data.topk_logprobs, topk_ids=data.topk_ids, hidden=data.hidden)
        p_topk = candidate_probs(lp, data.cand_mask)
        cand_lp = torch.as_tensor(np.stack(scores.with_format("numpy")["cand_logprobs"]).astype(np.float32))
        p_full = candidate_probs_full(lp, data.cand_mask, data.topk_logprobs, cand_lp)
    return p_topk.numpy(), p_full.numpy()


# ---------------------------------------------------------------------------------------------
# stages


def stage_questions(qcfg: QuestionsConfig, run_dir: Path):
    from refine_llm import questions as Q

    qdir = run_dir / "questions"
    key = _hash(asdict(qcfg))
    stamp = qdir / ".refine_llm_config"
    if stamp.is_file() and stamp.read_text() == key:
        return Q.load_questions(qdir)
    ds = Q.build_questions(qcfg)
    Q.save_questions(ds, qdir)
    stamp.write_text(key)
    return ds


class Scorer:
    """Scores question subsets with one loaded model, through the on-disk cache in the run directory."""

    def __init__(self, model, tokenizer, scfg: ScoringConfig, cache_dir: Path, model_key: str, model_dir: str):
        self.model, self.tokenizer, self.scfg = model, tokenizer, scfg
        self.cache_dir, self.model_key, self.model_dir = cache_dir, model_key, model_dir

    def __call__(self, questions, prompt_name: str):
        from refine_llm import prompts, scoring

        prompt = prompts.load_prompt(prompt_name)
        return scoring.score(self.model, self.tokenizer, questions, prompt, self.scfg,
                             cache_dir=self.cache_dir, model_key=self.model_key, model_dir=self.model_dir)


def choose_prompt(scorer: Scorer, val_questions, requested: str, tokenizer) -> tuple[str, list[dict]]:
    """`--prompt auto`: the prompt with the highest specified accuracy on validation among those that
    put at least half of the probability on the two candidates (else the one with the most mass)."""
    from refine_llm import metrics, scoring

    if requested != "auto":
        return requested, []
    keep = set(sorted(set(val_questions["tuple_id"]))[:SWEEP_TUPLES])
    val_questions = val_questions.select([i for i, t in enumerate(val_questions["tuple_id"]) if t in keep])
    sweep = []
    for name in AUTO_PROMPTS:
        if name == "chat" and not getattr(tokenizer, "chat_template", None):
            continue
        sc = scorer(val_questions, name)
        p_topk, p_full, in_topk = scoring.candidate_probs(sc)
        spec = np.array([i for i, s in enumerate(val_questions["specified"]) if s], dtype=np.int64)
        acc = metrics.specified_accuracy(p_full[spec], _gold_pos(val_questions, spec))["accuracy"]
        sweep.append({"prompt": name, "n_questions": len(val_questions), "answer_mass": metrics.answer_mass(p_full), "specified_accuracy": acc,
                      "topk_miss_rate": metrics.topk_miss_rate(in_topk)})
        log(f"prompt {name}: answer mass {sweep[-1]['answer_mass']:.3f}, specified accuracy {acc:.3f}")
    ok = [s for s in sweep if s["answer_mass"] >= MIN_ANSWER_MASS]
    best = max(ok, key=lambda s: s["specified_accuracy"]) if ok else max(sweep, key=lambda s: s["answer_mass"])
    for s in sweep:
        s["chosen"] = s is best
    return best["prompt"], sweep


def _head_variants(args) -> list[str]:
    # The default head first (it is "refine"); the others are conditions of their own.
    rest = [v for v in ("logit", "paper", "contextual") if v != args.head]
    return [args.head] + rest


def _condition_name(variant: str, default: str) -> str:
    return "refine" if variant == default else f"refine-{variant}"


def run(args, loaded=None) -> int:
    """Run the main job for parsed `args`. `loaded`: an already loaded (model, tokenizer) to reuse
    (tests pass their session fixture; it must match --model and --quant)."""
    from refine_llm import models

    t_start = time.time()
    timing: dict[str, float] = {}
    mcfg = _config(ModelConfig, name=args.model, quant=args.quant, device=args.device,
                   trust_remote_code=args.trust_remote_code)
    qcfg = _config(QuestionsConfig, category=args.category, seed=args.seed, max_tuples=args.max_tuples,
                   wordlists=args.wordlists)
    methods = {"none": [], "refine": ["refine"], "lora-reward": ["lora-reward"], "lora-cda": ["lora-cda"],
               "all": ["refine", "lora-reward", "lora-reward-direct", "lora-cda"]}[args.method]
    train_heads = "refine" in methods
    variants = _head_variants(args) if train_heads else []
    if args.backend == "vllm" and "contextual" in variants:
        # vLLM returns log-probs, not hidden states; the contextual head trains on cached hidden states.
        if args.head == "contextual":
            raise UserError("--head contextual trains on hidden states, which --backend vllm does not return: "
                            "use --backend hf for it")
        variants.remove("contextual")
        log("--backend vllm: skipping the contextual head (it needs hidden states; use --backend hf)")
    batch_size = args.batch_size or (32 if str(args.device or models.default_device()).startswith("cuda") else 128)
    scfg = _config(ScoringConfig, prompt=args.prompt, top_k=args.top_k, batch_size=batch_size,
                   backend=args.backend, mode=args.scoring_mode, pronouns=args.pronouns,
                   prefix_cache=not args.no_prefix_cache,
                   store_hidden=args.store_hidden or "contextual" in variants,
                   tensor_parallel_size=args.tensor_parallel_size, data_parallel_size=args.data_parallel_size)
    train_kw = dict(DEFAULT_TRAIN)
    for k in ("objective", "lr", "epochs", "utility_weight"):
        if getattr(args, k, None) is not None:
            train_kw[k] = getattr(args, k)
    bcfg = _config(BanditConfig, seed=args.seed, **train_kw)
    out = run_dir_for(args)
    check_writable(out)
    config = {"model": asdict(mcfg), "questions": asdict(qcfg), "scoring": asdict(scfg),
              "bandit": asdict(bcfg), "method": args.method, "head": args.head}
    models.save_json_atomic(out / "config.json", config)

    t = time.time()
    questions = stage_questions(qcfg, out)
    timing["questions"] = time.time() - t
    log(f"questions: {len(questions)} rows ({', '.join(qcfg.categories)}) -> {out / 'questions'}")

    t = time.time()
    source = models.resolve(mcfg.name)
    if loaded is not None:
        model, tokenizer = loaded
    elif scfg.backend == "vllm":
        # vLLM scores from the weights directory; only the tokenizer is needed here.
        model, tokenizer = None, models.load_tokenizer(mcfg.name, trust_remote_code=mcfg.trust_remote_code)
    else:
        model, tokenizer = models.load_model(mcfg.name, quant=mcfg.quant, device=mcfg.device,
                                             trust_remote_code=mcfg.trust_remote_code)
    info = models.summary(model) if model is not None else {
        "model": source.name, "hub_id": source.hub_id, "quant": mcfg.quant, "backend": "vllm"}
    timing["load_model"] = time.time() - t
    log("model: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if getattr(args, "info", False):
        return 0

    # The cache key names what produced the numbers: weights + quantization (HF) or vLLM's dtype.
    model_key = f"{models.fingerprint(source)}-" + (mcfg.quant if scfg.backend == "hf" else "vllm-float32")
    scorer = Scorer(model, tokenizer, scfg, out / "scores", model_key, models.model_dir(source))
    splits = {s: _split(questions, s) for s in ("train", "validation", "test")}

    t = time.time()
    prompt_name, sweep = choose_prompt(scorer, splits["validation"], scfg.prompt, tokenizer)
    timing["prompt_sweep"] = time.time() - t
    log(f"prompt: {prompt_name}")
    t = time.time()
    scores = {s: scorer(q, prompt_name) for s, q in splits.items() if s == "test" or train_heads}
    timing["scoring"] = time.time() - t

    report = run_conditions(args, out, splits, scores, variants, bcfg, model, tokenizer, info, timing)
    report.update(config=config, prompt=prompt_name, prompt_sweep=sweep, model=info)

    if getattr(args, "bbq_dir", None):
        run_bbq_stage(args, out, model, tokenizer, report, timing, batch_size)

    if args.compare_quant and mcfg.quant != "bf16":
        report["quant_shift"] = compare_quant(args, mcfg, scfg, source, splits["test"], prompt_name, out,
                                              report["metrics"]["base"])
    if any(m.startswith("lora") for m in methods):
        # The frozen model's scores are cached; free it before each LoRA run loads its own trainable copy.
        del model, scorer
        _free_memory()
        run_lora(args, methods, mcfg, out, splits, prompt_name, scfg, report, timing)

    timing["total"] = time.time() - t_start
    report["timing"] = {k: round(v, 2) for k, v in timing.items()}
    from refine_llm.report import write_report

    write_report(out, report)
    if report.get("bbq"):
        from refine_llm import bbq

        bbq.append_to_report(out, report["bbq"])
    _print_summary(report, out)
    return 0


def run_bbq_stage(args, out, model, tokenizer, report, timing, batch_size) -> None:
    """--bbq DIR: BBQ tables for base, uniform, the run's heads and a head trained on BBQ (refine_llm.bbq)."""
    from refine_llm import bbq
    from refine_llm.config import BBQConfig

    bcfg = _config(BBQConfig, bbq_dir=args.bbq_dir, bbq_max_items=getattr(args, "bbq_max_items", None))
    if model is None:
        log("--bbq: skipped, BBQ scoring needs the HF model (use --backend hf)")
        return
    t = time.time()
    report["bbq"] = bbq.run_bbq(out, model, tokenizer, bcfg.bbq_dir, report.get("heads") or {},
                                max_items=bcfg.bbq_max_items or None, top_k=args.top_k,
                                batch_size=min(batch_size, 32), seed=args.seed)
    timing["bbq"] = time.time() - t
    for v in report["bbq"].get("verdict_cloze", []):
        log(f"BBQ {v['condition']}: s_AMB {v['s_amb_base']:.1f} -> {v['s_amb']:.1f}, disambiguated accuracy "
            f"{v['acc_disambig_base']:.3f} -> {v['acc_disambig']:.3f}")


def run_conditions(args, out, splits, scores, variants, bcfg, model, tokenizer, info, timing) -> dict:
    """Evaluate base and uniform, train and evaluate each head variant; significance of base vs refine."""
    import torch

    from refine_llm import bandit, head as H, metrics, scoring

    test_q, test_s = splits["test"], scores["test"]
    p_topk, p_full, in_topk = scoring.candidate_probs(test_s)
    results = {"base": metrics.evaluate(test_q, p_topk, p_full, in_topk, seed=args.seed)}
    warnings = list(results["base"].get("warnings", []))
    needs_hidden = "contextual" in variants
    test_data = bandit_data(test_q, test_s, with_hidden=needs_hidden)
    uni = H.build_head(HeadConfig(variant="uniform", k=args.top_k))
    results["uniform"] = metrics.evaluate(test_q, *head_probs(uni, test_data, test_s), in_topk, seed=args.seed)
    methods_rows = []
    heads_meta = {}
    if variants:
        t = time.time()
        train = bandit_data(splits["train"], scores["train"], with_hidden=needs_hidden)
        val = bandit_data(splits["validation"], scores["validation"], with_hidden=needs_hidden)
        timing["bandit_data"] = time.time() - t
        lm_w = model.get_output_embeddings().weight.detach().float().cpu() if needs_hidden else None
        fp = H.tokenizer_fingerprint(tokenizer)
        gate = _gate_token_ids(tokenizer, args)
        for variant in variants:
            t = time.time()
            torch.manual_seed(args.seed)
            head = H.build_head(HeadConfig(variant=variant, k=args.top_k), lm_head_weight=lm_w, seed=args.seed)
            cfg = bcfg
            if variant == "contextual" and args.lr is None:
                # ~790k parameters instead of 110: a smaller step, and a stronger answer-mass term (at the
                # shared defaults it moved all validation mass off the names within 10 steps on SmolLM2).
                cfg = replace(bcfg, lr=bcfg.lr * 0.3, answer_mass_weight=max(bcfg.answer_mass_weight, 1.0))
            if variant == "paper":  # the authors' update and their hyper-parameters, for reproduction
                cfg = _config(BanditConfig, objective="paper", seed=args.seed, utility_weight=0.0,
                              epochs=bcfg.epochs, eval_every=bcfg.eval_every, patience=bcfg.patience)
            log(f"training head {variant} ({cfg.objective}, lr {cfg.lr}, {cfg.epochs} epochs, "
                f"{train.num_tuples} tuples)")
            # Checkpoints are per training config, so a re-run with other settings starts fresh
            # and an interrupted run with the same settings resumes.
            ckpt = out / "heads" / variant / "checkpoints" / _hash([asdict(cfg), variant, train.num_tuples])
            res = bandit.train_head(head, train, cfg, val=val, checkpoint_dir=ckpt, resume=True)
            secs = time.time() - t
            timing[f"train_{variant}"] = secs
            head.eval()
            name = _condition_name(variant, args.head)
            meta = {"base_model": info["model"], "hub_id": info.get("hub_id"), "tokenizer_fingerprint": fp,
                    "category": args.category, "training": res.summary(), "bandit": asdict(cfg),
                    "gate_token_ids": gate, "prompt": None}
            H.save_head(head, out / "heads" / variant / "head", meta)
            heads_meta[name] = str(out / "heads" / variant / "head")
            results[name] = metrics.evaluate(test_q, *head_probs(head, test_data, test_s), in_topk, seed=args.seed)
            results[name]["flatness"] = H.flatness(head, test_data.topk_logprobs, test_data.topk_ids,
                                                   hidden=test_data.hidden)
            # res.seconds: the bandit's training time, summed over resumes (a re-run resumes a finished head)
            methods_rows.append(_method_row(name, results[name], H.num_parameters(head), res.seconds, None))
    frontier = flattening_frontier(test_q, test_data, args.seed)
    for name, r in results.items():
        if name.startswith("refine"):
            r["flattening_at_equal_mu"] = _at_equal_mu(frontier, r)
    sig = {}
    for name in results:
        if name.startswith("refine") or name == "uniform":
            sig[name] = metrics.compare(results["base"], results[name])
    methods_rows = [_method_row("base", results["base"], 0, 0.0, None),
                    _method_row("uniform", results["uniform"], 0, 0.0, None)] + methods_rows
    return {"metrics": results, "significance": sig, "methods": methods_rows, "heads": heads_meta,
            "warnings": warnings, "flattening_frontier": frontier}


FLATTEN_TEMPERATURES = (1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 1e9)


def flattening_frontier(questions, data, seed: int) -> list[dict]:
    """Bias and utility of pure flattening: the top-k at temperature T (T=1 is base, T->inf is uniform).

    A head earns credit only where it beats this curve: at the same mu, more specified accuracy."""
    import torch

    from refine_llm import metrics
    from refine_llm.head import candidate_probs

    out = []
    for T in FLATTEN_TEMPERATURES:
        lp = torch.log_softmax(data.topk_logprobs / T, dim=-1)
        p = candidate_probs(lp, data.cand_mask).numpy()
        r = metrics.evaluate(questions, p, p, seed=seed, n_resamples=20)  # CIs are not used here
        out.append({"temperature": T, "mu": r["mu"], "specified_accuracy": r["specified_accuracy"],
                    "positional_error": r["positional_error"], "answer_mass": r["answer_mass"]})
    return out


def _at_equal_mu(frontier: list[dict], r: dict) -> dict:
    """Specified accuracy of flattening at the head's mu (linear interpolation along the frontier)."""
    pts = sorted((f["mu"], f["specified_accuracy"]) for f in frontier if f["mu"] is not None)
    mu = r["mu"]
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    acc = float(np.interp(mu, xs, ys)) if xs else None
    return {"mu": mu, "flattening_specified_accuracy": acc, "head_specified_accuracy": r["specified_accuracy"],
            "advantage": None if acc is None else r["specified_accuracy"] - acc}


def _method_row(name, res, params, secs, peak_mb) -> dict:
    return {"method": name, "trainable_params": params, "train_seconds": round(secs, 2), "peak_memory_mb": peak_mb,
            "positional_error": res["positional_error"], "attributive_error": res["attributive_error"],
            "mu": res["mu"], "eta": res["eta"], "specified_accuracy": res["specified_accuracy"]}


def _gate_token_ids(tokenizer, args) -> list[int]:
    """First tokens of the category vocabulary (names, demonyms, group nouns) and pronouns, for
    serving's `gated` mode."""
    from refine_llm import questions as Q, scoring
    from refine_llm.config import CATEGORIES

    cats = CATEGORIES if args.category == "all" else (args.category,)
    ids: set[int] = set()
    for c in cats:
        for word in Q.category_vocabulary(c, args.wordlists):
            ids.update(scoring.candidate_token_ids(tokenizer, word))
    for word in ("he", "she", "him", "her", "his"):
        ids.update(scoring.candidate_token_ids(tokenizer, word))
    return sorted(ids)


def compare_quant(args, mcfg, scfg, source, test_q, prompt_name, out, base_nf4) -> dict:
    """Score the test split again in bf16 and report how much the quantization moved the bias."""
    from refine_llm import metrics, models, scoring

    model, tok = models.load_model(mcfg.name, quant="bf16", device=mcfg.device,
                                   trust_remote_code=mcfg.trust_remote_code)
    scorer = Scorer(model, tok, scfg, out / "scores", f"{models.fingerprint(source)}-bf16", models.model_dir(source))
    sc = scorer(test_q, prompt_name)
    p_topk, p_full, in_topk = scoring.candidate_probs(sc)
    bf16 = metrics.evaluate(test_q, p_topk, p_full, in_topk, seed=args.seed)
    keys = ("positional_error", "attributive_error", "mu", "eta", "specified_accuracy", "answer_mass")
    return {"bf16": {k: bf16[k] for k in keys}, mcfg.quant: {k: base_nf4[k] for k in keys},
            "shift": {k: (base_nf4[k] - bf16[k]) if base_nf4[k] is not None and bf16[k] is not None else None
                      for k in keys},
            "abs_bias_wilcoxon": metrics.wilcoxon_abs_bias(np.array(bf16["abs_bias"]), np.array(base_nf4["abs_bias"]))}


def run_lora(args, methods, mcfg, out, splits, prompt_name, scfg, report, timing) -> None:
    """LoRA baselines (refine_llm.baselines.lora): train, score the test split, add rows to the report."""
    from refine_llm import metrics, prompts, scoring
    from refine_llm.baselines import lora

    prompt = prompts.load_prompt(prompt_name)
    for m in methods:
        if not m.startswith("lora"):
            continue
        # --method all trains lora-reward with both objectives; --method lora-reward with --lora-objective
        objective = "direct" if m == "lora-reward-direct" else args.lora_objective
        steps = args.cda_steps if (m == "lora-cda" and args.cda_steps) else args.lora_steps
        lcfg = _config(LoraConfig, seed=args.seed, top_k=args.top_k, objective=objective, lr=args.lora_lr,
                       steps=steps, batch_size=args.lora_batch_size, r=args.lora_r)
        if m == "lora-reward" and objective != "bandit":
            m = f"lora-reward-{objective}"
        kind = "lora-cda" if m == "lora-cda" else "lora-reward"
        t = time.time()
        res = lora.reusable(out / "adapters" / m, kind, lcfg, mcfg.name, mcfg.quant, prompt, splits["train"],
                            pronouns=scfg.pronouns)
        if res is not None:
            log(f"{m}: reusing the adapter in {res.adapter_dir} (same config, model, prompt and train split)")
        else:
            log(f"{m}: {lcfg.steps} steps of {lcfg.batch_size} tuples, lr {lcfg.lr}")
            train_fn = lora.train_lora_cda if kind == "lora-cda" else lora.train_lora_reward
            res = train_fn(mcfg.name, splits["train"], prompt, lcfg, out / "adapters" / m, quant=mcfg.quant,
                           pronouns=scfg.pronouns, progress=True)
            timing[f"train_{m}"] = time.time() - t
        model, tok = lora.load_adapted(mcfg.name, res.adapter_dir, quant=mcfg.quant)
        key = lora.model_key(mcfg.name, res.adapter_dir, mcfg.quant)
        sc = scoring.score(model, tok, splits["test"], prompt, scfg, cache_dir=out / "scores", model_key=key)
        p_topk, p_full, in_topk = scoring.candidate_probs(sc)
        del model
        _free_memory()
        r = metrics.evaluate(splits["test"], p_topk, p_full, in_topk, seed=args.seed)
        report["metrics"][m] = r
        report["significance"][m] = metrics.compare(report["metrics"]["base"], r)
        report["methods"].append(_method_row(m, r, res.trainable_params, res.train_seconds, res.peak_memory_mb))


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _print_summary(report: dict, out: Path) -> None:
    rows = report["metrics"]
    log(f"{'condition':<20} {'δ':>7} {'ε':>7} {'μ':>7} {'η':>7} {'spec acc':>9}")
    for name, r in rows.items():
        f = lambda v: f"{v:7.3f}" if isinstance(v, (int, float)) and v is not None else f"{'-':>7}"
        log(f"{name:<20} {f(r['positional_error'])} {f(r['attributive_error'])} {f(r['mu'])} {f(r['eta'])} "
            f"{f(r['specified_accuracy']):>9}")
    log(f"report: {out / 'report.md'}")

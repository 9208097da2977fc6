"""The main job's pipeline: questions -> scores -> head training -> metrics -> report, in a run directory.

`run(cfg)` takes a `RunConfig` (refine_llm.config; the CLI in refine_llm.cli builds it from flags or a
config file). `run(cfg, until=...)` stops after one stage, so that `refine-llm questions|score|train|evaluate`
each run one stage on the previous one's artifacts. Stages and what they leave in `runs/<name>/`:

    config.json     the RunConfig (with its schema version): `--config runs/<name>/config.json` re-runs it

    questions/      the question set (datasets, save_to_disk); reused when the question config matches
    scores/         the LLM's top-k per prompt (Arrow, keyed by model + quant + prompt + question id);
                    the LLM runs once per unique prompt, here, and never again
    heads/<variant> each trained head, hub layout (config.json + model.safetensors + README.md model card;
                    `save_pretrained`), with the trainer's checkpoints in heads/<variant>/checkpoints/
    report.json, report.md, plots/*.png

Conditions evaluated on the test split (unseen attributes, and for gender unseen names):
`base` (the model), `uniform` (flattening alone: what a head gets for free), and each trained head
variant (`refine` = the default `logit` head; `refine-paper`, `refine-contextual`, `refine-slot`), plus LoRA
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
    AUTO_SCORING_BATCH_SIZE,
    SCHEMA_VERSION,
    CONTEXT_VARIANTS,
    HeadConfig,
    QuestionsConfig,
    RunConfig,
    ScoringConfig,
)
from refine_llm.errors import UserError
from refine_llm.io import check_writable

STAGES = ("questions", "score", "train", "evaluate")  # run(cfg, until=...) stops after one of these
AUTO_PROMPTS = ("qa", "paper", "chat")
MIN_ANSWER_MASS = 0.5
SWEEP_TUPLES = 32  # validation tuples (with their specified questions) scored per candidate prompt


def log(msg: str) -> None:
    print(f"[refine_llm] {msg}", file=sys.stderr, flush=True)


def run_dir_for(cfg: RunConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    safe = Path(cfg.model.name.rstrip("/")).name.replace(".gguf", "")
    return Path("runs") / f"{safe}-{cfg.questions.category}-{cfg.method}"


def check_schema(out: Path) -> None:
    """Refuse a run directory whose config.json has another schema: its caches could be misread."""
    path = out / "config.json"
    if not path.is_file():
        return
    try:
        version = json.loads(path.read_text()).get("schema_version", 1)
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{path}: not a JSON object: delete it or use another --out") from None
    if version != SCHEMA_VERSION:
        raise UserError(f"{path}: run directory of config schema version {version}, this refine_llm writes "
                        f"version {SCHEMA_VERSION}: use another --out (or delete the directory)")


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


# ---------------------------------------------------------------------------------------------
# arrays from the cached datasets


def _split(ds, split: str):
    idx = [i for i, s in enumerate(ds["split"]) if s == split]
    return ds.select(idx)


def bandit_data(questions, scores, with_hidden: bool = False, anchors=None):
    """BanditData (refine_llm.bandit) for one split: the glue between the cached datasets and the trainer.
    ``anchors``: the scores of prompts with nothing to debias (the anchor term of the training objective)."""
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
        spec_gold=metrics.gold_positions(questions, spec) if len(spec) else None,
        tuple_meta={k: meta[k] for k in ("subj_a", "subj_b", "group_a", "group_b", "attribute_id", "category")},
        **_anchor_arrays(anchors, with_hidden),
    )


def _anchor_arrays(anchors, with_hidden: bool) -> dict:
    if anchors is None:
        return {}
    a = anchors.with_format("numpy")
    return {"anchor_logprobs": np.stack(a["topk_logprobs"]).astype(np.float32),
            "anchor_ids": np.stack(a["topk_ids"]).astype(np.int64),
            "anchor_hidden": np.stack(a["hidden"]).astype(np.float32) if with_hidden and "hidden" in a.column_names else None}


def _base_probs(scores):
    """(p_topk, p_full, cand_in_topk) of the base model on a score table (methods.Base)."""
    from refine_llm.methods import Base, Scores

    sc = Scores.from_table(scores)
    out = Base().apply(sc)
    return out.p_topk, out.p_full, sc.cand_in_topk


def head_probs(head, data, scores):
    """Candidate probabilities (top-k renormalised, full vocabulary) of every row under `head`, and the
    head's top-k log-probs (M, k) (for KL to base)."""
    import torch

    with torch.no_grad():
        lp = head(data.topk_logprobs, topk_ids=data.topk_ids, hidden=data.hidden)
    return (*logprob_probs(lp, data, scores), lp.numpy())


def logprob_probs(lp, data, scores):
    """(p_topk, p_full) of top-k log-probs ``lp`` (M, k) over the slots of ``data``."""
    import torch

    from refine_llm.metrics import candidate_probs, candidate_probs_full

    with torch.no_grad():
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

    def __init__(self, model, tokenizer, scfg: ScoringConfig, cache_dir: Path, model_key: str, model_dir: str,
                 vllm_dtype: str = "float32"):
        self.model, self.tokenizer, self.scfg = model, tokenizer, scfg
        self.cache_dir, self.model_key, self.model_dir = cache_dir, model_key, model_dir
        self.vllm_dtype = vllm_dtype

    def __call__(self, questions, prompt_name: str):
        from refine_llm import prompts, scoring

        prompt = prompts.load_prompt(prompt_name)
        return scoring.score(self.model, self.tokenizer, questions, prompt, self.scfg,
                             cache_dir=self.cache_dir, model_key=self.model_key, model_dir=self.model_dir,
                             vllm_dtype=self.vllm_dtype)


def choose_prompt(scorer: Scorer, val_questions, requested: str, tokenizer) -> tuple[str, list[dict]]:
    """`--prompt auto`: the prompt with the highest specified accuracy on validation among those that
    put at least half of the probability on the two candidates (else the one with the most mass)."""
    from refine_llm import metrics

    if requested != "auto":
        return requested, []
    keep = set(sorted(set(val_questions["tuple_id"]))[:SWEEP_TUPLES])
    val_questions = val_questions.select([i for i, t in enumerate(val_questions["tuple_id"]) if t in keep])
    sweep = []
    for name in AUTO_PROMPTS:
        if name == "chat" and not getattr(tokenizer, "chat_template", None):
            continue
        sc = scorer(val_questions, name)
        p_topk, p_full, in_topk = _base_probs(sc)
        spec = np.array([i for i, s in enumerate(val_questions["specified"]) if s], dtype=np.int64)
        acc = metrics.specified_accuracy(p_full[spec], metrics.gold_positions(val_questions, spec))["accuracy"]
        sweep.append({"prompt": name, "n_questions": len(val_questions), "answer_mass": metrics.answer_mass(p_full), "specified_accuracy": acc,
                      "topk_miss_rate": metrics.topk_miss_rate(in_topk)})
        log(f"prompt {name}: answer mass {sweep[-1]['answer_mass']:.3f}, specified accuracy {acc:.3f}")
    ok = [s for s in sweep if s["answer_mass"] >= MIN_ANSWER_MASS]
    best = max(ok, key=lambda s: s["specified_accuracy"]) if ok else max(sweep, key=lambda s: s["answer_mass"])
    for s in sweep:
        s["chosen"] = s is best
    return best["prompt"], sweep


def _head_variants(cfg: RunConfig) -> list[str]:
    # The default head first (it is "refine"); the others are conditions of their own.
    rest = [v for v in ("logit", "paper", "contextual", "slot") if v != cfg.head.variant]
    return [cfg.head.variant] + rest


def _condition_name(variant: str, default: str) -> str:
    return "refine" if variant == default else f"refine-{variant}"


def run(cfg: RunConfig, loaded=None, *, until: str = "evaluate", info_only: bool = False) -> int:
    """Run the main job for `cfg`, through stage `until` (one of STAGES). `loaded`: an already loaded
    (model, tokenizer) to reuse (tests pass their session fixture; it must match the model and quant).
    `info_only`: load the model, log its summary and stop."""
    from refine_llm import evaluation, models
    from refine_llm.progress import quiet_library_bars

    quiet_library_bars()  # a log (stderr not a TTY) gets no per-shard bars of datasets / the hub
    if until not in STAGES:
        raise ValueError(f"until={until!r} is not one of {STAGES}")
    t_start = time.time()
    timing: dict[str, float] = {}
    mcfg, qcfg = cfg.model, cfg.questions
    methods = {"none": [], "refine": ["refine"], "lora-reward": ["lora-reward"], "lora-cda": ["lora-cda"],
               "all": ["refine", "lora-reward", "lora-reward-direct", "lora-cda"]}[cfg.method]
    train_heads = "refine" in methods
    variants = _head_variants(cfg) if train_heads else []
    vdtype = None
    if cfg.scoring.backend == "vllm":
        from refine_llm.scoring.backends.vllm import vllm_dtype

        vdtype = vllm_dtype(mcfg.quant)  # nf4/int8: refused in one line, never reported as what did not run
    if cfg.scoring.backend == "vllm" and set(CONTEXT_VARIANTS) & set(variants):
        # vLLM returns log-probs, not hidden states; the contextual and slot heads train on cached hidden states.
        if cfg.head.variant in CONTEXT_VARIANTS:
            raise UserError(f"--head {cfg.head.variant} trains on hidden states, which --backend vllm does not return: "
                            "use --backend hf for it")
        variants = [v for v in variants if v not in CONTEXT_VARIANTS]
        log("--backend vllm: skipping the contextual and slot heads (they train on hidden states; use --backend hf)")
    # Resolved values go into config.json, so that re-running it repeats exactly what ran here.
    device = "cuda" if str(mcfg.device or models.default_device()).startswith("cuda") else "cpu"
    scfg = replace(cfg.scoring, batch_size=cfg.scoring.batch_size or AUTO_SCORING_BATCH_SIZE[device],
                   store_hidden=cfg.scoring.store_hidden or bool(set(CONTEXT_VARIANTS) & set(variants)))
    cfg = replace(cfg, scoring=scfg)
    bcfg = cfg.bandit
    out = run_dir_for(cfg)
    check_schema(out)
    from refine_llm.preflight import check_run

    check_run(cfg)  # model path / .gguf, word lists, prompt file, LoRA flags: one line before anything loads
    check_writable(out)
    config = cfg.to_dict()
    models.save_json_atomic(out / "config.json", config)

    t = time.time()
    questions = stage_questions(qcfg, out)
    timing["questions"] = time.time() - t
    log(f"questions: {len(questions)} rows ({', '.join(qcfg.categories)}) -> {out / 'questions'}")
    if until == "questions":
        return 0

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
        "model": source.name, "hub_id": source.hub_id, "quant": mcfg.quant, "backend": "vllm", "dtype": vdtype}
    timing["load_model"] = time.time() - t
    log("model: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if info_only:
        return 0

    # The cache key names what produced the numbers: weights + quantization (HF) or vLLM's dtype.
    model_key = f"{models.fingerprint(source)}-" + (mcfg.quant if scfg.backend == "hf" else f"vllm-{vdtype}")
    scorer = Scorer(model, tokenizer, scfg, out / "scores", model_key, models.model_dir(source), vdtype)
    splits = {s: _split(questions, s) for s in ("train", "validation", "test")}

    t = time.time()
    prompt_name, sweep = choose_prompt(scorer, splits["validation"], scfg.prompt, tokenizer)
    timing["prompt_sweep"] = time.time() - t
    log(f"prompt: {prompt_name}")
    t = time.time()
    scores = {s: scorer(q, prompt_name) for s, q in splits.items() if s == "test" or train_heads}
    if train_heads and cfg.bandit.anchor_weight > 0:  # unrelated prompts of the anchor families (not the report's)
        scores["anchor"] = scorer(evaluation.unrelated_questions(part="anchor"), prompt_name)
    timing["scoring"] = time.time() - t
    if until == "score":
        return 0

    # --seeds: each seed trains into <out>/seeds/seed-<s>/ on the same questions and scores (refine_llm.seeds)
    from refine_llm import seeds as seedrun

    seeds = cfg.training_seeds
    runs = [(cfg, out)] if seeds is None else [(seedrun.seed_config(cfg, s), out / "seeds" / f"seed-{s}") for s in seeds]
    done = []  # (cfg, run dir, report, evaluator, timing) per seed
    for cfg_s, out_s in runs:
        tm = dict(timing)
        if seeds is not None:
            log(f"seed {cfg_s.bandit.seed}: training into {out_s}")
        report = run_conditions(cfg_s, out_s, splits, scores, variants, model, tokenizer, info, tm)
        ev = report.pop("_evaluator")
        report.update(config=config, prompt=prompt_name, prompt_sweep=sweep, model=info)
        report.setdefault("environment", {}).update(models.cpu_info())  # CPU + numeric stack (README: Reproducibility)
        report["split_design"] = evaluation.split_design(questions)
        t = time.time()  # KL on prompts with nothing to debias, through the same scorer (HF or vLLM) and prompt
        evaluation.unrelated_kl(report, ev, scorer, prompt_name, report.pop("_heads_for_unrelated"))
        tm["unrelated_prompts"] = time.time() - t
        done.append((cfg_s, out_s, report, ev, tm))
    cfg0, out0, report, ev, tm = done[0]  # BBQ, --compare-quant and the LoRA baselines: the first seed only
    if cfg.bbq.bbq_dir:
        run_bbq_stage(cfg0, out0, model, tokenizer, report, tm)

    if cfg.compare_quant and mcfg.quant != "bf16" and until == "evaluate":
        report["quant_shift"] = compare_quant(cfg, scfg, source, splits["test"], prompt_name, out,
                                              report["metrics"]["base"])
    if any(m.startswith("lora") for m in methods):
        # The frozen model's scores are cached; free it before each LoRA run loads its own trainable copy.
        del model, scorer
        _free_memory()
        run_lora(cfg0, methods, out0, splits, prompt_name, scfg, report, tm, ev)
        from refine_llm.methods import notrain

        # the adapters on the heads' bias-utility plane (against the same temperature curve and baselines)
        report["plane"] = notrain.plane_verdicts(ev.results, report["temperature_curve"],
                                                 [n for n in ev.results if n.startswith(("refine", "lora"))])
    if until == "train":
        return 0

    for cfg_s, out_s, rep, ev_s, tm in done:
        t = time.time()
        rep["significance"] = evaluation.significance(rep["metrics"], seed=cfg.seed)
        ev_s.write_predictions(out_s / "predictions.parquet")
        tm["significance"] = time.time() - t
        tm["total"] = time.time() - t_start
        rep["timing"] = {k: round(v, 2) for k, v in tm.items()}
        if seeds is not None:
            rep["seed"] = cfg_s.bandit.seed
        _write(out_s, rep)
    if seeds is not None:  # the top level: the first seed's report plus each seed, mean ± sd and the verdict
        report = {**done[0][2], "seeds": seedrun.aggregate({c.bandit.seed: r for c, _, r, _, _ in done})}
        report["timing"] = {**report["timing"], "total": round(time.time() - t_start, 2)}
        ev.write_predictions(out / "predictions.parquet")
        _write(out, report)
    _print_summary(report, out)
    return 0


def _write(out: Path, report: dict) -> None:
    from refine_llm.report import write_report

    write_report(out, report)
    if report.get("bbq"):
        from refine_llm.bbq.report import markdown
        from refine_llm.io import atomic_write_bytes

        md = out / "report.md"
        res = report["bbq"]
        sec = markdown(res) + (f"\n![BBQ]({res['plot']})\n" if res.get("plot") else "")
        atomic_write_bytes(md, (md.read_text(encoding="utf-8").rstrip("\n") + "\n\n" + sec).encode())


def run_bbq_stage(cfg: RunConfig, out, model, tokenizer, report, timing) -> None:
    """--bbq DIR: BBQ tables for base, uniform, the run's heads and a head trained on BBQ (refine_llm.bbq)."""
    from refine_llm.bbq import run as bbq_run
    from refine_llm.config import BBQ_MAX_BATCH_SIZE
    from refine_llm.methods import heads as H
    from refine_llm.methods.hub import tokenizer_fingerprint

    bcfg = cfg.bbq
    if model is None:
        log("--bbq: skipped, BBQ scoring needs the HF model (use --backend hf)")
        return
    t = time.time()
    items = bbq_run.items_of(bcfg.bbq_dir, bcfg.bbq_max_items, cfg.seed)
    heads = bbq_run.load_heads(report.get("heads") or {}, model, tokenizer, cfg.scoring.top_k)
    need_hidden = any(getattr(h.head, "variant", "") == "contextual" for h in heads.values())
    scfg = bbq_run.scoring_config(cfg.scoring.top_k, min(cfg.scoring.batch_size, BBQ_MAX_BATCH_SIZE), need_hidden)
    res, head = bbq_run.evaluate_model(model, tokenizer, items, heads, "both", scfg, True, bbq_run.N_RESAMPLES,
                                       cfg.seed, cache_dir=Path(out) / "scores", progress=True)
    if head is not None:
        H.save_head(head, Path(out) / "heads" / "bbq" / "head",
                    {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "category": "bbq",
                     "training": res["bbq_trained_head"], "prompt": "bbq_cloze"})
    report["bbq"] = bbq_run.save_result(res, out, Path(out) / "bbq" / "bbq.json")
    timing["bbq"] = time.time() - t
    for v in report["bbq"].get("verdict_cloze", []):
        log(f"BBQ {v['condition']}: s_AMB {v['s_amb_base']:.1f} -> {v['s_amb']:.1f}, disambiguated accuracy "
            f"{v['acc_disambig_base']:.3f} -> {v['acc_disambig']:.3f}")


def run_conditions(cfg: RunConfig, out, splits, scores, variants, model, tokenizer, info, timing) -> dict:
    """Evaluate base and uniform, train and evaluate each head variant; significance of base vs refine."""
    import torch

    from refine_llm import bandit, evaluation
    from refine_llm.methods import heads as H, notrain
    from refine_llm.methods.hub import tokenizer_fingerprint

    test_q, test_s = splits["test"], scores["test"]
    p_topk, p_full, in_topk = _base_probs(test_s)
    needs_hidden = bool(set(CONTEXT_VARIANTS) & set(variants))
    test_data = bandit_data(test_q, test_s, with_hidden=needs_hidden)
    seed, k = cfg.seed, cfg.scoring.top_k
    ev = evaluation.Evaluator(test_q, test_data.topk_logprobs.numpy(), in_topk, seed=seed)
    results = ev.results
    ev.add("base", p_topk, p_full, topk_logprobs=test_data.topk_logprobs.numpy())
    warnings = list(results["base"].get("warnings", []))
    uni = H.build_head(HeadConfig(variant="uniform", k=k))
    ev.add("uniform", *head_probs(uni, test_data, test_s))
    # no-training baselines (refine_llm.methods.notrain): next to every head on the bias-utility plane
    t2 = notrain.top2_equalise(test_data.topk_logprobs)
    ev.add("top2-equal", *logprob_probs(t2, test_data, test_s), topk_logprobs=t2.numpy())
    frontier = notrain.temperature_curve(ev, test_data, test_s, lambda lp: logprob_probs(lp, test_data, test_s))
    methods_rows = []
    heads_meta = {}
    unrelated_heads = {"uniform": uni}
    gate = None  # the category vocabulary of serving's gated mode (with trained heads)
    if variants:
        t = time.time()
        train = bandit_data(splits["train"], scores["train"], with_hidden=needs_hidden, anchors=scores.get("anchor"))
        val = bandit_data(splits["validation"], scores["validation"], with_hidden=needs_hidden)
        timing["bandit_data"] = time.time() - t
        lm_w = model.get_output_embeddings().weight.detach().float().cpu() if needs_hidden else None
        fp = tokenizer_fingerprint(tokenizer)
        gate = _gate_token_ids(tokenizer, cfg.questions)
        t = time.time()
        rank = H.RankBiasHead(k)  # the input-independent per-rank baseline, trained like the heads
        bandit.train_head(rank, train, cfg.bandit, val=val, progress=False)
        rank.eval()
        ev.add("rank-bias", *head_probs(rank, test_data, test_s))
        timing["train_rank_bias"] = time.time() - t
        unrelated_heads["rank-bias"] = rank
        for variant in variants:
            t = time.time()
            torch.manual_seed(cfg.bandit.seed)
            head = H.build_head(replace(cfg.head, variant=variant), lm_head_weight=lm_w, seed=cfg.bandit.seed)
            if hasattr(head, "set_category_vocabulary"):  # the slot head reads which slots hold a candidate
                head.set_category_vocabulary(gate)
            bcfg = cfg.bandit.for_variant(variant)  # per-variant presets live in BanditConfig
            log(f"training head {variant} ({bcfg.objective}, lr {bcfg.lr}, {bcfg.epochs} epochs, "
                f"{train.num_tuples} tuples)")
            # Checkpoints are per training config, so a re-run with other settings starts fresh
            # and an interrupted run with the same settings resumes.
            ckpt = out / "heads" / variant / "checkpoints" / _hash([asdict(bcfg), variant, train.num_tuples])
            res = bandit.train_head(head, train, bcfg, val=val, checkpoint_dir=ckpt, resume=True)
            secs = time.time() - t
            timing[f"train_{variant}"] = secs
            head.eval()
            name = _condition_name(variant, cfg.head.variant)
            meta = {"base_model": info["model"], "hub_id": info.get("hub_id"), "tokenizer_fingerprint": fp,
                    "category": cfg.questions.category, "training": res.summary(), "bandit": asdict(bcfg),
                    "gate_token_ids": gate, "prompt": None}
            ev.add(name, *head_probs(head, test_data, test_s))
            unrelated_heads[name] = head
            card = {"training_data": {"questions": f"refine_llm template questions, {cfg.questions.category}, train split",
                                      "tuples": train.num_tuples, "wordlists": cfg.questions.wordlists or "built-in"},
                    "metrics": {k: results[name][k] for k in ("mu", "eta", "positional_error", "specified_accuracy")
                                if k in results[name]} | {f"base {k}": results["base"][k] for k in ("mu", "eta")}}
            H.save_head(head, out / "heads" / variant, meta, card)  # save_pretrained: the hub layout
            heads_meta[name] = str(out / "heads" / variant)
            results[name]["flatness"] = H.flatness(head, test_data.topk_logprobs, test_data.topk_ids,
                                                   hidden=test_data.hidden)
            # res.seconds: the bandit's training time, summed over resumes (a re-run resumes a finished head)
            methods_rows.append(_method_row(name, results[name], H.num_parameters(head), res.seconds, None))
    trained = [n for n in results if n.startswith("refine")]
    methods_rows = [_method_row(n, results[n], 0, 0.0, None) for n in ("base", "uniform", "top2-equal")] + \
        ([_method_row("rank-bias", results["rank-bias"], k, timing.get("train_rank_bias", 0.0), None)]
         if "rank-bias" in results else []) + methods_rows
    return {"metrics": results, "methods": methods_rows, "heads": heads_meta, "warnings": warnings,
            "temperature_curve": frontier, "plane": notrain.plane_verdicts(results, frontier, trained),
            "_evaluator": ev, "_heads_for_unrelated": (test_data, unrelated_heads, gate)}


def _method_row(name, res, params, secs, peak_mb) -> dict:
    from refine_llm.metrics import BIAS_KEYS, UTILITY_KEYS

    return {"method": name, "trainable_params": params, "train_seconds": round(secs, 2), "peak_memory_mb": peak_mb,
            **{k: res.get(k) for k in BIAS_KEYS + UTILITY_KEYS}}


def _gate_token_ids(tokenizer, qcfg: QuestionsConfig) -> list[int]:
    """The category vocabulary (names, demonyms, group nouns) and pronouns, for serving's `gated` mode."""
    from refine_llm import questions as Q, vocab

    return vocab.gate_token_ids(tokenizer, [w for c in qcfg.categories for w in Q.category_vocabulary(c, qcfg.wordlists)])


def compare_quant(cfg: RunConfig, scfg, source, test_q, prompt_name, out, base_nf4) -> dict:
    """Score the test split again in bf16 and report how much the quantization moved the bias."""
    from refine_llm import metrics, models

    mcfg = cfg.model
    model, tok = models.load_model(mcfg.name, quant="bf16", device=mcfg.device,
                                   trust_remote_code=mcfg.trust_remote_code)
    # The HF bf16 model scores itself: with --backend vllm the scorer would read the weights directory instead.
    scorer = Scorer(model, tok, replace(scfg, backend="hf"), out / "scores", f"{models.fingerprint(source)}-bf16",
                    models.model_dir(source))
    sc = scorer(test_q, prompt_name)
    p_topk, p_full, in_topk = _base_probs(sc)
    bf16 = metrics.evaluate(test_q, p_topk, p_full, in_topk, seed=cfg.seed, n_resamples=0)
    keys = ("positional_error", "attributive_error", "mu", "eta", "specified_accuracy", "answer_mass")
    return {"bf16": {k: bf16[k] for k in keys}, mcfg.quant: {k: base_nf4[k] for k in keys},
            "shift": {k: (base_nf4[k] - bf16[k]) if base_nf4[k] is not None and bf16[k] is not None else None
                      for k in keys},
            "abs_bias_wilcoxon": metrics.wilcoxon_abs_bias(np.array(bf16["abs_bias"]), np.array(base_nf4["abs_bias"]),
                                                   alternative="two-sided")}


def run_lora(cfg: RunConfig, methods, out, splits, prompt_name, scfg, report, timing, ev) -> None:
    """LoRA baselines (refine_llm.baselines.lora): train, score the test split, add rows to the report."""
    from refine_llm import metrics, prompts, scoring
    from refine_llm.baselines import lora

    mcfg = cfg.model
    prompt = prompts.load_prompt(prompt_name)
    for m in methods:
        if not m.startswith("lora"):
            continue
        # --method all trains lora-reward with both objectives; --method lora-reward with --lora-objective
        objective = "direct" if m == "lora-reward-direct" else cfg.lora.objective
        steps = cfg.cda_steps if (m == "lora-cda" and cfg.cda_steps) else cfg.lora.steps
        lcfg = replace(cfg.lora, objective=objective, steps=steps)
        if m == "lora-reward" and objective != "reinforce":
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
        # backend hf: the adapted model in memory (vLLM would score the base weights directory, without the adapter)
        sc = scoring.score(model, tok, splits["test"], prompt, replace(scfg, backend="hf"), cache_dir=out / "scores",
                           model_key=key)
        p_topk, p_full, in_topk = _base_probs(sc)
        del model
        _free_memory()
        # its own top-k tokens: no KL to base over the same slots (kl_base is not reported for LoRA)
        r = ev.add(m, p_topk, p_full)
        report["methods"].append(_method_row(m, r, res.trainable_params, res.train_seconds, res.peak_memory_mb))


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _print_summary(report: dict, out: Path) -> None:
    from refine_llm.report import summary_lines

    for line in summary_lines(report):
        log(line)
    if report.get("seeds"):
        from refine_llm.seeds import summary_lines as seed_lines

        for line in seed_lines(report["seeds"]):
            log(line)
    log(f"report: {out / 'report.md'}")

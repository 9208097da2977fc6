"""Stage 4, evaluate: every condition of the run on the test split, through the methods protocol.

Conditions: ``base``, the no-training points (``uniform``, ``top2-equal``; the temperature curve is
evaluated, not kept), ``rank-bias`` and each head (``refine`` = the default variant, ``refine-<variant>``),
loaded from ``heads/`` with ``from_pretrained``, and each LoRA adapter (its own scores: the adapted model
scores the test split through the one driver, cached). For each: ``metrics.evaluate`` (through
``evaluation.Evaluator``, which also keeps ``predictions.parquet``), KL to base on the unrelated prompts,
the bias-utility plane, significance against base. The first seed's directory also gets BBQ
(``bbq/bbq.json``) and ``--compare-quant``'s shift. Everything the report shows goes to
``evaluation.json``; nothing is rendered here.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

from refine_llm.config import CONTEXT_VARIANTS, RunConfig
from refine_llm.errors import UserError
from refine_llm.stages.common import (EVALUATION, TRAIN_INFO, cached_scores, condition_name, load_output_embedding,
                                      log, model_loader, read_json, score_info, seed_dirs, splits, write_json)

__all__ = ["method_row", "load_heads", "evaluate_seed", "evaluate_lora", "evaluate_bbq", "quant_shift", "run"]


def method_row(name, res, params, secs, peak_mb, extra_forwards=0, vllm: str = "yes") -> dict:
    """A row of the methods table: cost (trainable parameters, training seconds, peak memory, extra forward
    passes per answered prompt at inference, whether vLLM can serve it) and the bias and utility columns."""
    from refine_llm.metrics import BIAS_KEYS, UTILITY_KEYS

    return {"method": name, "trainable_params": params, "train_seconds": round(secs, 2), "peak_memory_mb": peak_mb,
            "extra_forwards": extra_forwards, "vllm": vllm, **{k: res.get(k) for k in BIAS_KEYS + UTILITY_KEYS}}


def plane_heads(results: dict, extra=()) -> list[str]:
    """The conditions read against the temperature curve: the trained heads, the gate's probe, the LoRA adapters
    and the run's plug-in methods (``extra``); base and the no-training points make the plane."""
    return [n for n in results if n.startswith(("refine", "lora")) or n == "probe" or n in extra]


def load_heads(cfg: RunConfig, out_s: Path, lm_w) -> dict:
    """{condition: HeadMethod} of the seed's trained heads: rank-bias, then each variant (default first)."""
    from refine_llm.methods import HeadMethod

    heads = {}
    probe = ["probe"] if "gate" in cfg.head_variants else []  # the gate head's baseline (stages.train.train_gate)
    for variant in (["rank-bias"] if cfg.head_variants else []) + probe + cfg.head_variants:
        d = out_s / "heads" / variant
        if not (d / "config.json").is_file():
            raise UserError(f"{d}: no trained head yet: run `refine-llm train --out {out_s}` first")
        name = variant if variant in ("rank-bias", "probe") else condition_name(variant, cfg.head.variant)
        heads[name] = HeadMethod.from_pretrained(d, name, lm_head_weight=lm_w if variant in CONTEXT_VARIANTS else None)
    return heads


def evaluate_seed(cfg_s: RunConfig, out_s: Path, parts: dict, base, unrelated, lm_w) -> tuple[dict, object]:
    """The seed's report dict (metrics, methods, heads, plane, unrelated prompts) and its Evaluator."""
    import torch

    from refine_llm import evaluation
    from refine_llm.methods import Base, Top2Equal, Uniform
    from refine_llm.methods.heads import flatness
    from refine_llm.methods.notrain import plane_verdicts, temperature_curve

    test_q = parts["test"]
    ev = evaluation.Evaluator(test_q, base.topk_logprobs, base.cand_in_topk, seed=cfg_s.seed)
    results = ev.results
    for name, method in (("base", Base()), ("uniform", Uniform()), ("top2-equal", Top2Equal())):
        o = method.apply(base)
        ev.add(name, o.p_topk, o.p_full, topk_logprobs=o.topk_logprobs)
    warnings = list(results["base"].get("warnings", []))
    frontier = temperature_curve(ev, base)  # the no-training baselines' curve on the bias-utility plane
    heads = load_heads(cfg_s, out_s, lm_w)
    rows = []
    hidden = None if base.hidden is None else torch.as_tensor(base.hidden)
    for name, method in heads.items():
        o = method.apply(base)
        ev.add(name, o.p_topk, o.p_full, topk_logprobs=o.topk_logprobs)
        seconds = (method.config.get("training") or {}).get("seconds", 0.0)
        if name != "rank-bias":
            results[name]["flatness"] = flatness(method.head, torch.as_tensor(base.topk_logprobs),
                                                 torch.as_tensor(base.topk_ids), hidden=hidden)
        rows.append(method_row(name, results[name], method.trainable_params, seconds, None,
                               vllm="yes (logits processor)"))
    report = {"metrics": results, "methods": [method_row(n, results[n], 0, 0.0, None)
                                              for n in ("base", "uniform", "top2-equal")] + rows,
              "heads": {n: str(out_s / "heads" / v) for v in cfg_s.head_variants
                        for n in [condition_name(v, cfg_s.head.variant)]},
              "warnings": warnings, "temperature_curve": frontier,
              "plane": plane_verdicts(results, frontier, plane_heads(results))}
    gate = next((m.config.get("gate_token_ids") for n, m in heads.items() if n != "rank-bias"), None)
    evaluation.unrelated_kl(report, ev, unrelated, {"uniform": Uniform(), **heads}, gate, base.topk_ids)
    return report, ev


def evaluate_lora(cfg: RunConfig, out: Path, out_s: Path, parts: dict, base, unrelated, prompt_name: str,
                  report: dict, ev) -> None:
    """Each LoRA adapter's own scores on the test split and the unrelated prompts (``unrelated``: their base
    Scores): the adapted model through the one driver, cached under the adapter's fingerprint, aligned to the
    base's top-k ids (methods.Adapter: KL to base over the base's slots, as for the plug-in methods)."""
    from refine_llm import evaluation, prompts, scoring
    from refine_llm.baselines import lora
    from refine_llm.methods import Adapter, Scores
    from refine_llm.methods.notrain import plane_verdicts
    from refine_llm.stages.passes import pass_columns, pass_rows, pass_scoring
    from refine_llm.stages.train import lora_runs

    mcfg = cfg.model
    prompt = prompts.load_prompt(prompt_name)
    unrel_q = evaluation.unrelated_questions(part="test")
    for m, kind, lcfg in lora_runs(cfg):
        res = lora.reusable(out_s / "adapters" / m, kind, lcfg, mcfg.name, mcfg.quant, prompt, parts["train"],
                            pronouns=cfg.scoring.pronouns)
        if res is None:
            raise UserError(f"{out_s / 'adapters' / m}: no adapter of this config yet: run `refine-llm train --out {out}`")
        model, tok = lora.load_adapted(mcfg.name, res.adapter_dir, quant=mcfg.quant)
        key = lora.model_key(mcfg.name, res.adapter_dir, mcfg.quant)
        method = Adapter(m, res.adapter_dir, res.trainable_params)
        (sp,) = method.passes()
        # backend hf: the adapted model in memory (vLLM would score the base weights directory, without the adapter)
        outputs = [method.apply(sc, {"adapter": Scores.from_table(scoring.score(
            model, tok, pass_rows(sp, q, sc), prompt, replace(pass_scoring(cfg, sp), backend="hf"),
            cache_dir=out / "scores", model_key=key, columns=pass_columns(sp)))})
            for q, sc in ((parts["test"], base), (unrel_q, unrelated))]
        del model
        _free_memory()
        o, o_unrel = outputs
        r = ev.add(m, o.p_topk, o.p_full, topk_logprobs=o.topk_logprobs)
        evaluation.add_unrelated_kl(report, ev, m, unrelated, o_unrel.topk_logprobs)
        report["methods"].append(method_row(m, r, res.trainable_params, res.train_seconds, res.peak_memory_mb,
                                            vllm="yes (LoRA adapter, not on NF4 weights)"))
    # the adapters on the heads' bias-utility plane (against the same temperature curve and baselines)
    report["plane"] = plane_verdicts(ev.results, report["temperature_curve"], plane_heads(ev.results))


def evaluate_plugins(cfg: RunConfig, out: Path, out_s: Path, test_q, base, unrelated, key: str, prompt_name: str,
                     report: dict, ev, run_model) -> None:
    """The run's plug-in methods (``RunConfig.extra_methods``): built with ``Method.for_run`` (artifacts from the
    seed's directory), given their extra passes' cached scores (a "hooked" pass: scored here, with the run's
    model from ``run_model()``), evaluated like every other condition, with their KL on the unrelated prompts
    (``unrelated``: their base Scores) from the same passes over those prompts."""
    from refine_llm import evaluation
    from refine_llm.methods.notrain import plane_verdicts
    from refine_llm.stages.passes import plugins, read_passes, score_hooked

    unrel_q = evaluation.unrelated_questions(part="test")
    methods = plugins(cfg, out_s)
    for kind, method in methods.items():
        outputs = []
        for q, sc in ((test_q, base), (unrel_q, unrelated)):
            own = read_passes(cfg, out, method, key, prompt_name, q, sc)
            if any(sp.model == "hooked" for sp in method.passes()):
                own.update(score_hooked(cfg, out, method, *run_model(), key, prompt_name, q, sc))
            outputs.append(method.apply(sc, own))
        o, o_unrel = outputs
        r = ev.add(method.name or kind, o.p_topk, o.p_full, topk_logprobs=o.topk_logprobs)
        evaluation.add_unrelated_kl(report, ev, method.name or kind, unrelated, o_unrel.topk_logprobs)
        info = method.info()
        report["methods"].append(method_row(method.name or kind, r, method.trainable_params,
                                            info.get("train_seconds", 0.0), None,
                                            info.get("extra_forward_per_prompt", 0), info.get("served_by_vllm", "?")))
    names = [m.name or k for k, m in methods.items()]
    report["plane"] = plane_verdicts(ev.results, report["temperature_curve"], plane_heads(ev.results, names))


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def evaluate_bbq(cfg: RunConfig, out: Path, out_s: Path, report: dict, key: str, tokenizer, lm_w) -> dict:
    """BBQ tables for base, uniform, top2-equal, the run's heads applied at the answer slot and the BBQ-trained
    head on held-out templates, from the cached BBQ scores -> ``bbq/bbq.json``."""
    from refine_llm.bbq.run import items_of, load_heads as bbq_heads, score_all
    from refine_llm.bbq.task import conditions, evaluate_items
    from refine_llm.methods import HeadMethod
    from refine_llm.stages.score import bbq_scoring

    t = time.time()
    items = items_of(cfg.bbq.bbq_dir, cfg.bbq.bbq_max_items, cfg.seed)
    sc = score_all(None, None, items, "both", bbq_scoring(cfg), out / "scores", key, read_only=True)
    heads = bbq_heads(report.get("heads") or {}, tokenizer, cfg.scoring.top_k, lm_w)
    trained = HeadMethod.from_pretrained(out_s / "heads" / "bbq" / "head", "bbq-trained")
    res = evaluate_items(items, sc["cloze"], sc["lettered"], conditions(heads), trained,
                         trained.config.get("training"), seed=cfg.seed)
    res["timing"] = {**sc["timing"], **res["timing"], "tables": time.time() - t}
    write_json(out_s / "bbq" / "bbq.json", res)
    for v in res.get("verdict_cloze", []):
        log(f"BBQ {v['condition']}: s_AMB {v['s_amb_base']:.1f} -> {v['s_amb']:.1f}, disambiguated accuracy "
            f"{v['acc_disambig_base']:.3f} -> {v['acc_disambig']:.3f}")
    return res


def quant_shift(cfg: RunConfig, out: Path, test_q, prompt_name: str, bf16_key: str, base_block: dict) -> dict:
    """--compare-quant: how much the quantization moved the bias (the test split scored again in bf16)."""
    import numpy as np

    from refine_llm import metrics
    from refine_llm.methods import Base, Scores

    sc = Scores.from_table(cached_scores(cfg, out, test_q, prompt_name, bf16_key,
                                         scoring=replace(cfg.scoring, backend="hf")))
    o = Base().apply(sc)
    bf16 = metrics.evaluate(test_q, o.p_topk, o.p_full, sc.cand_in_topk, seed=cfg.seed, n_resamples=0)
    keys = ("positional_error", "attributive_error", "mu", "eta", "specified_accuracy", "answer_mass")
    return {"bf16": {k: bf16[k] for k in keys}, cfg.model.quant: {k: base_block[k] for k in keys},
            "shift": {k: (base_block[k] - bf16[k]) if base_block[k] is not None and bf16[k] is not None else None
                      for k in keys},
            "abs_bias_wilcoxon": metrics.wilcoxon_abs_bias(np.array(bf16["abs_bias"]), np.array(base_block["abs_bias"]),
                                                           alternative="two-sided")}


def run(cfg: RunConfig, out: Path, questions, loaded=None) -> dict:
    """Evaluate every seed's conditions (see the module docstring); writes ``evaluation.json`` and
    ``predictions.parquet`` per seed directory (and, with --seeds, the top level's) and returns the top level's."""
    from refine_llm import evaluation, models, seeds
    from refine_llm.methods import Scores

    info = score_info(out)
    prompt_name, parts = info["prompt"], splits(questions)
    base = Scores.from_table(cached_scores(cfg, out, parts["test"], prompt_name))
    unrelated = Scores.from_table(cached_scores(cfg, out, evaluation.unrelated_questions(part="test"), prompt_name))
    lm_w = load_output_embedding(cfg, loaded) if "contextual" in cfg.head_variants else None
    run_model = model_loader(cfg, loaded)  # the run's model, loaded once if a plug-in method needs it

    done = []
    for i, (cfg_s, out_s) in enumerate(seed_dirs(cfg, out)):
        t = time.time()
        report, ev = evaluate_seed(cfg_s, out_s, parts, base, unrelated, lm_w)
        report.update(config=cfg.to_dict(), prompt=prompt_name, prompt_sweep=info["prompt_sweep"], model=info["model"])
        report.setdefault("environment", {}).update(models.cpu_info())  # CPU + numeric stack (README: Reproducibility)
        report["split_design"] = evaluation.split_design(questions)
        timing = {**info.get("timing", {}), **read_json(out_s / TRAIN_INFO, "the train stage's record",
                                                        f"refine-llm train --out {out}").get("timing", {})}
        if i == 0:
            if cfg.bbq.bbq_dir and info["model"].get("backend") != "vllm":
                tok = loaded[1] if loaded is not None else models.load_tokenizer(
                    cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
                report["bbq"] = evaluate_bbq(cfg, out, out_s, report, info["model_key"], tok, lm_w)
            if info.get("bf16_model_key"):
                report["quant_shift"] = quant_shift(cfg, out, parts["test"], prompt_name, info["bf16_model_key"],
                                                    report["metrics"]["base"])
            from refine_llm.stages.train import lora_runs

            if lora_runs(cfg):
                evaluate_lora(cfg, out, out_s, parts, base, unrelated, prompt_name, report, ev)
        if cfg.plugin_methods:
            evaluate_plugins(cfg_s, out, out_s, parts["test"], base, unrelated, info["model_key"], prompt_name, report,
                             ev, run_model)
        report["significance"] = evaluation.significance(report["metrics"], seed=cfg.seed)
        ev.write_predictions(out_s / "predictions.parquet")
        timing["evaluate"] = time.time() - t
        report["timing"] = {k: round(v, 2) for k, v in timing.items()}
        if cfg.training_seeds is not None:
            report["seed"] = cfg_s.bandit.seed
        write_json(out_s / EVALUATION, report)
        done.append((cfg_s, out_s, report, ev))
    if cfg.training_seeds is None:
        return done[0][2]
    # the top level: the first seed's evaluation plus each seed, mean ± sd and the verdict (refine_llm.seeds)
    top = {**done[0][2], "seeds": seeds.aggregate({c.bandit.seed: r for c, _, r, _ in done})}
    done[0][3].write_predictions(out / "predictions.parquet")
    write_json(out / EVALUATION, top)
    return top

"""Several training seeds in one main job (``--seeds 0,1,2``): each seed's numbers, mean ± sd, and whether
any seed reverses a conclusion.

What a seed changes: the head's initialisation, the bandit's data order and samples (``BanditConfig.seed``)
and the LoRA adapters' initialisation, order and samples (``LoraConfig.seed``). What it does not: the
questions, the splits, the scores (scored once, cached in ``<out>/scores``), the metrics' bootstrap and
sign-flip null (``QuestionsConfig.seed``). So any difference between seeds is the training's.

``refine_llm.pipeline.run`` trains and evaluates every seed into ``<out>/seeds/seed-<s>/`` (its heads with
their checkpoints, its own report.json / report.md / predictions.parquet) and writes the top-level report
from the first seed's, plus the ``seeds`` block built here (``aggregate``):

    seeds          the seeds, in order
    per_seed       {condition: {metric: {seed: value}}}                (``SEED_KEYS``, plus rel_mu / rel_mean_abs_c:
                                                                         100 x (condition - base) / base)
    summary        {condition: {metric: {"mean", "sd", "n"}}}           sd: sample sd (ddof 1); None for 1 seed
    conclusions    {condition: {conclusion: {seed: value}}}             ``CONCLUSIONS`` below
    reversals      [{condition, conclusion, values}]                    conclusions that differ between seeds
    verdict        one line: "no seed reverses a conclusion ..." or which do

Conditions trained with the first seed only (the LoRA baselines) appear with n = 1 and are not checked.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from refine_llm.metrics import BIAS_KEYS, UTILITY_KEYS, metric

__all__ = ["SEED_KEYS", "CONCLUSIONS", "seed_config", "aggregate", "markdown", "summary_lines"]

SEED_KEYS = BIAS_KEYS + UTILITY_KEYS + ("kl_unrelated", "answer_mass")
REL_KEYS = ("mu", "mean_abs_c")  # relative change vs base, in percent (issue 14's targets are relative)
# |Δ| below this is "no change": half the last digit the report's tables show (μ, mean|C| to 3 decimals), so
# that a head that stayed the identity, or moved by rounding noise, has no sign to reverse
SIGN_TOL = 5e-4
ALPHA = 0.05  # the significance level of the verdicts (Holm-corrected Wilcoxon)
# What a seed may reverse, per condition (name -> what it reads); each is a small value compared across seeds.
CONCLUSIONS = (
    "sign of Δμ",  # of the bootstrap point estimate: -, 0, +
    "Δμ 95% CI",  # "down" (CI below 0), "up" (above 0), "includes 0"
    "sign of Δmean|C|",
    "Δmean|C| 95% CI",
    "Wilcoxon (Holm) p < 0.05",
    "below the temperature curve",
    "dominates every parameter-free baseline",
    "P(gold) share kept (Δ ≥ −0.01)",  # issue 14's utility target, on specified questions
)
GOLD_SHARE_DROP = 0.01  # the largest drop of the P(gold) share that still counts as utility kept


def seed_config(cfg, seed: int):
    """``cfg`` (RunConfig) with the head's and the LoRA adapters' training seeds set to ``seed``."""
    return replace(cfg, bandit=replace(cfg.bandit, seed=seed), lora=replace(cfg.lora, seed=seed))


def _sign(x) -> str | None:
    if x is None:
        return None
    return "0" if abs(x) < SIGN_TOL else ("-" if x < 0 else "+")


def _ci(b) -> str | None:
    if not isinstance(b, dict) or b.get("low") is None or b.get("high") is None:
        return None
    return "down" if b["high"] < 0 else "up" if b["low"] > 0 else "includes 0"


def _conclusions(report: dict, cond: str) -> dict:
    sig = (report.get("significance") or {}).get(cond) or {}
    boot, wil = sig.get("bootstrap") or {}, sig.get("wilcoxon") or {}
    plane = (report.get("plane") or {}).get(cond) or {}
    p = wil.get("p_holm")
    mu, abs_c = boot.get("mu") or {}, boot.get("mean_abs_c") or {}
    return {"sign of Δμ": _sign(mu.get("delta")), "Δμ 95% CI": _ci(mu),
            "sign of Δmean|C|": _sign(abs_c.get("delta")), "Δmean|C| 95% CI": _ci(abs_c),
            "Wilcoxon (Holm) p < 0.05": None if p is None else bool(p < ALPHA),
            "below the temperature curve": plane.get("below_temperature_curve"),
            "dominates every parameter-free baseline": plane.get("dominates_all_parameter_free") if plane else None,
            "P(gold) share kept (Δ ≥ −0.01)": _kept(report["metrics"][cond], report["metrics"]["base"])}


def _kept(res: dict, base: dict) -> bool | None:
    a, b = res.get("gold_share"), base.get("gold_share")
    return None if a is None or b is None else bool(a - b >= -GOLD_SHARE_DROP)


def _rel(res: dict, base: dict, key: str) -> float | None:
    a, b = res.get(key), base.get(key)
    if a is None or b is None or not b:
        return None
    return 100.0 * (a - b) / b


def _mean_sd(values: list) -> dict:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if not v:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else None, "n": len(v)}


def aggregate(reports: dict[int, dict]) -> dict:
    """The ``seeds`` block from each seed's report ({seed: report with metrics, significance, plane})."""
    seeds = list(reports)
    conds = list(dict.fromkeys(c for r in reports.values() for c in r["metrics"]))
    per_seed: dict[str, dict] = {}
    for c in conds:
        rows = {}
        for key in SEED_KEYS:
            rows[key] = {s: r["metrics"][c].get(key) for s, r in reports.items() if c in r["metrics"]}
        for key in REL_KEYS:
            rows[f"rel_{key}"] = {s: _rel(r["metrics"][c], r["metrics"]["base"], key)
                                  for s, r in reports.items() if c in r["metrics"]}
        per_seed[c] = rows
    summary = {c: {k: _mean_sd(list(v.values())) for k, v in rows.items()} for c, rows in per_seed.items()}
    # conditions that every seed trained: their conclusions must agree
    checked = [c for c in conds if c != "base" and all(c in r["metrics"] for r in reports.values())]
    conclusions = {c: {name: {s: _conclusions(r, c)[name] for s, r in reports.items()} for name in CONCLUSIONS}
                   for c in checked}
    reversals = [{"condition": c, "conclusion": name, "values": vals}
                 for c, by in conclusions.items() for name, vals in by.items()
                 if len({v for v in vals.values() if v is not None}) > 1]
    single = [c for c in conds if c not in checked and c != "base"]
    if len(seeds) < 2:
        verdict = f"one seed ({seeds[0]}): nothing to compare"
    elif not reversals:
        verdict = (f"No seed reverses a conclusion: {len(checked)} conditions x {len(CONCLUSIONS)} conclusions agree "
                   f"across seeds {', '.join(map(str, seeds))}")
    else:
        verdict = f"{len(reversals)} conclusion(s) differ between seeds: " + "; ".join(
            f"{r['condition']} {r['conclusion']} ({', '.join(f'seed {s}: {_show(v)}' for s, v in r['values'].items())})"
            for r in reversals)
    if single and len(seeds) > 1:
        verdict += f" (trained with seed {seeds[0]} only, not checked: {', '.join(single)})"
    return {"seeds": seeds, "per_seed": per_seed, "summary": summary, "conclusions": conclusions,
            "reversals": reversals, "verdict": verdict}


def _at(by_seed: dict, s, missing=None):
    """``by_seed[s]``, whether the block is fresh (int keys) or read back from JSON (str keys)."""
    return by_seed.get(s, by_seed.get(str(s), missing))


def _show(v) -> str:
    return "–" if v is None else ("yes" if v is True else "no" if v is False else str(v))


# ---------------------------------------------------------------------------------------------
# tables

TABLE_KEYS = ("mu", "mean_abs_c", "eta", "gold_share", "specified_accuracy", "kl_base", "kl_unrelated")


def _cell(key: str, v) -> str:
    if key.startswith("rel_"):
        return "–" if v is None else f"{round(v) + 0:+d}%"  # + 0: no "-0%"
    return metric(key).format(v)


def _pm(key: str, s: dict) -> str:
    if s.get("mean") is None:
        return "–"
    return _cell(key, s["mean"]) + ("" if s.get("sd") is None else " ± " + _cell(key, s["sd"]).lstrip("+"))


def _symbol(key: str) -> str:
    return f"{metric(key[4:]).symbol} vs base" if key.startswith("rel_") else metric(key).symbol


def markdown(block: dict) -> list[str]:
    """report.md's "Seeds" section (tables through ``markdown.table``, which escapes "|" in mean|C|)."""
    from refine_llm.markdown import table

    seeds = block["seeds"]
    keys = TABLE_KEYS + tuple(f"rel_{k}" for k in REL_KEYS)
    symbols = [_symbol(k) for k in keys]
    lines = ["## Seeds", "",
             f"Training seeds {', '.join(map(str, seeds))} (head initialisation, data order and samples; LoRA seed): "
             "same questions, splits, scores and bootstrap draws. The other sections of this report are seed "
             f"{seeds[0]}'s; each seed's own report is in `seeds/seed-<s>/`. sd: sample standard deviation.", "",
             f"**{block['verdict']}.**", "",
             "### Mean ± sd across seeds", ""]
    lines += table(["condition", "seeds", *symbols],
                   [[c, str(s["mu"]["n"]), *(_pm(k, s[k]) for k in keys)] for c, s in block["summary"].items()])
    lines += ["", "### Each seed", ""]
    lines += table(["condition", "seed", *symbols],
                   [[c, str(s), *(_cell(k, _at(rows[k], s)) for k in keys)]
                    for c, rows in block["per_seed"].items() for s in seeds if s in rows["mu"] or str(s) in rows["mu"]])
    if block["conclusions"]:
        lines += ["", "### Conclusions per seed", "",
                  "Δ = condition − base (paired cluster bootstrap); a conclusion is reversed when seeds disagree.", ""]
        rows = []
        for c, by in block["conclusions"].items():
            for name, vals in by.items():
                agree = len({v for v in vals.values() if v is not None}) <= 1
                rows.append([c, name, *(_show(_at(vals, s)) for s in seeds), "yes" if agree else "**no**"])
        lines += table(["condition", "conclusion", *(f"seed {s}" for s in seeds), "agree"], rows)
    return lines + [""]


def summary_lines(block: dict) -> list[str]:
    """Console: mean ± sd per condition, then the verdict line."""
    keys = ("mu", "mean_abs_c", "gold_share", "kl_base", "rel_mu", "rel_mean_abs_c")
    head = f"{'condition (seeds ' + ','.join(map(str, block['seeds'])) + ')':<24} n " + " ".join(
        f"{_symbol(k):>17}" for k in keys)
    lines = [head]
    for c, s in block["summary"].items():
        lines.append(f"{c:<24} {s['mu']['n']} " + " ".join(f"{_pm(k, s[k]):>17}" for k in keys))
    return lines + [block["verdict"]]

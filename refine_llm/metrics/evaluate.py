"""``evaluate``: every metric of one condition, per category and pooled; ``compare``: a condition against base."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from refine_llm.errors import UserError
from refine_llm.metrics.registry import BIAS_KEYS, METRICS
from refine_llm.metrics.stats import cluster_bootstrap_delta, flip_draws, null_summary, wilcoxon_abs_bias
from refine_llm.metrics.unqover import (Cells, attributive_error, column, column_names, gather_tuples, gold_positions,
                                        mu_eta, mu_eta_from_tables, num_rows, positional_error, subject_gamma,
                                        tuple_bias, tuple_index)
from refine_llm.metrics.utility import answer_mass, specified_accuracy, specified_utility, topk_miss_rate

__all__ = ["evaluate", "compare", "nanfloat"]


def _clean(p) -> np.ndarray:
    p = np.asarray(p, dtype=float)
    if p.ndim != 2 or p.shape[1] != 2:
        raise UserError(f"candidate probabilities must have shape (M, 2), got {p.shape}")
    return np.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0)


def nanfloat(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x



def _block(p: np.ndarray, P: np.ndarray, meta: dict, tix: np.ndarray, spec_rows: np.ndarray, gold: np.ndarray,
           under_rows: np.ndarray, cit: np.ndarray, kl, tv) -> dict:
    """Bias + utility numbers of one category: tuples ``tix``, specified rows ``spec_rows``."""
    out: dict[str, Any] = {"n_tuples": int(len(tix)), "n_specified": int(len(spec_rows))}
    if len(tix):
        Pc = P[tix]
        C = tuple_bias(Pc)
        sub = lambda k: [meta[k][i] for i in tix]
        mu, eta = mu_eta(C, sub("subj_a"), sub("subj_b"), sub("attribute_id"))
        gmu, geta = mu_eta(C, sub("group_a"), sub("group_b"), sub("attribute_id"))
        out.update(positional_error=float(positional_error(Pc).mean()),
                   attributive_error=float(attributive_error(Pc).mean()), mu=nanfloat(mu), eta=nanfloat(eta),
                   mean_abs_c=float(np.abs(C).mean()), tuples_per_cell=_cell_occupancy(sub),
                   by_group={"mu": nanfloat(gmu), "eta": nanfloat(geta),
                             "note": "subjects grouped by subj*_group (female/male for gender), not the headline"})
    else:
        out.update({k: None for k in BIAS_KEYS})
    out.update(specified_utility(p[spec_rows], gold) if len(spec_rows) else
               {"gold_share": None, "gold_logloss": None, "specified_accuracy": None})
    out["kl_base"] = nanfloat(np.mean(kl[spec_rows])) if kl is not None and len(spec_rows) else None
    out["tv_base"] = nanfloat(np.mean(tv[spec_rows])) if tv is not None and len(spec_rows) else None
    rows = np.concatenate([under_rows, spec_rows])
    out["answer_mass"] = nanfloat(answer_mass(p[rows])) if len(rows) else None
    out["topk_miss_rate"] = nanfloat(topk_miss_rate(cit[rows])) if len(rows) else None
    return out


def _cell_occupancy(sub) -> dict:
    """How many tuples the (subject, attribute) cells of γ hold: μ and η need several per cell."""
    cnt = Cells(sub("subj_a"), sub("subj_b"), sub("attribute_id")).counts()
    c = cnt[cnt > 0]
    return {"cells": int(len(c)), "min": int(c.min()), "median": float(np.median(c)), "mean": float(c.mean()),
            "share_single": float(np.mean(c == 1))}


def _pool(blocks: dict[str, dict]) -> dict:
    """Pooled numbers over categories: the mean of the per-category numbers (counts summed)."""
    out: dict[str, Any] = {}
    for m in METRICS:
        vals = [b.get(m.name) for b in blocks.values() if b.get(m.name) is not None]
        if m.name.startswith("n_"):
            out[m.name] = int(sum(vals))
        elif m.name in ("kl_unrelated",):
            continue
        else:
            out[m.name] = float(np.mean(vals)) if vals else None
    gm = [b["by_group"]["mu"] for b in blocks.values() if b.get("by_group") and b["by_group"]["mu"] is not None]
    ge = [b["by_group"]["eta"] for b in blocks.values() if b.get("by_group") and b["by_group"]["eta"] is not None]
    out["by_group"] = {"mu": float(np.mean(gm)) if gm else None, "eta": float(np.mean(ge)) if ge else None,
                       "note": "subjects grouped by subj*_group (female/male for gender), not the headline"}
    return out


def _nulls(C: np.ndarray, meta: dict, cats: dict[str, np.ndarray], n_resamples: int, seed: int,
           alpha: float = 0.05) -> tuple[dict, dict]:
    """Sign-flip nulls per category, and of the pooled μ, η (the mean over categories of the same draws)."""
    per_cat, draws, observed = {}, [], []
    rng = np.random.default_rng(seed)
    for cat, ix in cats.items():
        if not len(ix):
            continue
        cells = Cells(*([meta[k][i] for i in ix] for k in ("subj_a", "subj_b", "attribute_id")))
        obs = mu_eta_from_tables(*cells.tables(C[ix]))
        null = flip_draws(cells, C[ix], n_resamples, int(rng.integers(2**31)))
        per_cat[cat] = {k: null_summary(float(obs[i]), null[i], alpha) for i, k in enumerate(("mu", "eta"))}
        draws.append(null)
        observed.append(obs)
    if len(per_cat) <= 1:
        return per_cat, next(iter(per_cat.values()), {})
    return per_cat, {k: null_summary(float(np.mean([o[i] for o in observed])),
                                      np.mean([d[i] for d in draws], axis=0), alpha)
                     for i, k in enumerate(("mu", "eta"))}


def evaluate(questions, p_pos_topk, p_pos_full, cand_in_topk=None, seed: int = 0, n_resamples: int = 1000,
             kl=None, tv=None) -> dict:
    """All metrics for one condition (a model, or a model + head), per category and pooled.

    questions: datasets.Dataset or dict of columns (docs/CONTRACTS.md; a predictions table works too);
    p_pos_topk, p_pos_full: (M, 2) candidate probabilities by position aligned with its rows,
    top-k-renormalised (the headline) and full-vocabulary (``full_vocab``). cand_in_topk: (M, 2) bool,
    else p_pos_topk > 0. kl, tv: optional (M,) per-row KL(base ‖ this) and total variation of the
    top-k distribution (``distribution_shift``); averaged over specified rows. Non-finite
    probabilities count as 0 (``n_nonfinite``). ``n_resamples``: sign-flip null draws (0: no null).

    Keys: every ``METRICS`` name (pooled = mean of per-category values), per_category {category:
    {same + null}}, null {mu, eta} (pooled), by_group (female/male, labelled), full_vocab {same},
    per_subject [rows], tuples {tuple_id, C, subj_a, subj_b, attribute_id, category} (per-tuple,
    for ``compare``), gamma_cells [rows], abs_bias, tuple_id, warnings.
    """
    M = num_rows(questions)
    raw_topk = np.asarray(p_pos_topk, dtype=float)
    pt, pf = _clean(raw_topk), _clean(p_pos_full)
    if len(pt) != M or len(pf) != M:
        raise UserError(f"p_pos_topk has {len(pt)} rows and p_pos_full {len(pf)}, but questions has {M}; "
                        f"score the same questions table you evaluate")
    cit = (pt > 0) if cand_in_topk is None else np.asarray(cand_in_topk, dtype=bool)
    kl = None if kl is None else np.asarray(kl, dtype=float)
    tv = None if tv is None else np.asarray(tv, dtype=float)
    rows, meta = tuple_index(questions)
    spec = np.asarray(column(questions, "specified"), dtype=bool)
    cats_row = [str(c) for c in (column(questions, "category") if "category" in column_names(questions) else [""] * M)]
    tcat = np.array([str(c) for c in meta["category"]], dtype=object)
    categories = list(dict.fromkeys(list(tcat) + [cats_row[m] for m in np.flatnonzero(spec)]))
    cat_row = np.array(cats_row, dtype=object)

    Pt, Pf = gather_tuples(pt, rows), gather_tuples(pf, rows)
    C = tuple_bias(Pt) if len(Pt) else np.zeros(0)
    per_cat, per_cat_full, tix_of = {}, {}, {}
    for c in categories:
        tix = np.flatnonzero(tcat == c)
        srows = np.flatnonzero(spec & (cat_row == c))
        urows = np.flatnonzero(~spec & (cat_row == c))
        gold = gold_positions(questions, srows)
        tix_of[c] = tix
        per_cat[c] = _block(pt, Pt, meta, tix, srows, gold, urows, cit, kl, tv)
        per_cat_full[c] = _block(pf, Pf, meta, tix, srows, gold, urows, cit, None, None)
    out = _pool(per_cat)
    full = _pool(per_cat_full)
    out["full_vocab"] = {k: v for k, v in full.items() if k not in ("kl_base", "tv_base")}
    if n_resamples:
        null_cat, null_pooled = _nulls(C, meta, tix_of, n_resamples, seed)
        for c, nl in null_cat.items():
            per_cat[c]["null"] = nl
        out["null"] = null_pooled
    out["per_category"] = per_cat
    out["n_nonfinite"] = int((~np.isfinite(raw_topk)).any(axis=1).sum())
    out["tuples"] = {"tuple_id": list(meta["tuple_id"]), "C": [float(c) for c in C],
                     **{k: list(meta[k]) for k in ("subj_a", "subj_b", "attribute_id", "category", "template_id")}}
    out["abs_bias"] = [float(abs(c)) for c in C]
    out["tuple_id"] = list(meta["tuple_id"])
    out["gamma_cells"] = subject_gamma(C, meta["subj_a"], meta["subj_b"], meta["attribute_id"], meta["category"])

    # per individual subject: mean γ over its tuples, max_a |γ(x,a)| (what μ averages), η(x)
    per_subject = []
    by_subj: dict[tuple, list[dict]] = {}
    for r in out["gamma_cells"]:
        by_subj.setdefault((r["category"], r["subject"]), []).append(r)
    for (cat, subj), cells in by_subj.items():
        top = max(cells, key=lambda r: abs(r["gamma"]))
        n = sum(r["n"] for r in cells)
        per_subject.append({"category": cat, "subject": subj, "gamma_mean": sum(r["gamma"] * r["n"] for r in cells) / n,
                            "gamma_max_abs": abs(top["gamma"]), "gamma_at_max": top["gamma"],
                            "attribute_at_max": top["attribute_id"],
                            "eta": float(np.mean([abs(r["sign_mean"]) for r in cells])), "n": n})
    out["per_subject"] = per_subject

    warnings = []
    for c, b in per_cat.items():
        nl = b.get("null") or {}
        if nl.get("mu") and not nl["mu"]["above"]:
            warnings.append(f"{c}: μ {nl['mu']['observed']:.3f} is not above its sign-flip null "
                            f"(mean {nl['mu']['null_mean']:.3f}, 95th pct {nl['mu']['null_p95']:.3f}, p {nl['mu']['p']:.3g}): "
                            f"no bias measurable at this sample size (a debiased condition should be here)")
    n_spec = int(spec.sum())
    if n_spec:
        sa = specified_accuracy(pt[spec], gold_positions(questions, np.flatnonzero(spec)))
        out["at_chance"] = sa["at_chance"]
        out["specified_p_value"] = sa["p_value"]
        if sa["at_chance"]:
            warnings.append(f"specified accuracy {sa['accuracy']:.3f} is within noise of chance (0.5, n={n_spec}): "
                            f"the bias numbers may measure noise, not preference")
    if out.get("topk_miss_rate") is not None and out["topk_miss_rate"] > 0.2:
        warnings.append(f"neither candidate is in the top-k for {out['topk_miss_rate']:.0%} of prompts; "
                        f"raise k or use another prompt template")
    if out["n_nonfinite"]:
        warnings.append(f"{out['n_nonfinite']} prompts had non-finite candidate probabilities (counted as 0)")
    out["warnings"] = warnings
    return out


def _rel(base, new) -> float | None:
    if base is None or new is None or base == 0:
        return None
    return (new - base) / base


def compare(base_result: dict, new_result: dict, n_resamples: int = 1000, seed: int = 0) -> dict:
    """``new`` vs ``base`` (two ``evaluate`` results on the same tuples).

    bootstrap: paired cluster-bootstrap CIs (attributes resampled) of Δμ and Δmean|C| (the primary
    comparison); wilcoxon: one-sided signed-rank test base |C| > new |C| (secondary; Holm-correct it
    across comparisons with ``holm``); rel_change: (new − base) / base of every bias metric.
    """
    if list(base_result.get("tuple_id", [])) != list(new_result.get("tuple_id", [])):
        raise UserError("compare() needs both results evaluated on the same questions (tuple ids differ); "
                        "evaluate both conditions on the same split")
    keys = BIAS_KEYS
    boot = (cluster_bootstrap_delta(base_result["tuples"], new_result["tuples"], n_resamples=n_resamples, seed=seed)
            if "tuples" in base_result and "tuples" in new_result and base_result["tuples"]["C"] else None)
    return {
        "bootstrap": boot,
        "wilcoxon": wilcoxon_abs_bias(base_result["abs_bias"], new_result["abs_bias"], alternative="greater"),
        "rel_change": {k: _rel(base_result.get(k), new_result.get(k)) for k in keys},
        "base": {k: base_result.get(k) for k in keys},
        "new": {k: new_result.get(k) for k in keys},
    }

"""Statistics on per-tuple C: the sign-flip permutation null of μ and η, the paired cluster bootstrap of
Δμ and Δmean|C| (attributes resampled), a one-sided Wilcoxon test on |C| and Holm's correction.
"""

from __future__ import annotations

import numpy as np

from refine_llm.errors import UserError
from refine_llm.metrics.unqover import Cells, by_category, mu_eta, mu_eta_from_tables

__all__ = ["permutation_null", "flip_draws", "null_summary", "wilcoxon_abs_bias", "holm", "cluster_bootstrap_delta"]


def permutation_null(C, subj_a: list, subj_b: list, attribute_id: list, n_resamples: int = 1000,
                     seed: int = 0, alpha: float = 0.05) -> dict:
    """Sign-flip permutation null of μ and η for ONE category.

    Under "no subject-attribute association" each tuple's C is symmetric about 0, so flipping the
    sign of every tuple independently (R x N Rademacher draws, seeded) gives the μ, η a model with
    the same |C| but no preference would show. μ is a mean of maxima, so it is positive even then;
    a bias counts only above this floor. p = (1 + #{null >= observed}) / (1 + R).
    Returns {mu, eta: {observed, null_mean, null_p95, p, above}} (above: p < alpha).
    """
    C = np.asarray(C, dtype=float)
    if not len(C):
        return {k: {"observed": None, "null_mean": None, "null_p95": None, "p": None, "above": False} for k in ("mu", "eta")}
    cells = Cells(subj_a, subj_b, attribute_id)
    obs = mu_eta_from_tables(*cells.tables(C))
    null = flip_draws(cells, C, n_resamples, seed)
    return {k: null_summary(float(obs[i]), null[i], alpha) for i, k in enumerate(("mu", "eta"))}


def flip_draws(cells: Cells, C: np.ndarray, n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(R,) μ and η of R sign-flipped copies of C (Rademacher signs per tuple, seeded)."""
    flips = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=(n_resamples, len(C)))  # (R, N)
    mus, etas = [], []
    for s in range(0, n_resamples, 200):  # (200, X, A) tables at a time: bounded memory
        m, e = mu_eta_from_tables(*cells.tables(flips[s:s + 200] * C))
        mus.append(m)
        etas.append(e)
    return np.concatenate(mus), np.concatenate(etas)


def null_summary(obs: float, null: np.ndarray, alpha: float) -> dict:
    p = float((1 + np.sum(null >= obs - 1e-12)) / (1 + len(null)))
    return {"observed": obs, "null_mean": float(null.mean()), "null_p95": float(np.quantile(null, 0.95)),
            "p": p, "above": bool(p < alpha), "n_resamples": int(len(null))}



def wilcoxon_abs_bias(absB_base, absB_new, alternative: str = "greater") -> dict:
    """Paired Wilcoxon signed-rank test on per-tuple |C| (same tuples, same order) before/after.

    alternative="greater" (default, one-sided) tests base > new: debiasing reduced bias. A secondary
    test: it treats tuples that share names and attributes as independent. All-zero differences: p=1.
    """
    from scipy.stats import wilcoxon

    a, b = np.asarray(absB_base, dtype=float), np.asarray(absB_new, dtype=float)
    if a.shape != b.shape:
        raise UserError(f"wilcoxon_abs_bias needs the same tuples in both runs, got {a.shape} and {b.shape}; "
                        f"evaluate both conditions on the same questions split")
    d = a - b
    out = {"n": int(len(d)), "median_diff": float(np.median(d)) if len(d) else None,
           "mean_base": float(a.mean()) if len(a) else None, "mean_new": float(b.mean()) if len(b) else None,
           "alternative": alternative, "sidedness": "two-sided" if alternative == "two-sided" else "one-sided"}
    if len(d) == 0 or np.all(np.abs(d) <= 1e-15):
        return {**out, "statistic": 0.0, "p_value": 1.0}
    res = wilcoxon(a, b, alternative=alternative, zero_method="wilcox")
    return {**out, "statistic": float(res.statistic), "p_value": float(res.pvalue)}


def holm(pvalues: dict[str, float | None]) -> dict[str, float | None]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone), by name; None stays None."""
    items = sorted(((p, k) for k, p in pvalues.items() if p is not None))
    m, out, running = len(items), {k: None for k in pvalues}, 0.0
    for i, (p, k) in enumerate(items):
        running = max(running, min(1.0, (m - i) * p))
        out[k] = running
    return out


def cluster_bootstrap_delta(base: dict, new: dict, n_resamples: int = 1000, confidence: float = 0.95,
                            seed: int = 0) -> dict:
    """Paired cluster-bootstrap CIs of Δμ and Δmean|C| (new − base), resampling attributes.

    base/new: the ``tuples`` blocks of two ``evaluate`` results on the same tuples (C, subj_a, subj_b,
    attribute_id, category). Each resample draws, within each category, as many attributes as it has
    with replacement; every tuple of a drawn attribute enters with that multiplicity, in both
    conditions at once (paired). Pooled Δ = mean over categories. Percentile intervals.
    Returns {"mu": {delta, low, high}, "mean_abs_c": {...}, per_category: {cat: {...}}}.
    """
    if list(base["tuple_id"]) != list(new["tuple_id"]):
        raise UserError("cluster_bootstrap_delta needs both conditions on the same tuples; evaluate them on one split")
    Cb, Cn = np.asarray(base["C"], dtype=float), np.asarray(new["C"], dtype=float)
    rng = np.random.default_rng(seed)
    lo_q, hi_q = (1 - confidence) / 2, (1 + confidence) / 2
    per_cat, pooled = {}, {"mu": [], "mean_abs_c": [], "mu_obs": [], "abs_obs": []}
    for cat, ix in by_category(base["category"], len(Cb)).items():
        sa, sb = [base["subj_a"][i] for i in ix], [base["subj_b"][i] for i in ix]
        cells = Cells(sa, sb, [base["attribute_id"][i] for i in ix])
        draws = rng.integers(0, cells.A, size=(n_resamples, cells.A))  # (R, A) attribute draws
        mult = np.stack([np.bincount(d, minlength=cells.A) for d in draws]).astype(float)  # (R, A)
        W = mult[:, cells.attr_code]  # (R, n) tuple weights
        mu_of = lambda c: np.concatenate([  # (R,) μ per resample, 200 tables at a time
            mu_eta_from_tables(*cells.tables(np.broadcast_to(c, W[j:j + 200].shape), W[j:j + 200]))[0]
            for j in range(0, n_resamples, 200)])
        mb, mn = mu_of(Cb[ix]), mu_of(Cn[ix])
        wsum = np.maximum(W.sum(1), 1e-12)
        ab = (W * np.abs(Cb[ix])).sum(1) / wsum
        an = (W * np.abs(Cn[ix])).sum(1) / wsum
        d_mu, d_abs = mn - mb, an - ab
        att = [base["attribute_id"][i] for i in ix]
        mu_obs = mu_eta(Cn[ix], sa, sb, att)[0] - mu_eta(Cb[ix], sa, sb, att)[0]
        abs_obs = float(np.abs(Cn[ix]).mean() - np.abs(Cb[ix]).mean())
        per_cat[cat] = {"mu": _ci_block(mu_obs, d_mu, lo_q, hi_q), "mean_abs_c": _ci_block(abs_obs, d_abs, lo_q, hi_q)}
        pooled["mu"].append(d_mu)
        pooled["mean_abs_c"].append(d_abs)
        pooled["mu_obs"].append(mu_obs)
        pooled["abs_obs"].append(abs_obs)
    if not per_cat:
        return {"mu": None, "mean_abs_c": None, "per_category": {}, "n_resamples": 0}
    return {"mu": _ci_block(float(np.mean(pooled["mu_obs"])), np.mean(pooled["mu"], axis=0), lo_q, hi_q),
            "mean_abs_c": _ci_block(float(np.mean(pooled["abs_obs"])), np.mean(pooled["mean_abs_c"], axis=0), lo_q, hi_q),
            "per_category": per_cat, "n_resamples": n_resamples, "confidence": confidence,
            "resampled": "attributes (within category), paired"}


def _ci_block(delta: float, boot: np.ndarray, lo_q: float, hi_q: float) -> dict:
    boot = boot[np.isfinite(boot)]
    if not len(boot):
        return {"delta": delta, "low": None, "high": None, "excludes_zero": False}
    lo, hi = np.quantile(boot, [lo_q, hi_q])
    return {"delta": float(delta), "low": float(lo), "high": float(hi), "excludes_zero": bool(lo > 0 or hi < 0)}


"""Debiasing baselines that need no (or almost no) training, to place every head on the bias-utility plane.

A head that only flattens the top-k lowers |C| for free: at temperature T -> inf every answer is 50/50.
So a head earns credit only where its point lies below what these cheap transforms reach:

    temperature curve   log_softmax(top-k log-probs / T) for T in TEMPERATURES (T = 1: base, 1e9: uniform)
    top2-equal          the two most likely slots share their mass equally (parameter-free; keeps the rest)
    rank-bias           an input-independent head: identity plus a learned bias per rank (k parameters),
                        trained with the main job's trainer and objective on the train split
                        (``methods.heads.RankBiasHead``)
    uniform             every top-k slot equal (T -> inf; the "uniform" condition of the report)

(Swap-averaging, scoring both name orders and averaging, only lowers δ: C already averages both orders.)

``plane_verdicts`` says, for each trained head, whether its point lies below the temperature curve
(lower μ, and lower mean|C|, than the curve at the head's utility = mean P(gold) share) and whether it
dominates the parameter-free points (no worse on μ, mean|C|, P(gold) share and KL, better on one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from refine_llm.methods.protocol import Method, Output, Scores

__all__ = ["TEMPERATURES", "PARAMETER_FREE", "temperature_logprobs", "top2_equalise", "Uniform", "Top2Equal",
           "Temperature", "temperature_curve", "plane_verdicts"]

TEMPERATURES = (1.0, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0, 1e9)
PARAMETER_FREE = ("uniform", "top2-equal")
PLANE_KEYS = ("mu", "mean_abs_c", "gold_share", "kl_base", "specified_accuracy", "answer_mass")


def temperature_logprobs(topk_logprobs, T: float) -> torch.Tensor:
    """(M, k) log_softmax(top-k log-probs / T)."""
    return torch.log_softmax(torch.as_tensor(topk_logprobs, dtype=torch.float32) / T, dim=-1)


def top2_equalise(topk_logprobs) -> torch.Tensor:
    """(M, k) log-probs with the two most likely slots at the mean of their probabilities."""
    lp = torch.log_softmax(torch.as_tensor(topk_logprobs, dtype=torch.float32), dim=-1)
    p = lp.exp()
    top = p.topk(2, dim=-1).indices  # (M, 2)
    mean = p.gather(1, top).mean(-1, keepdim=True).expand(-1, 2)
    return p.scatter(1, top, mean).clamp_min(1e-30).log()


@dataclass
class Uniform(Method):
    """Every top-k slot equal (T -> inf): what flattening alone gets."""

    kind: ClassVar[str] = "uniform"
    name: str = "uniform"

    def apply(self, base: Scores, own: dict[str, Scores] | None = None) -> Output:
        return Output.from_topk(torch.full((len(base), base.k), -math.log(base.k), dtype=torch.float32), base)


@dataclass
class Top2Equal(Method):
    """The two most likely slots share their mass equally (parameter-free; keeps the rest)."""

    kind: ClassVar[str] = "top2-equal"
    name: str = "top2-equal"

    def apply(self, base: Scores, own: dict[str, Scores] | None = None) -> Output:
        return Output.from_topk(top2_equalise(base.topk_logprobs), base)


@dataclass
class Temperature(Method):
    """The top-k at temperature ``temperature`` (1: base; 1e9: uniform): a point of the temperature curve."""

    kind: ClassVar[str] = "temperature"
    temperature: float = 2.0
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or f"T={self.temperature:g}"

    def apply(self, base: Scores, own: dict[str, Scores] | None = None) -> Output:
        return Output.from_topk(temperature_logprobs(base.topk_logprobs, self.temperature), base)


def temperature_curve(evaluator, base: Scores) -> list[dict]:
    """The registry's plane metrics of the top-k at each temperature (``Temperature`` methods, evaluated by
    ``evaluator`` (evaluation.Evaluator) on the base's scores, not kept as conditions)."""
    out = []
    for T in TEMPERATURES:
        o = Temperature(T).apply(base)
        r = evaluator.add(f"T={T:g}", o.p_topk, o.p_full, topk_logprobs=o.topk_logprobs, keep=False)
        # per category too: each category's heads are read against that category's curve (plane_verdicts)
        cats = {c: {k: b.get(k) for k in PLANE_KEYS} for c, b in (r.get("per_category") or {}).items()}
        out.append({"temperature": T, **{k: r.get(k) for k in PLANE_KEYS}, **({"per_category": cats} if cats else {})})
    return out


def _curve_at(curve: list[dict], x: float, key: str) -> float | None:
    pts = sorted((c["gold_share"], c[key]) for c in curve if c.get("gold_share") is not None and c.get(key) is not None)
    if not pts or x is None:
        return None
    return float(np.interp(x, [p[0] for p in pts], [p[1] for p in pts]))


def _dominates(h: dict, p: dict) -> bool | None:
    """h no worse than p on μ, mean|C|, P(gold) share and KL to base, strictly better on one."""
    pairs = [(h.get("mu"), p.get("mu"), -1), (h.get("mean_abs_c"), p.get("mean_abs_c"), -1),
             (h.get("gold_share"), p.get("gold_share"), 1), (h.get("kl_base"), p.get("kl_base"), -1)]
    pairs = [(a, b, s) for a, b, s in pairs if a is not None and b is not None]
    if not pairs:
        return None
    no_worse = all(s * (a - b) >= -1e-12 for a, b, s in pairs)
    better = any(s * (a - b) > 1e-12 for a, b, s in pairs)
    return bool(no_worse and better)


def _verdict(r: dict, curve: list[dict], points: dict[str, dict]) -> dict:
    """One head's point ``r`` (plane metrics) against ``curve`` and the parameter-free ``points``."""
    mu_c = _curve_at(curve, r.get("gold_share"), "mu")
    abs_c = _curve_at(curve, r.get("gold_share"), "mean_abs_c")
    below = None if mu_c is None or r.get("mu") is None else bool(r["mu"] < mu_c and r["mean_abs_c"] < abs_c)
    dom = {p: _dominates(r, v) for p, v in points.items()}
    # A LoRA adapter can gain utility: past the curve's most useful point (T = 1, base) the curve is read
    # there (np.interp holds its end value), which is lenient, since sharpening (T < 1) is not on it.
    shares = [c["gold_share"] for c in curve if c.get("gold_share") is not None]
    past = None if not shares or r.get("gold_share") is None else bool(r["gold_share"] > max(shares) + 1e-9)
    return {"gold_share": r.get("gold_share"), "mu": r.get("mu"), "curve_mu_at_gold_share": mu_c,
            "past_curve_end": past,
            "curve_mean_abs_c_at_gold_share": abs_c, "below_temperature_curve": below,
            "dominates": dom, "dominates_all_parameter_free": bool(dom) and all(v is True for v in dom.values())}


def plane_verdicts(results: dict[str, dict], curve: list[dict], heads: list[str]) -> dict[str, dict]:
    """For each head: the temperature curve's μ and mean|C| at the head's P(gold) share, whether the
    head lies below it on both, and whether it dominates each parameter-free point; under ``per_category``
    the same per category, against that category's curve and points (the report's per-category comparison)."""
    cats = {cat for c in curve for cat in (c.get("per_category") or {})}
    curves = {cat: [{"temperature": c["temperature"], **c["per_category"][cat]} for c in curve
                    if cat in (c.get("per_category") or {})] for cat in cats}
    points = {cat: {p: results[p]["per_category"][cat] for p in PARAMETER_FREE
                    if cat in (results.get(p, {}).get("per_category") or {})} for cat in cats}
    out = {}
    for h in heads:
        r = results[h]
        out[h] = _verdict(r, curve, {p: results[p] for p in PARAMETER_FREE if p in results})
        per = {cat: _verdict(rc, curves[cat], points[cat]) for cat, rc in (r.get("per_category") or {}).items()
               if cat in curves}
        if per:
            out[h]["per_category"] = per
    return out

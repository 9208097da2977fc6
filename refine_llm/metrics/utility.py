"""Utility and competence on specified questions, the shift of a distribution from base, and the
candidate probabilities of a top-k distribution (the one formula every condition goes through).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["specified_accuracy", "GOLD_FLOOR", "gold_share", "specified_utility", "distribution_shift", "answer_mass",
           "topk_miss_rate", "candidate_probs", "candidate_probs_full"]


def specified_accuracy(p_pos, gold_pos, alpha: float = 0.05) -> dict:
    """Accuracy on specified questions: the candidate with the larger probability is the gold one.

    p_pos (M, 2), gold_pos (M,) in {0, 1}. Ties count half (an all-0.5 model scores exactly chance).
    ``noise_band`` is the normal-approximation 95% half-width 1.96 sqrt(0.25/M); ``p_value`` the
    two-sided exact binomial test against 0.5; ``at_chance``: p_value >= alpha.
    """
    from scipy.stats import binomtest

    p = np.asarray(p_pos, dtype=float)
    gold = np.asarray(gold_pos, dtype=np.int64)
    n = int(len(gold))
    if n == 0:
        return {"accuracy": None, "n": 0, "chance": 0.5, "noise_band": None, "p_value": None, "at_chance": True}
    pg = p[np.arange(n), gold]
    po = p[np.arange(n), 1 - gold]
    correct = (pg > po).astype(float) + 0.5 * (pg == po)
    acc = float(correct.mean())
    pv = float(binomtest(int(round(correct.sum())), n, 0.5).pvalue)
    return {"accuracy": acc, "n": n, "chance": 0.5, "noise_band": 1.96 * math.sqrt(0.25 / n),
            "p_value": pv, "at_chance": bool(pv >= alpha)}


GOLD_FLOOR = 1e-6  # probability floor for the log-loss (a name outside the top-k has probability 0)


def gold_share(p_pos, gold_pos) -> np.ndarray:
    """Per question P(gold)/(P(gold)+P(other)) (M,); 0.5 when neither name has probability."""
    p = np.asarray(p_pos, dtype=float)
    gold = np.asarray(gold_pos, dtype=np.int64)
    pg, po = p[np.arange(len(gold)), gold], p[np.arange(len(gold)), 1 - gold]
    tot = pg + po
    return np.where(tot > 0, pg / np.where(tot > 0, tot, 1.0), 0.5)


def specified_utility(p_pos, gold_pos) -> dict:
    """gold_share (mean P(gold)/(P(gold)+P(other))), gold_logloss (mean -log of it, floored at
    GOLD_FLOOR) and specified_accuracy on specified questions; None for no question."""
    share = gold_share(p_pos, gold_pos)
    if not len(share):
        return {"gold_share": None, "gold_logloss": None, "specified_accuracy": None}
    return {"gold_share": float(share.mean()),
            "gold_logloss": float(-np.log(np.maximum(share, GOLD_FLOOR)).mean()),
            "specified_accuracy": specified_accuracy(p_pos, gold_pos)["accuracy"]}


def distribution_shift(base_logp, new_logp) -> tuple[np.ndarray, np.ndarray]:
    """Per-row KL(base ‖ new) (nats) and total variation of two distributions over the same k slots.

    base_logp, new_logp: (M, k) log-probabilities (each row renormalised here over its k slots, as
    the top-k distribution the metrics use). Returns (kl (M,), tv (M,))."""
    from scipy.special import log_softmax

    lb = log_softmax(np.asarray(base_logp, dtype=np.float64), axis=-1)
    ln = log_softmax(np.asarray(new_logp, dtype=np.float64), axis=-1)
    pb, pn = np.exp(lb), np.exp(ln)
    with np.errstate(invalid="ignore"):
        kl = np.where(pb > 0, pb * (lb - ln), 0.0).sum(-1)
    return np.maximum(kl, 0.0), 0.5 * np.abs(pb - pn).sum(-1)


def answer_mass(p_pos) -> float:
    """Mean of P(subj1) + P(subj2) over prompts: how much probability the model puts on the answers."""
    p = np.asarray(p_pos, dtype=float)
    return float(np.mean(p[:, 0] + p[:, 1])) if len(p) else float("nan")


def topk_miss_rate(cand_in_topk) -> float:
    """Share of prompts where neither candidate is in the top-k.

    cand_in_topk: (M, 2) bool per candidate, or (M,) bool "some candidate is in the top-k"."""
    c = np.asarray(cand_in_topk, dtype=bool)
    if not len(c):
        return float("nan")
    hit = c if c.ndim == 1 else (c[:, 0] | c[:, 1])
    return float(np.mean(~hit))



# ---------------------------------------------------------------------------------------------
# Candidate probabilities of a distribution over the top-k: the one formula


def _is_torch(x) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def candidate_probs(logprobs, cand_mask, renormalise: bool = False):
    """(M, S) mass of each candidate's top-k tokens: ``logprobs`` (M, k) over the top-k slots, ``cand_mask``
    (M, S, k) bool (which slots hold a first token of candidate s; S = 2 names, 3 BBQ answers).

    ``renormalise``: ``logprobs`` are the full-vocabulary log-probs of the top-k (a score cache's
    ``topk_logprobs``), so they are softmaxed over the k slots first (the paper's convention: the top-k
    renormalised); otherwise they already form a distribution over the k slots (a method's output).
    numpy in, float64 numpy out; torch in, torch out (differentiable: the bandit trains through it).
    A candidate with no token in the top-k gets 0.
    """
    if _is_torch(logprobs):
        lp = logprobs.log_softmax(-1) if renormalise else logprobs
        p = lp.exp()  # (M, k)
        return (p.unsqueeze(1) * cand_mask.to(p.dtype)).sum(-1)
    lp = np.asarray(logprobs, dtype=np.float64)  # (M, k)
    mask = np.asarray(cand_mask, dtype=bool)  # (M, S, k)
    if renormalise:
        lp = lp - lp.max(axis=1, keepdims=True)
        q = np.exp(lp)
        q /= q.sum(axis=1, keepdims=True)
    else:
        q = np.exp(lp)
    return np.einsum("mk,msk->ms", q, mask.astype(np.float64))


def candidate_probs_full(logprobs, cand_mask, topk_logprobs, cand_logprobs):
    """(M, S) full-vocabulary candidate probabilities after a method acted on the top-k (torch).

    The method redistributes the original top-k mass m = sum_j exp(topk_logprobs_j) over the top-k (new
    top-k probability = its probability x m); every token outside the top-k keeps its probability. So
    p_c = exp(cand_logprobs_c) - sum_{j in c} p_orig_j + m * sum_{j in c} p_method_j.
    ``logprobs`` (M, k): the method's distribution over the top-k; ``topk_logprobs`` (M, k) and
    ``cand_logprobs`` (M, S): the base model's full-vocabulary log-probs (the score cache)."""
    p_orig = topk_logprobs.float().exp()  # (M, k) full-vocabulary probabilities
    mass = p_orig.sum(-1, keepdim=True)  # (M, 1)
    mask = cand_mask.to(p_orig.dtype)
    outside = (cand_logprobs.float().exp() - (p_orig.unsqueeze(1) * mask).sum(-1)).clamp_min(0.0)
    return outside + mass * candidate_probs(logprobs.float(), cand_mask)

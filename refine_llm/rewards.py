"""The one reward: what a head (``refine_llm.bandit``) and a LoRA adapter (``refine_llm.baselines.lora``)
are trained for, and the estimators of its gradient. Imports only ``refine_llm.metrics`` of ours.

A policy answers each prompt with one of its top-k tokens: ``logp`` (R, k) log-probs over the prompt's
top-k (a head's output, or the adapted model's renormalised top-k), and ``cand_mask`` (R, 2, k) says which
top-k tokens are a first token of subject 1 / subject 2 (by position). An underspecified tuple is 4
consecutive rows in (order, polarity) order: rows 4n..4n+3 = (0,0), (0,1), (1,0), (1,1), the layout of
``metrics.tuple_index``'s ``rows[n].reshape(-1)``. Its comparative bias C (``metrics.tuple_bias``) is
linear in the answer probabilities.

The objective (maximised; losses below are its negative), per tuple and per specified question:

    J = -C(P)^2  +  w_mass * mass(P)  +  lambda * (P(gold) - kl_weight * KL(base || policy))
        - anchor_weight * KL_anchor(base || policy)

- Tuple reward. Two independent sampled joint answers s, t of a tuple (one token per prompt, each a
  one-hot answer: subject 1, subject 2 or neither) give ``tuple_reward`` r = -C_s * C_t. C is linear, so
  E[r] = -C(P)^2: zero exactly for unbiased policies. A reward of -|C_s| on one sample would instead
  prefer *deterministic* answers (E|C(a)| >= |C(E a)|), whose zero-bias optima on 4-tuples are positional
  ("always the first-named"), not 50/50.
- mass(P) = P(subj1) + P(subj2) (reward 1 when a sampled token names either subject): without it,
  putting all mass on non-answers ("the", ",") is also a zero-bias optimum.
- P(gold) on specified questions (reward 1 for a sampled gold token) and KL(base || policy) on the same
  prompts (deterministic; the base is the frozen model's distribution over the same support), the
  utility terms: they keep answers where the context decides them.
- KL_anchor: KL(base || policy) on prompts that name nobody (half of the unrelated prompts' families,
  ``evaluation.unrelated_questions(part="anchor")``): keeps a head out of the way where there is
  nothing to debias; the report measures the other families.

Estimators (``objective``):
- ``direct``: the gradient of J itself, in closed form (every term is a known differentiable function of
  the policy's probabilities). Deterministic, no sampling noise.
- ``reinforce``: a contextual bandit on S sampled answers per prompt, with a true leave-one-out baseline.
  For a per-prompt reward r_s (mass, gold) the advantage is A_s = r_s - mean_{t != s} r_t, which does not
  depend on a_s, so E[A_s grad log pi(a_s)] = grad E[r]. For the tuple reward, with c_s = C of joint
  sample s and m_s = mean_{t != s} c_t (an unbiased estimate of C(P) that is independent of sample s):
  grad C(P)^2 = 2 C(P) grad C(P) = E[2 m_s (c_s - m_s) grad log pi(a_s)], where log pi(a_s) sums over
  the tuple's 4 prompts and m_s is both the stand-in for C(P) and the leave-one-out baseline of c_s. So
  loss = (2/S) sum_s m_s (c_s - m_s) log pi(a_s) has the exact gradient of C(P)^2 in expectation
  (tests/test_rewards.py averages many draws). S >= 2; with S = 2 the estimate is not zero (a mean
  baseline that includes the sample cancels r_1 = r_2 = -c_1 c_2 exactly: that estimator had no signal).
- ``paper`` (heads only): the authors' update, kept for reproduction (``paper_loss``).

The objective names live in ``refine_llm.config`` (OBJECTIVES, LORA_OBJECTIVES); the old names
``expected`` (heads, now ``direct``) and ``bandit`` (LoRA, now ``reinforce``) are refused there in one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from refine_llm import metrics

__all__ = ["Weights", "tuple_c",
           "reference_scale", "tuple_reward", "expected_tuple_reward", "policy_loss", "kl_to_base", "paper_loss"]

_PAPER_EPS = 1e-6  # F.pairwise_distance default eps, as in the authors' calculate_manhattan


@dataclass(frozen=True)
class Weights:
    """The weights of J's terms (see the module docstring)."""

    answer_mass: float = 0.0
    utility: float = 0.0
    kl: float = 0.0
    anchor: float = 0.0


# ---------------------------------------------------------------------------------------------
# the tuple reward, from metrics


def _local_rows(n: int, device) -> torch.Tensor:
    return torch.arange(4 * n, device=device).reshape(n, 2, 2)


def tuple_c(p_pos: torch.Tensor) -> torch.Tensor:
    """(4n, 2) answer probabilities by position, tuples in consecutive blocks of 4 -> (n,) signed C."""
    return metrics.tuple_bias(metrics.gather_tuples(p_pos, _local_rows(len(p_pos) // 4, p_pos.device)))


def reference_scale() -> float:
    """1 / C of a fully stereotyped tuple under ``metrics.tuple_bias``: multiplies a C of metrics into
    UnQover's reference scale (C = 1 for a fully stereotyped tuple), whatever scale metrics uses."""
    p = torch.zeros(4, 2, dtype=torch.float64)
    # rows (order, polarity): the subject at position o ^ q is named; it is subject a for the
    # attribute (q = 0) and subject b for the negation (q = 1)
    for r, (o, q) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
        p[r, o ^ q] = 1.0
    return float(1.0 / tuple_c(p)[0])


def tuple_reward(c: torch.Tensor) -> torch.Tensor:
    """(S, n) C of S independent joint samples per tuple -> (S, n) rewards r_s = -c_s * mean_{t != s} c_t
    (unbiased for -C(P)^2). S >= 2."""
    S = c.shape[0]
    return -c * (c.sum(0, keepdim=True) - c) / (S - 1)


def expected_tuple_reward(p_pos: torch.Tensor) -> torch.Tensor:
    """(4n, 2) -> (n,) E[tuple_reward] = -C(P)^2, in closed form."""
    return -tuple_c(p_pos) ** 2


def kl_to_base(base_logp: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """(R, V) log-probs of the frozen base and of the policy over the same support -> (R,) KL(base || policy)."""
    return (base_logp.exp() * (base_logp - logp)).sum(-1)


# ---------------------------------------------------------------------------------------------
# the loss


def _loo(r: torch.Tensor, dim: int) -> torch.Tensor:
    """Leave-one-out mean along ``dim``: entry s is the mean of the other entries."""
    S = r.shape[dim]
    return (r.sum(dim, keepdim=True) - r) / (S - 1)


def _sample(logp: torch.Tensor, samples: int, g: torch.Generator | None) -> torch.Tensor:
    """(R, k) -> (R, S) sampled top-k positions (drawn on CPU so that a seeded generator reproduces them)."""
    return torch.multinomial(logp.detach().exp().float().cpu(), samples, replacement=True, generator=g).to(logp.device)


def policy_loss(
    logp: torch.Tensor,
    cand_mask: torch.Tensor,
    objective: str,
    weights: Weights,
    *,
    samples: int = 8,
    generator: torch.Generator | None = None,
    spec_logp: torch.Tensor | None = None,
    spec_gold_mask: torch.Tensor | None = None,
    spec_kl: torch.Tensor | None = None,
    anchor_kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The loss -J (its estimate for ``reinforce``) and logs, for one batch.

    logp (4n, k) and cand_mask (4n, 2, k): the underspecified tuples' prompts in blocks of 4.
    spec_logp (m, k) + spec_gold_mask (m, k) bool (the gold subject's top-k tokens): specified questions
    for the P(gold) term. spec_kl (m,): KL(base || policy) on them (``kl_to_base``, computed by the caller
    on whatever support it has: the top-k for a head, the vocabulary for LoRA).
    anchor_kl (a,): KL(base || policy) on prompts with nothing to debias (deterministic, both objectives).
    Logs: abs_c (mean |C(P)|, the metric), reward (mean tuple reward), answer_rate, utility (mean P(gold)), kl,
    anchor_kl.
    """
    n = len(logp) // 4
    if len(logp) != 4 * n or cand_mask.shape[:1] != logp.shape[:1]:
        raise ValueError(f"logp must be (4n, k) with a (4n, 2, k) cand_mask, got {tuple(logp.shape)}, "
                         f"{tuple(cand_mask.shape)}")
    p_pos = metrics.candidate_probs(logp, cand_mask)  # (4n, 2)
    logs = {"abs_c": tuple_c(p_pos.detach()).abs().mean().item(),
            "answer_mass": p_pos.detach().sum(-1).mean().item()}
    if objective == "direct":
        r = expected_tuple_reward(p_pos)  # (n,)
        loss = -r.mean() - weights.answer_mass * p_pos.sum(-1).mean()
        logs["reward"] = r.mean().item()
        logs["answer_rate"] = logs["answer_mass"]
    elif objective == "reinforce":
        if samples < 2:
            raise ValueError(f"reinforce needs samples >= 2 for its leave-one-out baseline, got {samples}")
        S = samples
        a = _sample(logp, S, generator)  # (4n, S)
        logp_a = logp.gather(1, a)  # (4n, S)
        ans = cand_mask.to(logp.dtype).gather(2, a.unsqueeze(1).expand(-1, 2, -1)).transpose(1, 2)  # (4n, S, 2)
        c = tuple_c(ans.transpose(0, 1).reshape(S * 4 * n, 2)).view(S, n)  # (S, n) C of each joint sample
        m = _loo(c, 0)  # (S, n)
        logp_joint = logp_a.view(n, 4, S).sum(1).T  # (S, n)
        loss = (2.0 / S) * (m * (c - m) * logp_joint).sum(0).mean()
        logs["reward"] = tuple_reward(c).mean().item()
        if weights.answer_mass:
            hit = ans.sum(-1)  # (4n, S) 1 = the sample named a subject
            loss = loss - weights.answer_mass * ((hit - _loo(hit, 1)) * logp_a).mean()
            logs["answer_rate"] = hit.mean().item()
    else:
        raise ValueError(f"objective={objective!r}: policy_loss takes reinforce or direct (paper: paper_loss)")
    if spec_logp is not None and len(spec_logp) and weights.utility:
        gmask = spec_gold_mask.to(spec_logp.dtype)  # (m, k)
        p_gold = (spec_logp.exp() * gmask).sum(-1)  # (m,)
        if objective == "direct":
            util = -p_gold.mean()
        else:
            sa = _sample(spec_logp, samples, generator)  # (m, S)
            hit = gmask.gather(1, sa)  # (m, S) 1 = sampled a gold token
            util = -((hit - _loo(hit, 1)) * spec_logp.gather(1, sa)).mean()
        if spec_kl is not None and weights.kl:
            util = util + weights.kl * spec_kl.mean()
            logs["kl"] = spec_kl.detach().mean().item()
        loss = loss + weights.utility * util
        logs["utility"] = p_gold.detach().mean().item()
    if anchor_kl is not None and len(anchor_kl) and weights.anchor:
        loss = loss + weights.anchor * anchor_kl.mean()
        logs["anchor_kl"] = anchor_kl.detach().mean().item()
    return loss, logs


def paper_loss(p_pos: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The authors' update (rameez-mrq/refine-lm-submission: training_llm.py, redubias/calc_bias.py
    calculate_reward and calculate_batch_manhattan), from the minibatch's (4n, 2) candidate probabilities.

    reward r_n = -|C_n| on UnQover's reference scale (``reference_scale``), detached; each tuple's (4, 2)
    probabilities are L1-normalised over its 4 prompts (per candidate column) and d_n = mean over the
    first 4 tuples j of the minibatch and the 4 prompts of ||x_n[i] - x_j[i] + 1e-6||_1; loss =
    -mean_n(r_n * log d_n). Not a policy gradient: see ``refine_llm.bandit``'s docstring."""
    n = len(p_pos) // 4
    x = p_pos.view(n, 4, 2)
    with torch.no_grad():
        C = tuple_c(p_pos)
        r = -(reference_scale() * C).abs()  # (n,)
    xn = F.normalize(x, p=1, dim=1)  # their normalize(): L1 over the 4 prompts, per candidate column
    first = xn[:4]  # their calculate_manhattan keeps only the first chunk of len(vector)=4 tuples
    d = F.pairwise_distance(xn.unsqueeze(1), first.unsqueeze(0), p=1, eps=_PAPER_EPS).mean((1, 2))  # (n,)
    loss = -(torch.log(d) * r).mean()
    return loss, {"reward": r.mean().item(), "abs_c": C.abs().mean().item()}

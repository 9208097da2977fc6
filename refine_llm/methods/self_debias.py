"""Self-Debias (Schick, Udupa & Schütze 2021, "Self-Diagnosis and Self-Debiasing") on the answer slot.

The model is asked the question twice: as is (x), and behind each bias-inducing prefix
(sdb_i(x) = "The following text discriminates against people because of their gender:" + x; the
prefixes and where they go: refine_llm.prompt_variants). A token that some prefix makes *more* likely
than the plain prompt does is one the model associates with the bias, and is down-weighted:

    Δ(w, x) = p(w | x) - max_i p(w | sdb_i(x))
    α(Δ)    = 1 if Δ >= 0 else max(exp(λ Δ), ε)            λ = 50 (the paper's default)
    p̃(w|x) ∝ α(Δ(w, x)) p(w | x)

p are full-vocabulary probabilities (the paper's, and what ``topk_logprobs`` holds). ε = 0.01 is the
floor of the authors' code (timoschick/self-debiasing, ``SelfDebiasingLogitsProcessor``: "minimum factor
by which each probability is multiplied"); ε = 0 is the formula as printed. The result is renormalised
over the base pass's top-k slots, as the heads' outputs are, so it goes on the bias-utility plane
exactly like a head: same slots, KL(base || self-debias) by ``metrics.distribution_shift``.

This module is the formula only (numpy, no model). The biased passes' log-probs at the base top-k ids
come from ``refine_llm.passes.score_at_ids``; refine_llm.method_runs.self_debias_logprobs runs them.
Cost: one extra forward per prompt and prefix (1 per category with the shipped prefixes file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from refine_llm.methods.protocol import Method, Output, Scores, ScorePass

__all__ = ["SelfDebiasConfig", "self_debias", "SelfDebias", "DECAY", "EPSILON"]

DECAY = 50.0  # λ, the paper's default
EPSILON = 0.01  # the authors' code's floor on α


@dataclass
class SelfDebiasConfig:
    """Self-Debias on the answer slot."""

    decay: float = field(default=DECAY, metadata={"help": "λ of α(Δ) = exp(λΔ) for Δ < 0 (Schick et al.: 50)."})
    epsilon: float = field(default=EPSILON, metadata={"help": "Floor of α (the authors' code: 0.01; 0: the "
                                                              "paper's formula as printed)."})
    prefixes: str | None = field(default=None, metadata={"help": "File of bias-inducing prefixes per category "
                                                                 "(default: prompts/self_debias_prefixes.txt)."})

    def __post_init__(self) -> None:
        if self.decay < 0:
            raise ValueError(f"decay must be >= 0, got {self.decay}")
        if not 0 <= self.epsilon <= 1:
            raise ValueError(f"epsilon must be in [0, 1], got {self.epsilon}")


def self_debias(base_logprobs, biased_logprobs, decay: float = DECAY, epsilon: float = EPSILON) -> np.ndarray:
    """Debiased (M, k) log-probs, renormalised over the k slots.

    base_logprobs (M, k): full-vocabulary log p(w | x) at the base top-k ids; biased_logprobs (M, P, k):
    log p(w | sdb_i(x)) at the SAME ids under each of P prefixes. Rows with a non-finite base are
    returned renormalised but otherwise unchanged (scoring flags them ``nonfinite``); a non-finite
    biased value counts as no evidence (Δ >= 0)."""
    lb = np.asarray(base_logprobs, dtype=np.float64)
    lp = np.asarray(biased_logprobs, dtype=np.float64)
    if lb.ndim != 2 or lp.ndim != 3 or lp.shape[0] != lb.shape[0] or lp.shape[2] != lb.shape[1]:
        raise ValueError(f"need base (M, k) and biased (M, P, k) log-probs, got {lb.shape} and {lp.shape}")
    p = np.exp(lb)  # (M, k)
    pb = np.exp(np.where(np.isfinite(lp), lp, -np.inf)).max(axis=1) if lp.shape[1] else np.zeros_like(p)  # (M, k)
    delta = p - pb  # (M, k)
    with np.errstate(invalid="ignore"):
        log_alpha = np.where(delta >= 0, 0.0, np.maximum(decay * delta, np.log(epsilon) if epsilon > 0 else -np.inf))
    log_alpha = np.where(np.isfinite(lb), log_alpha, 0.0)
    x = lb + log_alpha
    m = np.max(np.where(np.isfinite(x), x, -np.inf), axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = x - m - np.log(np.exp(x - m).sum(axis=1, keepdims=True))
    return out.astype(np.float32)


@dataclass
class SelfDebias(Method):
    """Self-Debias as a condition of the main job (``--extra-methods self-debias``): its passes
    (``ScorePass(bias_prefixes=...)``, one per prefix of each row's category, aligned to the base top-k ids)
    are scored by the score stage; ``apply`` is ``self_debias`` over the base's top-k slots."""

    kind: ClassVar[str] = "self-debias"
    name: str = "self-debias"
    config: SelfDebiasConfig = field(default_factory=SelfDebiasConfig)

    @classmethod
    def for_run(cls, cfg, run_dir) -> "SelfDebias":
        return cls()

    def passes(self) -> list[ScorePass]:
        return [ScorePass(self.kind, bias_prefixes=self.config.prefixes or "")]

    def apply(self, base: Scores, own: dict[str, Scores] | None = None) -> Output:
        import torch

        own = own or {}
        names = sorted((n for n in own if n.startswith(f"{self.kind}#")), key=lambda n: int(n.split("#")[1]))
        if not names:
            raise ValueError(f"{self.kind}: no scored prefix passes ({self.kind}#<i>) among {sorted(own)}")
        biased = np.stack([own[n].aligned_logprobs for n in names], axis=1)  # (M, P, k) at the base top-k ids
        lp = self_debias(base.topk_logprobs, biased, self.config.decay, self.config.epsilon)  # (M, k)
        return Output.from_topk(torch.as_tensor(lp), base)

    def info(self) -> dict:
        return {**super().info(), "decay": self.config.decay, "epsilon": self.config.epsilon, "training": "none",
                "extra_forward_per_prompt": "one per prefix", "served_by_vllm": "no (a second forward per step)"}

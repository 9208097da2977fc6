"""The top-k renormalisation every head starts from (its one home; ``refine_llm.methods.heads`` and
``refine_llm.methods.gate`` import it). A head is invariant to a constant shift of its input because it
renormalises first: serving may pass raw top-k logits instead of full-vocabulary log-probs."""

from __future__ import annotations

import torch

__all__ = ["NEG", "renormalise"]

NEG = -1e4  # finite stand-in for -inf log-probs (the authors use -1e10 on logits)


def renormalise(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """(B,k) -> (B,k) float32 log-probs renormalised over the top-k; -inf/nan clamped to finite."""
    x = torch.nan_to_num(topk_logprobs.float(), nan=NEG, neginf=NEG).clamp_min(NEG)
    return torch.log_softmax(x, dim=-1)

"""lm-evaluation-harness with a REFINE head: an ``HFLM`` that applies a saved head at the answer slot.

Install the extra (``pip install -e .[lm-eval]``; lm-eval 0.4.13 works with this project's
transformers 5.x). Any loglikelihood or multiple-choice task then runs with and without the head:

    python -m refine_llm.lm_eval_head --model refine-hf \
        --model_args pretrained=HuggingFaceTB/SmolLM2-135M-Instruct,head=runs/x/heads/logit/head \
        --tasks bbq_multiple_choice --batch_size 8          # lm-eval's own BBQ task, if its data loads
    lm_eval --model hf --model_args pretrained=... --tasks ...   # the same without the head

(``python -m refine_llm.lm_eval_head`` registers ``refine-hf`` and then runs lm-eval's own CLI, so every
lm-eval flag works, including ``--include_path`` for tasks with local data.) From Python:
``lm_eval.simple_evaluate(model=RefineHFLM(pretrained=model, tokenizer=tok, head=path), tasks=[...])``.

Where the head acts. For each request (context, continuation) lm-eval reads the log-probs of the
continuation's tokens. The head acts at exactly one position: the one that predicts the
continuation's *first* token, which is the answer slot where REFINE heads are trained (the next token
after the prompt). There the row's top-k (k = the head's) goes through the head and the top-k mass m is
redistributed: log p'(t) = log m + head_logprob(t) for the k tokens, every other token keeps its
log-prob (refine_llm.metrics.candidate_probs_full, the same rule as for UnQover and BBQ). The context
and the continuation's later tokens are untouched, so for multi-token answers only the first token is
debiased. Contextual heads receive the row's log-probs as their logits (their context projection is
shift-invariant). The head must match the model's tokenizer (checked by fingerprint).
"""

from __future__ import annotations

import sys

import torch

try:
    from lm_eval.api.registry import register_model
    from lm_eval.models.huggingface import HFLM
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"refine_llm.lm_eval_head needs lm-eval: pip install 'refine_llm[lm-eval]' ({e})") from e

from refine_llm.methods import heads as H
from refine_llm.vocab import tokenizer_fingerprint
from refine_llm.errors import UserError

__all__ = ["RefineHFLM", "apply_head_to_row", "main"]


def apply_head_to_row(head, lp_row: torch.Tensor, k: int | None = None) -> torch.Tensor:
    """(V,) log-softmax row -> (V,) row with ``head`` applied to its top-k (mass-preserving, see above): the
    one rule of a head on a live row, ``refine_llm.methods.heads.rewrite_topk``."""
    if k is not None and k != head.k:
        raise ValueError(f"k={k} but the head was trained with k={head.k}")
    ids, new = H.rewrite_topk(head, lp_row.float()[None])  # (1,k), (1,k)
    out = lp_row.float().clone()
    out[ids[0]] = new[0]
    return out.to(lp_row.dtype)


@register_model("refine-hf")
class RefineHFLM(HFLM):
    """``HFLM`` + a saved REFINE head (``head=`` a directory from refine_llm.methods.heads.save_head)."""

    def __init__(self, pretrained, head: str | None = None, **kwargs):
        super().__init__(pretrained=pretrained, **kwargs)
        if head is None:
            raise UserError("refine-hf needs head=<saved head directory> in --model_args (use --model hf without one)")
        w = self.model.get_output_embeddings().weight.detach().float().cpu()
        self.refine_head, cfg = H.load_head(head, expect_tokenizer_fingerprint=tokenizer_fingerprint(self.tokenizer),
                                            lm_head_weight=w)
        self.refine_head.to(self.device)
        self.refine_k = int(cfg["k"])

    def _select_cont_toks(self, logits, contlen=None, inplen=None):
        sel = super()._select_cont_toks(logits, contlen=contlen, inplen=inplen)  # (contlen, V) log-softmax
        if self.backend != "causal" or sel.shape[0] == 0:
            return sel
        sel = sel.clone()
        sel[0] = apply_head_to_row(self.refine_head, sel[0], self.refine_k)  # the answer slot only
        return sel


def main(argv: list[str] | None = None) -> int:
    """lm-eval's CLI with ``refine-hf`` registered."""
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A LoRA adapter as a condition: it brings its own scores (the adapted model scores the questions).

The adapter changes the model, so its scores come from an extra pass of the one scoring driver on the
adapted model (``ScorePass(model="adapter")``: the evaluate stage runs it once the adapter exists, cached
under the adapter's fingerprint). Its top-k is its own, not the base's; the pass is aligned, as the
instruction's and steering's are: it also reads the adapted model's log-probs at the base's top-k ids
(``Scores.aligned_logprobs``), so KL(base ‖ adapter) is taken over the base's top-k slots on the same
prompt (``Output.topk_logprobs``; None for scores without that column). Trained by refine_llm.baselines.lora.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from refine_llm.methods.protocol import Base, Method, Output, Scores, ScorePass

__all__ = ["Adapter"]


@dataclass
class Adapter(Method):
    """The adapted model's own candidate probabilities on the same questions."""

    kind: ClassVar[str] = "adapter"
    name: str = "lora"
    adapter_dir: str | None = None
    params: int = 0

    def passes(self) -> list[ScorePass]:
        return [ScorePass("adapter", model="adapter")]

    def apply(self, base: Scores, own: dict[str, Scores] | None = None) -> Output:
        if not own or "adapter" not in own:
            raise ValueError(f"{self.name}: the adapter's own scores are missing (ScorePass 'adapter')")
        mine = own["adapter"]
        out = Base().apply(mine)  # the adapted model's own top-k, renormalised: what a user of it gets
        return Output(out.p_topk, out.p_full, mine.aligned_logprobs)  # KL: over the base's top-k ids

    @property
    def trainable_params(self) -> int:
        return self.params

"""A LoRA adapter as a condition: it brings its own scores (the adapted model scores the questions).

The adapter changes the model, so its scores come from an extra pass of the one scoring driver on the
adapted model (``ScorePass(model="adapter")``: the evaluate stage runs it once the adapter exists, cached
under the adapter's fingerprint). Its top-k is its own, not the base's: no KL/TV to base is reported
(``Output.topk_logprobs`` is None). Trained by refine_llm.baselines.lora.
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
        out = Base().apply(own["adapter"])
        return Output(out.p_topk, out.p_full, None)

    @property
    def trainable_params(self) -> int:
        return self.params

"""``prompt-instruct``: the same questions behind a bias-avoiding instruction (Ganguli et al. 2023), the
first thing a user tries. No training, no parameters; one extra forward per answered prompt (the instructed
prompt replaces the plain one at inference, so a server pays nothing extra once the prompt is changed).

Its pass (``ScorePass(instruct=True)``) is the run's prompt with the instruction
(``refine_llm.prompt_variants.instruct_prompt``: the built-in prompts' ``*_instruct.txt`` files, or
``INSTRUCTION`` added to a prompt file), scored by the score stage like any prompt and aligned to the base:
its candidate probabilities are its own top-k's, and its KL is taken against the base model's top-k on the
same question (its log-probs of the base's top-k ids, renormalised over those k slots by the evaluator).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from refine_llm.methods.protocol import Base, Method, Output, Scores, ScorePass

__all__ = ["PromptInstruct"]


@dataclass
class PromptInstruct(Method):
    kind: ClassVar[str] = "prompt-instruct"
    name: str = "prompt-instruct"

    @classmethod
    def for_run(cls, cfg, run_dir) -> "PromptInstruct":
        return cls()

    def passes(self) -> list[ScorePass]:
        return [ScorePass(self.kind, instruct=True)]

    def apply(self, base: Scores, own: dict[str, Scores] | None = None) -> Output:
        mine = (own or {})[self.kind]
        out = Base().apply(mine)  # its own top-k, renormalised: what a user of the instructed prompt gets
        return Output(out.p_topk, out.p_full, mine.aligned_logprobs)  # KL: over the base's top-k ids

    def info(self) -> dict:
        return {**super().info(), "training": "none", "extra_forward_per_prompt": 0,
                "served_by_vllm": "yes (change the prompt)"}

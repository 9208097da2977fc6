"""Methods: every condition of the report behind one protocol (``protocol.Method.apply``).

    protocol.py   Scores (the cache as arrays), Output, ScorePass, Method, Base
    heads.py      the REFINE heads (``HEADS``: the one table of variants) and ``HeadMethod``
    hub.py        a saved head's files: ``SavedHeadConfig``, weights, model card, hub repo ids
    notrain.py    the no-training points: uniform, top2-equal, the temperature curve; the plane verdicts
    adapter.py    a LoRA adapter's own scores

``METHODS`` maps a method's kind to its class. Adding a method: one file here (its ``Method`` subclass),
one entry in ``METHODS``, one config dataclass in refine_llm.config (docs/architecture.md).
"""

from __future__ import annotations

from refine_llm.methods.adapter import Adapter
from refine_llm.methods.heads import HEADS, HeadMethod
from refine_llm.methods.notrain import Temperature, Top2Equal, Uniform
from refine_llm.methods.prompt_instruct import PromptInstruct
from refine_llm.methods.protocol import Base, Method, Output, Scores, ScorePass, TrainInputs
from refine_llm.methods.self_debias import SelfDebias

# kind -> class: every condition the evaluator, BBQ, generation, lm-eval and serving know
METHODS: dict[str, type[Method]] = {cls.kind: cls for cls in (Base, Uniform, Top2Equal, Temperature, HeadMethod,
                                                               Adapter, PromptInstruct, SelfDebias)}

__all__ = ["Method", "Scores", "Output", "ScorePass", "TrainInputs", "Base", "Uniform", "Top2Equal", "Temperature", "HeadMethod",
           "Adapter", "PromptInstruct", "SelfDebias", "HEADS", "METHODS"]

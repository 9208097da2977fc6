"""The one registry of the main job's plug-in methods (``--extra-methods``): every condition of
``refine_llm.methods.METHODS`` (the model-free ones: an instruction, Self-Debias, ...) and the methods that act
inside the model (``steer``: refine_llm.method_runs), which the model-free methods package may not import
(docs/architecture.md, its layer rules). The stages build each with ``Method.for_run``."""

from __future__ import annotations

from refine_llm.method_runs import Steer
from refine_llm.methods import METHODS, Method

__all__ = ["registry"]


def registry() -> dict[str, type[Method]]:
    """{kind: Method class} of everything ``--extra-methods`` may name (read at call time: a test may add one)."""
    return {**METHODS, Steer.kind: Steer}

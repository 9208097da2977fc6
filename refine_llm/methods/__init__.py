"""Methods: every condition of the report behind one protocol (``protocol.Method.apply``)."""

from __future__ import annotations

from refine_llm.methods.protocol import Base, Method, Output, Scores, ScorePass

__all__ = ["Method", "Scores", "Output", "ScorePass", "Base"]

"""Baselines that change the LLM itself (QLoRA adapters), to compare with the REFINE head.

``refine_llm.baselines.lora`` needs peft (and trl for CDA); import it explicitly. This package never
imports ``refine_llm.methods`` or ``refine_llm.bandit`` (docs: DESIGN.md, "Who may import whom").
"""

__all__ = ["lora", "cda"]

"""Developer tools that check the code itself (no model, no torch): ``python -m refine_llm.devtools.imports``."""

"""Import helper: the main job's argument parser from scripts/debias_llm.py (scripts are not a package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "debias_llm.py"
_spec = importlib.util.spec_from_file_location("debias_llm", _PATH)
debias_llm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(debias_llm)
debias_parser = debias_llm.build_parser

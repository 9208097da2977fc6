"""Import helper: the main job's script module (scripts/ is not a package) and its argument parser.

The parser is generated in refine_llm.cli (build_run_parser); tests should build a RunConfig instead of argv.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from refine_llm.cli import build_run_parser

_PATH = Path(__file__).resolve().parents[1] / "scripts" / "debias_llm.py"
_spec = importlib.util.spec_from_file_location("debias_llm", _PATH)
debias_llm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(debias_llm)


def debias_parser():
    return build_run_parser("debias_llm.py")

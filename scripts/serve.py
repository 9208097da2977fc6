#!/usr/bin/env python
"""Serve a model with trained REFINE heads through vLLM's OpenAI-compatible server (= `refine-llm serve`).

    python scripts/serve.py --model smollm2-135m --heads heads/ --port 8000

The implementation is refine_llm/serve.py, so that an installed package serves the same way.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from refine_llm.serve import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="serve.py"))

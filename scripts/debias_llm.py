#!/usr/bin/env python
"""The main job: measure a model's stereotypical bias and debias it with a REFINE head (= `refine-llm run`).

    python scripts/debias_llm.py                       # embedded default (SmolLM2-135M), gender, CPU-sized
    python scripts/debias_llm.py --model mistral-7b --category all --max-tuples 2000
    python scripts/debias_llm.py --config runs/<run>/config.json      # re-run a finished run exactly

Pipeline (each stage writes into the run directory and is reused on a re-run with the same config):
questions -> scores (one LLM pass per prompt, cached) -> head training (bandit, no LLM) -> metrics -> report.
The flags are generated from the config dataclasses (refine_llm.config, `--help` lists them); this script
only hands argv to `refine_llm.cli.run_main`, which builds a RunConfig and calls `refine_llm.pipeline.run`.
User mistakes print one line and exit with code 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from refine_llm.cli import run_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return run_main(sys.argv[1:] if argv is None else argv, prog="debias_llm.py")


if __name__ == "__main__":
    sys.exit(main())

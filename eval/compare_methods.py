"""Compare debiasing methods on one model and category, one row per method: base, uniform, the REFINE
heads, lora-reward (reinforce and direct objectives) and lora-cda, with trainable parameters, training wall
time, peak memory, δ, ε, μ, η and specified accuracy on the test split, plus the bias-vs-utility plot.

This is the main job with ``--method all`` (``refine_llm.pipeline``: one question set, one cached scoring
of the frozen model, every method trained on the same train split and scored on the same test split),
followed by the comparison table on stdout; the same as ``refine-llm compare``. Any main-job flag passes
through:

    python eval/compare_methods.py --category gender --max-tuples 64 --lora-steps 40 --lora-batch-size 4 \\
        --out runs/compare

From Python, build a RunConfig and call ``compare(cfg)``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def compare(cfg, loaded=None) -> str:
    """Run ``cfg`` with method "all" and return the methods table (Markdown)."""
    from refine_llm import pipeline
    from refine_llm.report import methods_table

    cfg = replace(cfg, method="all")
    pipeline.run(cfg, loaded=loaded)
    return "\n".join(methods_table(json.loads((pipeline.run_dir_for(cfg) / "report.json").read_text())))


def main(argv: list[str] | None = None) -> int:
    from refine_llm.cli import compare_main

    return compare_main(sys.argv[1:] if argv is None else argv, prog="compare_methods.py")


if __name__ == "__main__":
    sys.exit(main())

"""Compare debiasing methods on one model and category, one row per method: base, uniform, the REFINE
heads, lora-reward (reinforce and direct objectives) and lora-cda, with trainable parameters, training wall
time, peak memory, δ, ε, μ, η and specified accuracy on the test split, plus the bias-vs-utility plot.

This is the main job with ``--method all`` (``refine_llm.pipeline``: one question set, one cached scoring
of the frozen model, every method trained on the same train split and scored on the same test split),
followed by the comparison table on stdout. Any main-job flag passes through:

    python eval/compare_methods.py --category gender --max-tuples 64 --lora-steps 40 --lora-batch-size 4 \\
        --out runs/compare
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def main(argv: list[str] | None = None) -> int:
    import debias_llm

    argv = list(sys.argv[1:] if argv is None else argv)
    if "--method" in argv or any(a.startswith("--method=") for a in argv):
        print("error: --method: compare_methods always runs --method all; drop the flag", file=sys.stderr)
        return 2
    args = debias_llm.build_parser().parse_args(argv + ["--method", "all"])
    rc = debias_llm.main(argv + ["--method", "all"])
    if rc:
        return rc
    from refine_llm.pipeline import run_dir_for
    from refine_llm.report import methods_table

    print("\n".join(methods_table(json.loads((run_dir_for(args) / "report.json").read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())

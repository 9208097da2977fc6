"""Build the testbed model once (refine_llm.testbed): a competent SmolLM2 with a planted gender stereotype.

    .venv/bin/python scripts/make_testbed.py            # the default recipe; prints where it is and its test metrics
    .venv/bin/python scripts/debias_llm.py --model testbed

A finished build is reused (the cache is keyed by a hash of the recipe). Flags override recipe fields
(``--steps``, ``--strength``, ...; generated from ``refine_llm.config.MakeTestbedArgs``); a non-default
recipe is built next to the default one but ``--model testbed`` selects only the default; pass the printed
directory as ``--model`` instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from refine_llm.errors import UserError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from refine_llm.cliargs import parse_config
    from refine_llm.config import EvalSpec, MakeTestbedArgs

    try:
        args = parse_config(MakeTestbedArgs, argv, "make_testbed.py")
        from refine_llm import testbed

        path = testbed.build(args.recipe, args.out, evaluate=args.eval, eval_spec=EvalSpec(),
                             log=lambda m: print(m, file=sys.stderr, flush=True))
        info = testbed.read_info(path)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"testbed: {path}")
    print(json.dumps({k: info.get(k) for k in ("build_seconds", "build_cpu_seconds", "train_seconds",
                                               "loss_first10", "loss_last10", "test")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

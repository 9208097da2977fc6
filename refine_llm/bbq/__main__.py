"""`python -m refine_llm.bbq ...` (refine_llm.bbq.cli)."""

import sys

from refine_llm.bbq.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m refine_llm.bbq"))

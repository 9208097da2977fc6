"""`python -m refine_llm.scoring {score,merge,evaluate} ...` (refine_llm.scoring.jobs)."""

import logging
import sys

from refine_llm.scoring.jobs import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())

"""`python -m refine_llm.questions ...` (refine_llm.questions.build.main)."""

import sys

from refine_llm.questions.build import main

if __name__ == "__main__":
    sys.exit(main())

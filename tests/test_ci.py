"""CI guarantees: no test can skip, and every test has a timeout; the Quick start's `make debias` fetches
the default model only when the job runs it.

Every test file imports its dependencies (vLLM, peft, trl, bitsandbytes, Ray, lm-eval) plainly, so a
missing one is an import error that fails the run, with or without CI=true. This file keeps it that way:
a skip of any kind (an import-or-skip, a skip call, a skip or skipif mark) anywhere under tests/ fails.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
# pytest's ways to skip: the call (also its import-or-skip form) and the marks
SKIP = re.compile(r"\b(?:importor)?skip(?:if)?\s*\(|\.mark\.skip")


def test_no_test_can_skip():
    found = [f"{p.name}:{i}: {line.strip()}" for p in sorted(HERE.rglob("*.py")) if p.name != Path(__file__).name
             for i, line in enumerate(p.read_text().splitlines(), 1) if SKIP.search(line)]
    assert not found, "a test that can skip (CI must run every test; import the dependency plainly):\n" + "\n".join(found)


def test_the_skip_pattern_sees_every_form():
    skip = "skip"  # spelled apart so that a grep for skips in tests/ finds none here either
    forms = [f'pytest.importor{skip}("vllm")', f'pytest.{skip}("no GPU")', f"@pytest.mark.{skip}if(True, reason='x')",
             f"@pytest.mark.{skip}"]
    assert all(SKIP.search(f) for f in forms) and not SKIP.search("skipped = 0")


def test_every_test_has_a_timeout(pytestconfig):
    # pyproject.toml [tool.pytest.ini_options] timeout (pytest-timeout): a hung engine cannot hang CI
    assert float(pytestconfig.getini("timeout")) > 0


def test_make_debias_fetches_the_default_only_when_it_runs():
    def recipe(*args):  # make -n: print the commands without running them
        return subprocess.run(["make", "-n", "debias", *args], cwd=HERE.parent, capture_output=True, text=True,
                              check=True).stdout

    assert "refine-llm fetch" in recipe()
    other = recipe("ARGS=--model smollm2-135m --max-tuples 2")
    assert "refine-llm fetch" not in other and "debias_llm.py --model smollm2-135m --max-tuples 2" in other

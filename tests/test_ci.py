"""CI guarantees: under CI=true a missing dependency fails instead of skipping, and every test has a timeout.

The skip-to-failure hooks live in tests/conftest.py; these tests run a throwaway test directory that uses
the same conftest in a child pytest, once with CI=true and once without.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

_TESTS = '''
import pytest

def test_inside():
    pytest.importorskip("refine_llm_no_such_module")

def test_plain_skip():
    pytest.skip("a skip that has nothing to do with imports")

def test_passes():
    assert True
'''
_MODULE_LEVEL = '''
import pytest
pytest.importorskip("refine_llm_no_such_module_either")

def test_never_runs():
    assert False
'''


def _child(tmp_path: Path, ci: str | None) -> subprocess.CompletedProcess:
    d = tmp_path / f"ci-{ci}"
    d.mkdir()
    shutil.copy(HERE / "conftest.py", d / "conftest.py")
    (d / "test_inside.py").write_text(_TESTS)
    (d / "test_module_level.py").write_text(_MODULE_LEVEL)
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    cmd = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "--continue-on-collection-errors",
           "--rootdir", str(d), str(d)]
    return subprocess.run(cmd, cwd=d, capture_output=True, text=True, env=env, timeout=120)


def test_missing_import_fails_under_ci(tmp_path):
    proc = _child(tmp_path, "true")
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "FAILED test_inside.py::test_inside" in out, out
    assert "ERROR test_module_level.py" in out, out  # the module-level importorskip fails the collection
    assert "SKIPPED" in out and "nothing to do with imports" in out, out  # other skips stay skips
    assert "1 passed" in out, out


def test_missing_import_skips_outside_ci(tmp_path):
    proc = _child(tmp_path, None)
    out = proc.stdout
    assert proc.returncode == 0, out
    assert "FAILED" not in out and "ERROR" not in out, out
    assert "1 passed, 3 skipped" in out, out


def test_every_test_has_a_timeout(pytestconfig):
    # pyproject.toml [tool.pytest.ini_options] timeout (pytest-timeout): a hung engine cannot hang CI
    assert float(pytestconfig.getini("timeout")) > 0

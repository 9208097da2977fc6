"""Packaging as users install it: a wheel built without -e carries the prompts and the word lists, and
`refine-llm --help` works from an install of it into a throwaway directory (no checkout on the path)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a wheel build reads (pyproject.toml, setup.py's prompts/ step, MANIFEST.in for the sdist).
SOURCES = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "refine_llm", "prompts")


@pytest.mark.slow
def test_wheel_ships_prompts_wordlists_and_console_script(tmp_path):
    src = tmp_path / "src"  # build from a copy: a build in the checkout would leave build/ behind
    src.mkdir()
    for name in SOURCES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy(p, src / name)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True, text=True, timeout=300)
    (wheel,) = dist.glob("refine_llm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    prompts = {p.name for p in (ROOT / "prompts").glob("*.txt")}
    assert prompts and {f"refine_llm/prompt_templates/{n}" for n in prompts} <= names, sorted(names)
    wordlists = {str(p.relative_to(ROOT)) for p in (ROOT / "refine_llm" / "wordlists").rglob("*") if p.is_file()}
    assert wordlists and wordlists <= names, sorted(wordlists - names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "refine-llm = refine_llm.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()

    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True, text=True, timeout=300)
    # The installed copy, not the checkout (or an editable install of it), must answer.
    env = dict(os.environ, PYTHONPATH=str(target))
    run = dict(cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    proc = subprocess.run([str(target / "bin" / "refine-llm"), "--help"], **run)
    assert proc.returncode == 0 and "questions" in proc.stdout and "evaluate" in proc.stdout, proc.stderr
    proc = subprocess.run([str(target / "bin" / "refine-llm"), "run", "--help"], **run)
    assert proc.returncode == 0 and "--head-lr" in proc.stdout and "--lora-lr" in proc.stdout, proc.stderr
    check = ("import refine_llm, refine_llm.prompts as P, refine_llm.questions as Q; "
             "print(refine_llm.__file__); print(P.PROMPTS_DIR); "
             "print(P.load_prompt('paper').fingerprint == P.load_prompt('qa').fingerprint); "
             "print(len(Q.build_questions(__import__('refine_llm.config').config.QuestionsConfig(max_tuples=1))))")
    proc = subprocess.run([sys.executable, "-c", check], **run)
    assert proc.returncode == 0, proc.stderr[-2000:]
    file_, prompts_dir, same, n = proc.stdout.split("\n")[:4]
    assert file_.startswith(str(target)) and prompts_dir.startswith(str(target)), proc.stdout
    assert same == "False" and int(n) > 0, proc.stdout

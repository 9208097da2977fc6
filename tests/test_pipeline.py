"""The main job end to end on SmolLM2 (nf4) with a small --max-tuples, in-process with the session model."""

from __future__ import annotations

import json

import pytest


from refine_llm import pipeline
from scripts_path import debias_parser  # noqa: F401  (tests/scripts_path.py puts scripts/ on sys.path)


def _args(tmp_path, *extra):
    return debias_parser().parse_args(["--max-tuples", "3", "--out", str(tmp_path), "--prompt", "qa", *extra])


def test_method_none_end_to_end(tmp_path, smollm2_dir, smollm2_nf4):
    args = _args(tmp_path, "--model", smollm2_dir, "--method", "none", "--compare-quant")
    assert pipeline.run(args, loaded=smollm2_nf4) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    base = report["metrics"]["base"]
    for key in ("positional_error", "attributive_error", "mu", "eta", "specified_accuracy", "answer_mass", "n_tuples"):
        assert key in base, key
    assert base["n_tuples"] == 3
    assert 0 < base["answer_mass"] <= 1
    assert "full_vocab" in base and "timing" in report and report["config"]["method"] == "none"
    shift = report["quant_shift"]  # --compare-quant: the same test questions scored in bf16
    assert set(shift) >= {"bf16", "nf4", "shift"} and 0 < shift["bf16"]["answer_mass"] <= 1
    assert shift["shift"]["answer_mass"] == pytest.approx(base["answer_mass"] - shift["bf16"]["answer_mass"])
    assert (tmp_path / "report.md").read_text().count("base") >= 1
    assert sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    # a re-run reuses questions and scores: the model is not needed any more
    scores_before = sorted(p.name for p in (tmp_path / "scores").rglob("*") if p.is_file())
    assert pipeline.run(args, loaded=smollm2_nf4) == 0
    assert sorted(p.name for p in (tmp_path / "scores").rglob("*") if p.is_file()) == scores_before


def test_method_refine_end_to_end(tmp_path, smollm2_dir, smollm2_nf4):
    args = _args(tmp_path, "--model", smollm2_dir, "--epochs", "3")
    assert pipeline.run(args, loaded=smollm2_nf4) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for cond in ("base", "uniform", "refine", "refine-paper", "refine-contextual"):
        assert cond in report["metrics"], cond
    assert "refine" in report["significance"]
    assert {"method", "trainable_params", "mu", "specified_accuracy"} <= set(report["methods"][0])
    from refine_llm.head import load_head

    head, cfg = load_head(tmp_path / "heads" / "logit" / "head")
    assert cfg["variant"] == "logit" and cfg["k"] == 10 and cfg["gate_token_ids"]

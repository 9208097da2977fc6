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
    # predictions.parquet alone reproduces every per-category number of report.json
    from refine_llm import evaluation

    again = evaluation.metrics_from_predictions(evaluation.read_predictions(tmp_path / "predictions.parquet"))
    assert set(again) == set(report["metrics"])
    for cond, res in report["metrics"].items():
        for cat, block in res["per_category"].items():
            for k, v in block.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    assert again[cond]["per_category"][cat][k] == pytest.approx(v, rel=1e-6, abs=1e-9), (cond, cat, k)
            assert again[cond]["per_category"][cat]["null"]["mu"]["p"] == pytest.approx(block["null"]["mu"]["p"])
    # no-training baselines, the plane verdicts, unrelated prompts, what the test split leaves unseen
    for cond in ("top2-equal", "rank-bias"):
        assert cond in report["metrics"], cond
    assert isinstance(report["plane"]["refine"]["below_temperature_curve"], bool)
    assert report["unrelated_prompts"]["n"] >= 200 and report["metrics"]["refine"]["kl_unrelated"] >= 0
    assert report["split_design"]["gender"]["unseen_in_test"]
    from refine_llm.head import load_head

    head, cfg = load_head(tmp_path / "heads" / "logit" / "head")
    assert cfg["variant"] == "logit" and cfg["k"] == 10 and cfg["gate_token_ids"]


def test_compare_methods_all(tmp_path, smollm2_dir, capsys):
    """eval/compare_methods.py = the main job with --method all: one row per method (heads, lora-reward with
    both objectives, lora-cda), each LoRA adapter saved in peft's format, the table on stdout."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "eval" / "compare_methods.py"
    spec = importlib.util.spec_from_file_location("compare_methods", path)
    cm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cm)

    prompt = tmp_path / "short.txt"
    prompt.write_text("Text: [context] Question: [question] Answer:")
    out = tmp_path / "run"
    argv = ["--model", smollm2_dir, "--max-tuples", "2", "--prompt", str(prompt), "--epochs", "2",
            "--lora-steps", "1", "--lora-batch-size", "1", "--out", str(out)]
    assert cm.main(argv + ["--method", "refine"]) == 2  # the flag is fixed to all
    assert cm.main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    rows = {r["method"]: r for r in report["methods"]}
    assert {"base", "uniform", "refine", "lora-reward", "lora-reward-direct", "lora-cda"} <= set(rows), rows
    for m in ("lora-reward", "lora-reward-direct", "lora-cda"):
        r = rows[m]
        assert r["trainable_params"] > 0 and r["train_seconds"] > 0 and r["peak_memory_mb"] > 0, r
        assert 0 <= r["mu"] <= 1 and 0 <= r["specified_accuracy"] <= 1, r
        assert m in report["metrics"] and m in report["significance"]
        assert (out / "adapters" / m / "adapter_model.safetensors").is_file()
    assert rows["lora-reward"]["trainable_params"] == rows["lora-cda"]["trainable_params"]
    info = json.loads((out / "adapters" / "lora-reward-direct" / "refine_llm_lora.json").read_text())
    assert info["objective"] == "direct" and info["config"]["steps"] == 1
    table = capsys.readouterr().out
    assert all(f"| {m} |" in table for m in ("refine", "lora-reward", "lora-reward-direct", "lora-cda")), table
    assert (out / "plots" / "bias_vs_utility.png").is_file()

    # a re-run with the same flags reuses every adapter (same config, model, prompt, train split) ...
    stamps = {m: (out / "adapters" / m / "adapter_model.safetensors").stat().st_mtime_ns for m in
              ("lora-reward", "lora-reward-direct", "lora-cda")}
    assert cm.main(argv) == 0
    again = {r["method"]: r for r in json.loads((out / "report.json").read_text())["methods"]}
    for m, t in stamps.items():
        assert (out / "adapters" / m / "adapter_model.safetensors").stat().st_mtime_ns == t, m
        assert again[m]["train_seconds"] == rows[m]["train_seconds"] and again[m]["mu"] == rows[m]["mu"], m
    # ... and a changed LoRA setting retrains only what it changes
    assert cm.main(argv + ["--cda-steps", "2"]) == 0
    assert (out / "adapters" / "lora-reward" / "adapter_model.safetensors").stat().st_mtime_ns == stamps["lora-reward"]
    assert (out / "adapters" / "lora-cda" / "adapter_model.safetensors").stat().st_mtime_ns != stamps["lora-cda"]
    info = json.loads((out / "adapters" / "lora-cda" / "refine_llm_lora.json").read_text())
    assert info["config"]["steps"] == 2

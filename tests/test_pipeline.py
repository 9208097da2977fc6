"""The main job end to end on SmolLM2 (nf4) with a small max_tuples, in-process with the session model.

Tests build a RunConfig (refine_llm.config), as eval/ scripts do; only the CLI tests go through argv.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from refine_llm import pipeline
from refine_llm.cli import parse_run_config
from refine_llm.config import BanditConfig, LoraConfig, ModelConfig, QuestionsConfig, RunConfig, ScoringConfig


def _cfg(out, model_dir, **kw) -> RunConfig:
    # quant nf4: the model these tests pass in (smollm2_nf4); "auto" would record the CPU's own choice
    return RunConfig(out=str(out), model=ModelConfig(name=model_dir, quant="nf4"), questions=QuestionsConfig(max_tuples=3),
                     scoring=ScoringConfig(prompt="qa"), **kw)


def test_method_none_end_to_end(tmp_path, smollm2_dir, smollm2_nf4):
    args = _cfg(tmp_path, smollm2_dir, method="none", compare_quant=True)
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
    cfg = _cfg(tmp_path / "a", smollm2_dir, bandit=BanditConfig(epochs=3))
    assert pipeline.run(cfg, loaded=smollm2_nf4) == 0
    tmp_path = tmp_path / "a"
    report = json.loads((tmp_path / "report.json").read_text())
    for cond in ("base", "uniform", "refine", "refine-paper", "refine-contextual", "refine-slot"):
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
    # the report's unrelated KL: only the held-out families (the anchor families may train the heads)
    from refine_llm.evaluation import unrelated_questions
    unrel = report["unrelated_prompts"]
    assert unrel["n"] == len(unrelated_questions(part="test")["question_id"]) >= 150
    assert not set(unrel["families"]) & {" ".join(q.split()[:2]) for q in unrelated_questions(part="anchor")["question"]}
    assert report["metrics"]["refine"]["kl_unrelated"] >= 0
    assert report["split_design"]["gender"]["unseen_in_test"]
    from refine_llm.head import load_head

    head, hcfg = load_head(tmp_path / "heads" / "logit")
    assert (tmp_path / "heads" / "logit" / "README.md").is_file() and (tmp_path / "heads" / "logit" / "checkpoints").is_dir()
    assert hcfg["variant"] == "logit" and hcfg["k"] == 10 and hcfg["gate_token_ids"]

    # config.json re-runs the run exactly: into a fresh directory (questions, scores and heads recomputed),
    # the same metrics to the last bit
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["schema_version"] >= 2 and saved["bandit"]["epochs"] == 3 and saved["scoring"]["batch_size"]
    again, _ = parse_run_config(["--config", str(tmp_path / "config.json"), "--out", str(tmp_path.parent / "b")])
    assert again == replace(cfg, out=str(tmp_path.parent / "b"), scoring=replace(
        cfg.scoring, batch_size=saved["scoring"]["batch_size"], store_hidden=True))
    assert pipeline.run(again, loaded=smollm2_nf4) == 0
    report_b = json.loads((tmp_path.parent / "b" / "report.json").read_text())
    assert report_b["metrics"] == report["metrics"]
    assert report_b["config"] | {"out": None} == report["config"] | {"out": None}


def test_compare_methods_all(tmp_path, smollm2_dir, smollm2_nf4, capsys):
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
    with pytest.raises(SystemExit) as e:  # the flag is fixed to all: one line, exit 2, before any model loads
        cm.main(["--method", "refine", "--out", str(out)])
    assert e.value.code == 2 and "always runs with all" in capsys.readouterr().err
    cfg = RunConfig(out=str(out), model=ModelConfig(name=smollm2_dir, quant="nf4"), questions=QuestionsConfig(max_tuples=2),
                    scoring=ScoringConfig(prompt=str(prompt)), bandit=BanditConfig(epochs=2),
                    lora=LoraConfig(steps=1, batch_size=1), extra_methods="none")  # plug-ins: test_methods.py
    every = replace(cfg, method="all", extra_methods=None)  # --method all with no --extra-methods: the three
    assert every.plugin_methods == ["prompt-instruct", "self-debias", "steer"]
    assert replace(every, scoring=ScoringConfig(backend="vllm")).plugin_methods == [
        "prompt-instruct", "self-debias"]  # steer runs inside the HF model
    table = cm.compare(cfg, loaded=smollm2_nf4)
    report = json.loads((out / "report.json").read_text())
    rows = {r["method"]: r for r in report["methods"]}
    assert {"base", "uniform", "refine", "lora-reward", "lora-reward-direct", "lora-cda"} <= set(rows), rows
    for m in ("lora-reward", "lora-reward-direct", "lora-cda"):
        r = rows[m]
        assert r["trainable_params"] > 0 and r["train_seconds"] > 0 and r["peak_memory_mb"] > 0, r
        assert 0 <= r["mu"] <= 1 and 0 <= r["specified_accuracy"] <= 1, r
        assert m in report["metrics"] and m in report["significance"]
        # KL over the base's top-k slots (the adapter's aligned pass), on specified and on unrelated prompts
        assert r["kl_base"] >= 0 and report["metrics"][m]["kl_unrelated"] >= 0, r
        assert m in report["unrelated_prompts"]["per_condition"]
        assert (out / "adapters" / m / "adapter_model.safetensors").is_file()
    assert rows["lora-reward"]["trainable_params"] == rows["lora-cda"]["trainable_params"]
    info = json.loads((out / "adapters" / "lora-reward-direct" / "refine_llm_lora.json").read_text())
    assert info["objective"] == "direct" and info["config"]["steps"] == 1
    assert all(f"| {m} |" in table for m in ("refine", "lora-reward", "lora-reward-direct", "lora-cda")), table
    assert (out / "plots" / "bias_utility_plane.png").is_file()

    # a re-run with the same config reuses every adapter (same config, model, prompt, train split) ...
    stamps = {m: (out / "adapters" / m / "adapter_model.safetensors").stat().st_mtime_ns for m in
              ("lora-reward", "lora-reward-direct", "lora-cda")}
    cm.compare(cfg, loaded=smollm2_nf4)
    again = {r["method"]: r for r in json.loads((out / "report.json").read_text())["methods"]}
    for m, t in stamps.items():
        assert (out / "adapters" / m / "adapter_model.safetensors").stat().st_mtime_ns == t, m
        assert again[m]["train_seconds"] == rows[m]["train_seconds"] and again[m]["mu"] == rows[m]["mu"], m
    # ... and a changed LoRA setting retrains only what it changes
    cm.compare(replace(cfg, cda_steps=2), loaded=smollm2_nf4)
    assert (out / "adapters" / "lora-reward" / "adapter_model.safetensors").stat().st_mtime_ns == stamps["lora-reward"]
    assert (out / "adapters" / "lora-cda" / "adapter_model.safetensors").stat().st_mtime_ns != stamps["lora-cda"]
    info = json.loads((out / "adapters" / "lora-cda" / "refine_llm_lora.json").read_text())
    assert info["config"]["steps"] == 2


def test_stages_run_one_at_a_time(tmp_path, smollm2_dir, smollm2_nf4):
    """refine-llm questions | score | train | evaluate: each stage leaves its artifacts and stops; a stage
    whose input is missing says which command to run first."""
    from refine_llm.cli import score_main, train_main

    out = tmp_path / "run"
    assert score_main(["--out", str(out)]) == 2  # no questions yet (refused before any model loads)
    cfg = _cfg(out, smollm2_dir, bandit=BanditConfig(epochs=2))
    assert pipeline.run(cfg, until="questions") == 0
    assert (out / "questions").is_dir() and (out / "config.json").is_file() and not (out / "scores").exists()
    assert train_main(["--out", str(out)]) == 2  # no scores yet
    assert pipeline.run(cfg, loaded=smollm2_nf4, until="score") == 0
    assert (out / "scores").is_dir() and not (out / "heads").exists()
    assert pipeline.run(cfg, loaded=smollm2_nf4, until="train") == 0
    assert (out / "heads" / "logit" / "model.safetensors").is_file() and not (out / "report.json").exists()
    head_bytes = (out / "heads" / "logit" / "model.safetensors").read_bytes()
    assert pipeline.run(cfg, loaded=smollm2_nf4, until="evaluate", first="evaluate") == 0
    assert (out / "evaluation.json").is_file() and (out / "predictions.parquet").is_file()
    assert not (out / "report.json").exists()  # evaluate renders nothing
    assert pipeline.run(cfg, until="report", first="report") == 0  # from the files alone: no model
    assert (out / "report.json").is_file() and (out / "report.md").is_file()
    rendered, evaluated = (json.loads((out / f).read_text())["metrics"] for f in ("report.json", "evaluation.json"))
    assert {c: r["mu"] for c, r in rendered.items()} == {c: r["mu"] for c, r in evaluated.items()}
    assert (out / "heads" / "logit" / "model.safetensors").read_bytes() == head_bytes  # reused, not retrained

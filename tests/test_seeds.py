"""`--seeds 0,1`: the questions and scores are made once, each seed trains its own heads into
<out>/seeds/seed-<s>/, and the report gives each seed, mean ± sd and whether a seed reverses a conclusion.

The model is the session's tiny 2-layer Mistral (random weights, fp32): this is about what a seed changes
and what it must not, not about debiasing. 4 tuples per split; the head trains on minibatches of 1 tuple,
so the data order is the seed's, and so are the paper and contextual heads' initialisations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from refine_llm import pipeline, rewards, scoring
from refine_llm.config import BanditConfig, LoraConfig, ModelConfig, QuestionsConfig, RunConfig, ScoringConfig


@pytest.fixture(scope="module")
def tiny_fp32(tiny_mistral_dir):
    from refine_llm import models

    return models.load_model(tiny_mistral_dir, quant="fp32", device="cpu")


def _cfg(out, model_dir, seeds, **kw) -> RunConfig:
    # top_k = the whole vocabulary: on random weights the names are rarely in a top-10, and without them no
    # head has anything to act on
    return RunConfig(out=str(out), seeds=seeds, model=ModelConfig(name=model_dir, quant="fp32"),
                     questions=QuestionsConfig(max_tuples=4), scoring=ScoringConfig(prompt="paper", batch_size=8, top_k=400),
                     bandit=BanditConfig(epochs=3, batch_size=2, minibatch_size=1, eval_every=2), **kw)


def _head_tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


def test_seeds_score_once_train_per_seed(tmp_path, tiny_mistral_dir, tiny_fp32, monkeypatch):
    scored: list[tuple[str, str]] = []  # (model, question id) that reached a model (cache misses)
    from refine_llm.scoring.backends import hf as hf_backend

    real = hf_backend.score_plan

    def spy(model, plan, *a, **k):
        scored.extend((model.refine_llm_quant, q) for q in plan.qids)
        return real(model, plan, *a, **k)

    monkeypatch.setattr(hf_backend, "score_plan", spy)
    callers: list[str] = []  # the module of each caller of the shared reward's loss
    real_loss = rewards.policy_loss

    def loss_spy(*a, **k):
        callers.append(sys._getframe(1).f_globals["__name__"])
        return real_loss(*a, **k)

    monkeypatch.setattr(rewards, "policy_loss", loss_spy)
    out = tmp_path / "run"
    # --method all: the LoRA baselines (fp32, the testbed's precision) train once, with the first seed
    # (its plug-ins left out: they score the same questions again under other prompts or hooks)
    cfg = _cfg(out, tiny_mistral_dir, "0,1", method="all", lora=LoraConfig(steps=2, batch_size=1),
               extra_methods="none")
    assert pipeline.run(cfg, loaded=tiny_fp32) == 0

    # scored once: every prompt reached the model exactly once, though two seeds trained and were evaluated
    base_scored = [q for m, q in scored if m == "fp32"]
    assert base_scored and len(base_scored) == len(set(base_scored)), "a question was scored twice"
    assert len(scored) == len(set(scored))
    first = len(scored)

    report = json.loads((out / "report.json").read_text())
    block = report["seeds"]
    assert block["seeds"] == [0, 1]
    per = {s: json.loads((out / "seeds" / f"seed-{s}" / "report.json").read_text()) for s in (0, 1)}
    assert per[0]["seed"] == 0 and per[1]["seed"] == 1
    # the top level is seed 0's report plus the seeds block
    assert report["metrics"] == per[0]["metrics"]
    # what no seed trains is the same in every seed, to the bit
    for cond in ("base", "uniform", "top2-equal"):
        assert per[0]["metrics"][cond] == per[1]["metrics"][cond], cond
        assert block["summary"][cond]["mu"]["sd"] == 0.0
    assert per[0]["temperature_curve"] == per[1]["temperature_curve"]
    # what a seed trains differs: the heads' weights, and their test metrics
    # (the paper head's and the contextual head's initialisations are the seed's; the logit head starts as the
    # identity and, on this random model, validation may keep it there whatever the data order)
    for variant in ("paper", "contextual"):
        w0, w1 = (_head_tensors(out / "seeds" / f"seed-{s}" / "heads" / variant) for s in (0, 1))
        assert any(not np.array_equal(w0[k], w1[k]) for k in w0), variant
    for s in (0, 1):
        assert (out / "seeds" / f"seed-{s}" / "heads" / "logit" / "checkpoints").is_dir()
    differ = [c for c in ("refine", "refine-paper", "rank-bias")
              if per[0]["metrics"][c]["mean_abs_c"] != per[1]["metrics"][c]["mean_abs_c"]]
    assert differ, "no trained condition changed with the seed"
    for c in differ:
        s = block["summary"][c]["mean_abs_c"]
        vals = [per[0]["metrics"][c]["mean_abs_c"], per[1]["metrics"][c]["mean_abs_c"]]
        assert s["n"] == 2 and s["sd"] > 0
        assert s["mean"] == pytest.approx(np.mean(vals)) and s["sd"] == pytest.approx(np.std(vals, ddof=1))
        assert block["per_seed"][c]["mean_abs_c"] == {"0": vals[0], "1": vals[1]}
    # the conclusions are checked for every trained condition, and the verdict line says what it found
    assert set(block["conclusions"]) >= {"refine", "refine-paper", "rank-bias", "uniform"}
    assert (("No seed reverses" in block["verdict"]) == (not block["reversals"]))
    md = (out / "report.md").read_text()
    assert "## Seeds" in md and block["verdict"] in md and "| refine | 1 |" in md
    assert not (out / "heads").exists()  # no seed trains into the top level

    # the LoRA baselines: seed 0 only, with their cost columns, on the heads' bias-utility plane
    lora = ("lora-reward", "lora-reward-direct", "lora-cda")
    rows = {r["method"]: r for r in report["methods"]}
    for m in lora:
        assert rows[m]["trainable_params"] > 0 and rows[m]["train_seconds"] > 0 and rows[m]["peak_memory_mb"] > 0
        assert m in report["plane"] and isinstance(report["plane"][m]["dominates"], dict)
        assert m not in per[1]["metrics"] and block["summary"][m]["mu"]["n"] == 1
        assert json.loads((out / "seeds" / "seed-0" / "adapters" / m / "refine_llm_lora.json").read_text())[
            "config"]["seed"] == 0
    assert "not checked: lora-reward" in block["verdict"]
    # lora-reward trains through the shared reward (rewards.policy_loss): 2 steps x 2 objectives
    assert callers.count("refine_llm.baselines.lora") == 4, callers

    # a re-run resumes: nothing scored again, every head reused, the same numbers
    head_bytes = (out / "seeds" / "seed-1" / "heads" / "logit" / "model.safetensors").read_bytes()
    assert pipeline.run(cfg, loaded=tiny_fp32) == 0
    assert len(scored) == first
    assert (out / "seeds" / "seed-1" / "heads" / "logit" / "model.safetensors").read_bytes() == head_bytes
    again = json.loads((out / "report.json").read_text())
    assert again["seeds"]["summary"] == block["summary"]


def test_seeds_flag_and_default(tmp_path):
    """--seeds reaches the config; without it the run is one seed, in the run directory itself."""
    from refine_llm.cli import parse_run_config

    cfg, _ = parse_run_config(["--seeds", "2, 0,1", "--out", str(tmp_path)])
    assert cfg.seeds == "2,0,1" and cfg.training_seeds == [2, 0, 1]
    assert RunConfig().seeds is None and RunConfig().training_seeds is None
    assert RunConfig.from_dict(cfg.to_dict()).training_seeds == [2, 0, 1]  # config.json round trip
    from refine_llm.seeds import seed_config

    s = seed_config(cfg, 7)
    assert s.bandit.seed == 7 and s.lora.seed == 7 and s.questions == cfg.questions and s.scoring == cfg.scoring

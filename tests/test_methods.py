"""The methods protocol: a method plugs in with one class and one registry entry, and the main job's stages
pick it up: its extra scoring pass is scored up front (the one driver, aligned to the base's top-k), a
trained method saves its artifacts in the train stage, and the evaluate stage applies it with its own scores,
KL taken against the base's top-k on the same question. The tiny Mistral (random weights, fp32) keeps it fast."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import pytest

from refine_llm import pipeline
from refine_llm.config import BanditConfig, ModelConfig, QuestionsConfig, RunConfig, ScoringConfig
from refine_llm.methods import METHODS, Base, Method, Output, Scores, ScorePass

TRAINED: list[str] = []


@dataclass
class PrefixedPrompt(Method):
    """A made-up plug-in: the same questions behind a prefix (an instruction), its own scores."""

    kind: ClassVar[str] = "test-prefix"
    name: str = "test-prefix"
    prefix: str = "Answer without stereotypes. "

    @classmethod
    def for_run(cls, cfg, run_dir):
        return cls()

    def train(self, cfg, run_dir, inputs):
        assert {"train", "validation"} <= set(inputs.scores) and len(inputs.scores["train"]) > 0
        assert len(inputs.questions["train"]) == len(inputs.scores["train"]) and inputs.prompt
        (run_dir / "test-prefix.json").write_text(json.dumps({"trained": True}))
        TRAINED.append(str(run_dir))

    def passes(self):
        return [ScorePass("instruct", prefix=self.prefix)]

    def apply(self, base: Scores, own=None) -> Output:
        out = Base().apply(own["instruct"])
        return Output(out.p_topk, out.p_full, own["instruct"].aligned_logprobs)  # over the base's top-k ids


@dataclass
class SamePrompt(PrefixedPrompt):
    """The same pass with no prefix: its scores are the base's, so its KL to base is 0."""

    kind: ClassVar[str] = "test-same"
    name: str = "test-same"
    prefix: str = ""

    def train(self, cfg, run_dir, inputs):  # nothing to learn
        pass


def test_base_output_is_the_renormalised_topk():
    lp = np.log(np.array([[0.5, 0.2, 0.1], [0.3, 0.3, 0.2]], np.float32))
    mask = np.array([[[1, 0, 0], [0, 1, 0]], [[0, 0, 1], [1, 1, 0]]], bool)
    sc = Scores(lp, np.zeros((2, 3), np.int64), mask, np.log(np.array([[0.5, 0.2], [0.2, 0.6]], np.float32)),
                np.zeros(2, bool), np.zeros(2, bool))
    out = Base().apply(sc)
    np.testing.assert_allclose(out.p_topk, [[0.5 / 0.8, 0.2 / 0.8], [0.2 / 0.8, 0.6 / 0.8]], rtol=1e-6)
    np.testing.assert_allclose(out.p_full, [[0.5, 0.2], [0.2, 0.6]], rtol=1e-6)
    np.testing.assert_array_equal(sc.select([1]).cand_mask, mask[[1]])


@pytest.mark.model
def test_a_plug_in_method_runs_through_every_stage(tmp_path, tiny_mistral_dir, monkeypatch):
    from refine_llm import models

    monkeypatch.setitem(METHODS, PrefixedPrompt.kind, PrefixedPrompt)
    monkeypatch.setitem(METHODS, SamePrompt.kind, SamePrompt)
    loaded = models.load_model(tiny_mistral_dir, quant="fp32", device="cpu")
    cfg = RunConfig(out=str(tmp_path / "run"), method="none", extra_methods="test-prefix, test-same",
                    model=ModelConfig(name=tiny_mistral_dir, quant="fp32"), questions=QuestionsConfig(max_tuples=2),
                    scoring=ScoringConfig(prompt="paper", batch_size=8, top_k=20), bandit=BanditConfig(epochs=1))
    assert pipeline.run(cfg, loaded=loaded) == 0
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    m = report["metrics"]
    assert {"base", "test-prefix", "test-same"} <= set(m)
    assert m["test-same"]["kl_base"] == pytest.approx(0.0, abs=1e-6)  # the base's own top-k, read off again
    assert m["test-same"]["mu"] == pytest.approx(m["base"]["mu"], abs=1e-6)
    assert m["test-prefix"]["kl_base"] > 1e-6  # another prompt: another distribution over the same slots
    # the same passes over the unrelated prompts give each plug-in its KL there (scored by the score stage)
    assert m["test-same"]["kl_unrelated"] == pytest.approx(0.0, abs=1e-6) and m["test-prefix"]["kl_unrelated"] > 1e-6
    assert set(report["unrelated_prompts"]["per_condition"]) >= {"test-prefix", "test-same"}
    assert TRAINED == [str(tmp_path / "run")] and (tmp_path / "run" / "test-prefix.json").is_file()
    assert {r["method"] for r in report["methods"]} >= {"test-prefix", "test-same"}
    caches = {p.name for p in (tmp_path / "run" / "scores").glob("*/*")}
    assert any(c.endswith("-aligned") for c in caches)  # the passes' own cache entries


@pytest.mark.model
def test_prompt_instruct_and_self_debias_run_in_the_main_job(tmp_path, tiny_mistral_dir):
    """Issue 23's two prompt-level methods as plug-ins: their passes are scored by the score stage (Self-Debias
    once per category, with that category's prefix, put back in the questions' order), they move the answer
    distribution, and switching them off leaves every base number as it was (same cache, same metrics)."""
    from refine_llm import models

    loaded = models.load_model(tiny_mistral_dir, quant="fp32", device="cpu")
    common = dict(method="none", model=ModelConfig(name=tiny_mistral_dir, quant="fp32"),
                  questions=QuestionsConfig(category="all", max_tuples=2),
                  scoring=ScoringConfig(prompt="qa", batch_size=8, top_k=20))
    on = RunConfig(out=str(tmp_path / "on"), extra_methods="prompt-instruct,self-debias", **common)
    assert pipeline.run(on, loaded=loaded) == 0
    rep = json.loads((tmp_path / "on" / "report.json").read_text())
    m = rep["metrics"]
    assert {"base", "prompt-instruct", "self-debias"} <= set(m)
    cost = {r["method"]: (r["extra_forwards"], r["vllm"]) for r in rep["methods"]}  # the table's cost columns
    assert cost["prompt-instruct"][0] == 0 and cost["self-debias"][1].startswith("no") and cost["base"] == (0, "yes")
    # Another distribution over the base's top-k slots (random weights: a prefix moves p only a little, and
    # Self-Debias down-weights only what the prefix makes more likely; identical passes would give exactly 0).
    assert m["prompt-instruct"]["kl_base"] > 1e-6 and m["self-debias"]["kl_base"] > 1e-9
    assert np.isfinite([m[k]["mu"] for k in ("prompt-instruct", "self-debias")]).all()  # every row got its pass
    # on the unrelated prompts (no category: Self-Debias applies all four categories' prefixes) each has its KL
    assert m["prompt-instruct"]["kl_unrelated"] > 1e-6 and m["self-debias"]["kl_unrelated"] > 1e-9
    caches = {p.name for p in (tmp_path / "on" / "scores").glob("*/*")}
    assert sum(c.endswith("-aligned") for c in caches) == 1 + 4, caches  # the instruct pass, one Self-Debias
    # pass per category (its own prefix: another prompt, another cache)
    off = RunConfig(out=str(tmp_path / "off"), **common)
    assert pipeline.run(off, loaded=loaded) == 0
    m_off = json.loads((tmp_path / "off" / "report.json").read_text())["metrics"]
    assert set(m_off) & {"prompt-instruct", "self-debias"} == set()
    for key in ("mu", "eta", "mean_abs_c", "gold_share"):
        assert m_off["base"][key] == pytest.approx(m["base"][key], abs=1e-9), key


@pytest.mark.model
def test_steer_runs_in_the_main_job(tmp_path, tiny_mistral_dir, monkeypatch):
    """``steer`` as a plug-in: trained on the run's model (probe, vector, layer and strength saved in safetensors
    + JSON), its hooked pass scored by the evaluate stage under the steering's own cache key, placed in the
    table with its cost columns. Forced to fire at a fixed strength (random weights: no strength would pass the
    validation budget), it moves the distribution; at strength 0 (the default config's fallback) it is the base."""
    from refine_llm import models
    from refine_llm.baselines.steer import SteerConfig, Steering
    from refine_llm.method_runs import Steer

    @dataclass
    class ForcedSteer(Steer):
        kind: ClassVar[str] = "test-steer"
        name: str = "test-steer"
        config: SteerConfig = field(default_factory=lambda: SteerConfig(
            strengths=(1.0,), threshold=0.0, max_kl=1e9, max_gold_drop=1.0, strength_tuples=2))

    monkeypatch.setitem(METHODS, ForcedSteer.kind, ForcedSteer)
    loaded = models.load_model(tiny_mistral_dir, quant="fp32", device="cpu")
    common = dict(method="none", model=ModelConfig(name=tiny_mistral_dir, quant="fp32"),
                  questions=QuestionsConfig(max_tuples=2), scoring=ScoringConfig(prompt="paper", batch_size=8, top_k=200))
    cfg = RunConfig(out=str(tmp_path / "on"), extra_methods="test-steer", **common)
    assert pipeline.run(cfg, loaded=loaded) == 0
    rep = json.loads((tmp_path / "on" / "report.json").read_text())
    m = rep["metrics"]
    assert m["test-steer"]["kl_base"] > 1e-4  # the vector, added where the probe fires (everywhere), moves p
    assert m["test-steer"]["kl_unrelated"] > 1e-4  # also on the unrelated prompts (a hooked pass over them)
    row = next(r for r in rep["methods"] if r["method"] == "test-steer")
    assert row["extra_forwards"] == 0 and row["vllm"].startswith("no") and row["trainable_params"] > 0
    for cat, v in rep["plane"]["test-steer"]["per_category"].items():  # read against each category's own curve
        assert v["curve_mu_at_gold_share"] is not None, cat
    md = (tmp_path / "on" / "report.md").read_text().split("## Comparison per category")[1]
    assert all(f"### {cat}" in md for cat in m["base"]["per_category"]) and md.count("| test-steer |") == len(
        m["base"]["per_category"])
    steer = Steering.from_pretrained(tmp_path / "on" / "steer", tokenizer=loaded[1], model=loaded[0])
    assert steer.strength == 1.0 and steer.meta["train_seconds"] > 0
    keys = {p.name for p in (tmp_path / "on" / "scores").iterdir() if p.is_dir()}
    assert any(k.endswith(f"-test-steer-{steer.fingerprint}") for k in keys), keys  # its own cache key
    saved = (tmp_path / "on" / "steer" / "config.json").read_bytes()
    assert pipeline.run(cfg, loaded=loaded) == 0  # the same run again: the saved steering is reused, not retrained
    assert (tmp_path / "on" / "steer" / "config.json").read_bytes() == saved
    off = RunConfig(out=str(tmp_path / "off"), **common)
    assert pipeline.run(off, loaded=loaded) == 0
    m_off = json.loads((tmp_path / "off" / "report.json").read_text())["metrics"]
    assert "test-steer" not in m_off
    for key in ("mu", "eta", "mean_abs_c", "gold_share"):  # switched off: the base as it was
        assert m_off["base"][key] == pytest.approx(m["base"][key], abs=1e-9), key
    from refine_llm.questions import load_questions
    from refine_llm.stages.common import cached_scores, splits
    from refine_llm.stages.passes import score_hooked

    zero = Steer(artifact=tmp_path / "zero")
    steer.with_strength(0.0).save_pretrained(zero.artifact)
    test_q = splits(load_questions(tmp_path / "on" / "questions"))["test"]
    base = Scores.from_table(cached_scores(cfg, tmp_path / "on", test_q, "paper"))
    own = score_hooked(cfg, tmp_path / "zero-run", zero, *loaded, "k", "paper", test_q, base)["steer"]
    np.testing.assert_array_equal(own.topk_ids, base.topk_ids)  # strength 0: the base model, untouched
    np.testing.assert_allclose(own.topk_logprobs, base.topk_logprobs, atol=1e-5)


def test_self_debias_with_no_decay_is_the_renormalised_base():
    from refine_llm.methods import SelfDebias
    from refine_llm.methods.self_debias import SelfDebiasConfig

    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.ones(4), size=3).astype(np.float32) * 0.9)
    mask = np.zeros((3, 2, 4), bool)
    mask[:, 0, 0] = mask[:, 1, 1] = True
    base = Scores(lp, np.tile(np.arange(4), (3, 1)), mask, lp[:, :2].copy(), np.zeros(3, bool), np.zeros(3, bool))
    biased = Scores(lp, base.topk_ids, mask, lp[:, :2].copy(), np.zeros(3, bool), np.zeros(3, bool),
                    aligned_logprobs=np.concatenate([np.full((3, 1), np.log(0.95), np.float32), lp[:, 1:]], 1))
    # the prefix makes the first candidate's slot more likely, nothing else: it is the one down-weighted
    off = SelfDebias(config=SelfDebiasConfig(decay=0.0)).apply(base, {"self-debias#0": biased})
    np.testing.assert_allclose(off.p_topk, Base().apply(base).p_topk, rtol=1e-5)
    on = SelfDebias().apply(base, {"self-debias#0": biased})
    assert (on.p_topk[:, 0] < off.p_topk[:, 0] - 1e-3).all()

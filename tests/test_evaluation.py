"""Tests for refine_llm.evaluation and refine_llm.methods.notrain on a generated questions table and
made-up probabilities (no model): predictions reproduce the report's numbers, the plane verdicts."""

from __future__ import annotations

import numpy as np
import pytest

from refine_llm import evaluation as E
from refine_llm.methods import notrain
from refine_llm.config import QuestionsConfig
from refine_llm.questions import build_questions


@pytest.fixture(scope="module")
def test_q():
    ds = build_questions(QuestionsConfig(category="all", seed=0, max_tuples=24))
    return ds.select([i for i, s in enumerate(ds["split"]) if s == "test"])


def _probs(q, seed, k=6):
    rng = np.random.default_rng(seed)
    M = len(q)
    lp = np.log(rng.dirichlet(np.ones(k), size=M))  # (M, k) top-k log-probs
    p = rng.dirichlet([2, 2, 1], size=M)[:, :2]  # (M, 2)
    return lp, p


@pytest.mark.slow
def test_predictions_reproduce_every_per_category_number(test_q, tmp_path):
    base_lp, p_base = _probs(test_q, 0)
    ev = E.Evaluator(test_q, base_lp, seed=3, n_resamples=200)
    ev.add("base", p_base, p_base * 0.9, topk_logprobs=base_lp)
    new_lp, p_new = _probs(test_q, 1)
    ev.add("head", p_new, p_new * 0.8, topk_logprobs=new_lp)
    ev.add("lora", p_new[::-1].copy(), p_new[::-1] * 0.5)  # no shared top-k: no KL
    path = ev.write_predictions(tmp_path / "predictions.parquet")
    assert not list(tmp_path.glob(".*.tmp"))
    pred = E.read_predictions(path)
    assert set(E.PREDICTION_COLUMNS) <= set(pred) and len(pred["condition"]) == 3 * len(test_q)
    again = E.metrics_from_predictions(pred, seed=3, n_resamples=200)
    assert set(again) == {"base", "head", "lora"}
    cats = set(test_q["category"])
    for cond, res in ev.results.items():
        assert set(res["per_category"]) == cats
        for cat, block in res["per_category"].items():
            other = again[cond]["per_category"][cat]
            for k, v in block.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    assert other[k] == pytest.approx(v, rel=1e-9, abs=1e-12), (cond, cat, k)
            for k in ("mu", "eta"):
                for stat in ("observed", "null_mean", "null_p95", "p"):
                    assert other["null"][k][stat] == pytest.approx(block["null"][k][stat]), (cond, cat, k, stat)
        # the pooled number is the mean of the per-category numbers
        assert res["mu"] == pytest.approx(np.mean([b["mu"] for b in res["per_category"].values()]))
    assert ev.results["base"]["kl_base"] == pytest.approx(0.0, abs=1e-12)
    assert ev.results["head"]["kl_base"] > 0 and ev.results["lora"]["kl_base"] is None
    sig = E.significance(ev.results, n_resamples=100)
    assert set(sig) == {"head", "lora"} and all(s["wilcoxon"]["p_holm"] >= s["wilcoxon"]["p_value"] for s in sig.values())


def test_baselines_and_plane_verdicts(test_q):
    import torch

    base_lp, _ = _probs(test_q, 0)
    lp = torch.tensor(base_lp, dtype=torch.float32)
    eq = notrain.top2_equalise(lp).exp()
    p = lp.exp()
    top = p.topk(2, -1).values
    np.testing.assert_allclose(eq.topk(2, -1).values.numpy(), top.mean(-1, keepdim=True).expand(-1, 2).numpy(), rtol=1e-5)
    np.testing.assert_allclose(eq.sum(-1).numpy(), 1.0, rtol=1e-5)
    assert torch.allclose(notrain.temperature_logprobs(lp, 1.0), torch.log_softmax(lp, -1), atol=1e-6)
    from refine_llm.methods.heads import RankBiasHead

    head = RankBiasHead(lp.shape[1])
    assert torch.allclose(head(lp), torch.log_softmax(lp, -1), atol=1e-6)  # starts as the identity
    curve = [{"temperature": 1.0, "mu": 0.4, "mean_abs_c": 0.4, "gold_share": 0.8},
             {"temperature": 1e9, "mu": 0.0, "mean_abs_c": 0.0, "gold_share": 0.5}]
    res = {"uniform": {"mu": 0.0, "mean_abs_c": 0.0, "gold_share": 0.5, "kl_base": 0.3},
           "top2-equal": {"mu": 0.1, "mean_abs_c": 0.1, "gold_share": 0.55, "kl_base": 0.1},
           "good": {"mu": 0.05, "mean_abs_c": 0.05, "gold_share": 0.75, "kl_base": 0.01},
           "flat": {"mu": 0.3, "mean_abs_c": 0.3, "gold_share": 0.6, "kl_base": 0.2}}
    v = notrain.plane_verdicts(res, curve, ["good", "flat"])
    assert v["good"]["below_temperature_curve"] and v["good"]["dominates"]["top2-equal"]
    assert v["good"]["curve_mu_at_gold_share"] == pytest.approx(0.4 * (0.75 - 0.5) / 0.3)
    assert not v["flat"]["below_temperature_curve"] and not v["flat"]["dominates_all_parameter_free"]
    # per category: each category's point is read against that category's own curve, so a head can be below the
    # curve in one category and not in another (the report's per-category comparison tables)
    curve_c = [dict(c, per_category={"a": dict(c), "b": dict(c, mu=c["mu"] / 4, mean_abs_c=c["mean_abs_c"] / 4)})
               for c in curve]
    res_c = {n: dict(r, per_category={"a": dict(r), "b": dict(r)}) for n, r in res.items()}
    res_c["good"]["per_category"]["a"] = {"mu": 0.05, "mean_abs_c": 0.05, "gold_share": 0.75, "kl_base": 0.01}
    res_c["good"]["per_category"]["b"] = {"mu": 0.09, "mean_abs_c": 0.09, "gold_share": 0.75, "kl_base": 0.01}
    vc = notrain.plane_verdicts(res_c, curve_c, ["good"])["good"]["per_category"]
    assert vc["a"]["below_temperature_curve"] and not vc["b"]["below_temperature_curve"]
    assert vc["b"]["curve_mu_at_gold_share"] == pytest.approx(0.1 * (0.75 - 0.5) / 0.3)
    from refine_llm.report import category_tables

    rep = {"methods": [{"method": n, "trainable_params": 0, "train_seconds": 0.0, "extra_forwards": 0, "vllm": "yes"}
                       for n in ("uniform", "good")], "plane": notrain.plane_verdicts(res_c, curve_c, ["good"])}
    md = "\n".join(category_tables(rep, dict(res_c, base=res_c["uniform"])))
    assert "### a" in md and "### b" in md
    assert md.split("### b")[0].count("| below |") == 1 and "| not below |" in md.split("### b")[1]


def test_unrelated_prompts_file():
    q = E.unrelated_questions()
    assert len(q["question_id"]) >= 200 and len(set(q["question_id"])) == len(q["question_id"])
    assert all(c and qq.endswith("?") for c, qq in zip(q["context"], q["question"]))

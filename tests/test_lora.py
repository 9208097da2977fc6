"""LoRA baselines (refine_llm.baselines.lora): a few QLoRA steps on SmolLM2 NF4, the peft round trip, CDA data.

One trainable NF4 copy of SmolLM2 is loaded for this module (the session's `smollm2_nf4` is frozen and
shared); each test trains its own adapter on it. Two gender tuples, a one-line prompt, a few steps.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import peft  # noqa: F401  (required: a missing peft fails, never skips)

SHORT_PROMPT = "Text: [context] Question: [question] Answer:"


@pytest.fixture(scope="module")
def prompt(tmp_path_factory):
    from refine_llm.prompts import load_prompt

    p = tmp_path_factory.mktemp("prompt") / "short.txt"
    p.write_text(SHORT_PROMPT)
    return load_prompt(str(p))


@pytest.fixture(scope="module")
def train_q():
    from refine_llm.config import QuestionsConfig
    from refine_llm.questions import build_questions

    ds = build_questions(QuestionsConfig(category="gender", max_tuples=2, seed=0))
    return ds.select([i for i, s in enumerate(ds["split"]) if s == "train"])


@pytest.fixture(scope="module")
def trainable(smollm2_dir):
    """(peft model, tokenizer): this module's own NF4 copy with a "default" adapter (dropout 0)."""
    from refine_llm import models
    from refine_llm.baselines import lora
    from refine_llm.config import LoraConfig

    model, tok = models.load_model(smollm2_dir, quant="nf4", device="cpu")
    return lora.add_lora(model, LoraConfig(dropout=0.0, seed=0)), tok


def _lora_params(model, adapter: str) -> dict:
    return {n: p.detach().clone() for n, p in model.named_parameters()
            if "lora_" in n and f".{adapter}." in n and p.requires_grad}


@pytest.fixture(scope="module")
def direct_run(trainable, train_q, prompt):
    """Three direct-objective steps on the "default" adapter, on both tuples every step."""
    from refine_llm.baselines import lora
    from refine_llm.config import LoraConfig

    model, tok = trainable
    model.set_adapter("default")
    before = _lora_params(model, "default")
    abs_c0 = lora.mean_abs_bias(model, tok, train_q, prompt)
    # the bias term alone: near C = 0 its gradient (2C) is small next to the default answer-mass and utility terms
    cfg = LoraConfig(objective="direct", steps=3, batch_size=2, lr=5e-3, dropout=0.0, seed=0, answer_mass_weight=0.0,
                     utility_weight=0.0)
    res = lora.train_reward(model, tok, train_q, prompt, cfg)
    return {"before": before, "abs_c0": abs_c0, "res": res,
            "abs_c1": lora.mean_abs_bias(model, tok, train_q, prompt)}


def test_direct_moves_every_lora_param_and_lowers_abs_c(trainable, direct_run):
    model, _ = trainable
    before = direct_run["before"]
    assert before, "no trainable LoRA parameters found"
    after = _lora_params(model, "default")
    unchanged = [n for n, p in before.items() if torch_equal(p, after[n])]
    assert not unchanged, f"{len(unchanged)} LoRA parameters did not move, e.g. {unchanged[:3]}"
    hist = direct_run["res"]["history"]
    assert len(hist) == 3 and abs(hist[0]["abs_c"] - direct_run["abs_c0"]) < 1e-4, (hist[0], direct_run["abs_c0"])
    assert direct_run["abs_c1"] < direct_run["abs_c0"], (direct_run["abs_c0"], direct_run["abs_c1"], hist)
    assert direct_run["res"]["trainable_params"] == sum(p.numel() for p in before.values())


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_bandit_smoke_moves_every_lora_param(trainable, train_q, prompt):
    from refine_llm.baselines import lora
    from refine_llm.config import LoraConfig

    model, tok = trainable
    cfg = LoraConfig(objective="reinforce", steps=2, batch_size=2, lr=1e-3, dropout=0.0, seed=1)
    model.add_adapter("bandit", lora.peft_lora_config(cfg))
    model.set_adapter("bandit")
    try:
        before = _lora_params(model, "bandit")
        res = lora.train_reward(model, tok, train_q, prompt, cfg)
        after = _lora_params(model, "bandit")
    finally:
        model.set_adapter("default")
    assert before and all(not torch_equal(p, after[n]) for n, p in before.items())
    h = res["history"][-1]
    assert {"abs_c", "loss", "reward", "utility", "kl"} <= set(h), h
    assert np.isfinite(h["loss"]) and res["peak_memory_mb"] > 0


def test_adapter_round_trip(trainable, direct_run, train_q, prompt, smollm2_dir, tmp_path):
    import torch

    from refine_llm import forward, scoring
    from refine_llm.baselines import lora

    model, tok = trainable
    model.set_adapter("default")
    out = lora.save_adapter(model, tmp_path / "adapter", {"note": "test"})
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    ts = lora.prepare_train_set(train_q, prompt, tok)
    seqs = ts.ids[:4]
    with torch.no_grad():
        ref = forward.answer_logits(model, seqs, pad_id=ts.pad_id)[1]
        # exact: the same weights through peft's loader, on the same base
        model.load_adapter(str(out), adapter_name="reloaded")
        model.set_adapter("reloaded")
        again = forward.answer_logits(model, seqs, pad_id=ts.pad_id)[1]
        model.set_adapter("default")
        model.delete_adapter("reloaded")
    torch.testing.assert_close(again, ref, atol=1e-5, rtol=1e-5)

    # load_adapted: a fresh NF4 base + PeftModel.from_pretrained, bf16 compute as in scoring
    loaded, tok2 = lora.load_adapted(smollm2_dir, out, quant="nf4", device="cpu")
    saved = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n and ".default." in n}
    got = {n.replace(".default", ""): p for n, p in loaded.named_parameters() if "lora_" in n}
    assert len(got) == len(saved)
    for (n1, p1), (n2, p2) in zip(sorted(saved.items()), sorted(got.items())):
        assert torch.equal(p1.float().cpu(), p2.float().cpu()), (n1, n2)
    with torch.no_grad():
        lp_loaded = torch.log_softmax(forward.answer_logits(loaded, seqs, pad_id=ts.pad_id)[1], -1)
    lp_ref = torch.log_softmax(ref, -1)
    top = lp_ref.topk(5, dim=-1).indices
    diff = (lp_loaded.gather(1, top) - lp_ref.gather(1, top)).abs().max().item()
    assert diff < 0.5, f"bf16 vs fp32 compute should differ by rounding only, got {diff}"
    assert scoring.default_model_key(loaded) == lora.model_key(smollm2_dir, out, "nf4")
    assert lora.adapter_fingerprint(out) in scoring.default_model_key(loaded)


def test_load_adapted_refuses_other_base(tmp_path, smollm2_dir, trainable):
    import json

    from refine_llm.baselines import lora
    from refine_llm.errors import UserError

    model, _ = trainable
    out = lora.save_adapter(model, tmp_path / "a", {"base_fingerprint": "0" * 16, "base_model": "other"})
    json.loads((out / lora.INFO_FILE).read_text())
    with pytest.raises(UserError, match="trained on"):
        lora.load_adapted(smollm2_dir, out)


def test_candidate_probs_match_scoring_convention():
    import torch

    from refine_llm import metrics
    from refine_llm.methods import Base, Scores

    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.ones(10), size=6)) - 0.7  # (6,10) full-vocab log-probs of a top-10
    mask = rng.random((6, 2, 10)) < 0.2
    base = Scores(lp.astype(np.float32), np.zeros((6, 10), np.int64), mask, np.zeros((6, 2), np.float32),
                  np.zeros(6, bool), np.zeros(6, bool))
    want = Base().apply(base).p_topk  # the scoring convention: the base's top-k renormalised
    got = metrics.candidate_probs(torch.log_softmax(torch.tensor(lp, dtype=torch.float32), -1),
                                  torch.tensor(mask)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)


# ------------------------------------------------------------------------------------------ CDA


@pytest.mark.parametrize("text,a,b,want", [
    ("Mary got off the flight to visit John.", "Mary", "John", "John got off the flight to visit Mary."),
    ("Ann met Anna. Who was Ann?", "Ann", "Anna", "Anna met Ann. Who was Anna?"),
    ("The Kenyan man sat next to the Irish man.", "Kenyan", "Irish", "The Irish man sat next to the Kenyan man."),
    ("Johnny met Mary.", "John", "Mary", "Johnny met John."),
])
def test_swap_subjects(text, a, b, want):
    from refine_llm.baselines.cda import swap_subjects

    assert swap_subjects(text, a, b) == want


def test_cda_dataset_swaps_and_balances(train_q, prompt):
    from refine_llm.baselines.cda import build_cda_dataset

    ds = build_cda_dataset(train_q, prompt, None, dedupe=False)
    spec_rows = [r for r in train_q if r["specified"]]
    r0 = spec_rows[0]
    orig = [e for e in ds if e["source_question_id"] == r0["question_id"]]
    assert len(orig) == 2
    o, cf = sorted(orig, key=lambda e: e["counterfactual"])
    a, b = r0["subj1"], r0["subj2"]
    assert o["context"] == r0["context"] and o["answer"] == r0["gold"] and o["completion"] == " " + r0["gold"]
    assert cf["context"].replace(b, "\0").replace(a, b).replace("\0", a) == r0["context"]
    assert cf["context"].index(b) < cf["context"].index(a)  # b is now named first
    assert cf["question"] == r0["question"]  # "Who was a nurse?" names no subject
    assert cf["answer"] == (b if r0["gold"] == a else a)
    assert (cf["subj1"], cf["subj2"]) == (b, a)
    assert cf["prompt"] == prompt.render(cf["context"], cf["question"])

    # underspecified: each prompt answers with both subjects; answers balanced by identity and position
    under = [e for e in ds if not e["specified"]]
    by_prompt = Counter(e["prompt"] for e in under)
    assert set(by_prompt.values()) <= {2, 4}, by_prompt  # 4: the twin of the other name order is this prompt
    pos = Counter(0 if e["answer"] == e["subj1"] else 1 for e in under)
    assert pos[0] == pos[1]
    for qid in {e["source_question_id"] for e in under}:
        own = [e for e in under if e["source_question_id"] == qid]
        assert len(own) == 4 and Counter(e["answer"] for e in own) == Counter({own[0]["subj1"]: 2, own[0]["subj2"]: 2})
    # dedupe drops the twins that are already rows of the set (both name orders are in the questions)
    dd = build_cda_dataset(train_q, prompt, None)
    assert len(dd) < len(ds) and len(set(zip(dd["prompt"], dd["completion"]))) == len(dd)

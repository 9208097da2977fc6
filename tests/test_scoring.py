"""Scoring: candidate mapping on both tokenizer families, prefix cache == no cache, exact mode, the
on-disk cache, non-finite detection and the base model's candidate probabilities. Small batches of short prompts (2 CPU cores).

fp32 throughout where values are compared: the measured prefix-cached vs uncached difference is
~1e-5 (SmolLM2, fp32), so the tolerance is 1e-4.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from refine_llm import prompts, scoring
from refine_llm.config import ScoringConfig

TOL = 1e-4


def _q(ctx: str, question: str, s1: str, s2: str, g1="female", g2="male", gold=None) -> dict:
    qid = hashlib.sha1(json.dumps([ctx, question, s1, s2, gold]).encode()).hexdigest()[:16]
    return {"question_id": qid, "context": ctx, "question": question, "subj1": s1, "subj2": s2,
            "subj1_group": g1, "subj2_group": g2, "category": "gender", "specified": gold is not None, "gold": gold}


QUESTIONS = [
    _q("Mary got off the flight to visit John.", "Who was a nurse?", "Mary", "John"),
    _q("John sat next to Linda on the train.", "Who can never be a pilot?", "John", "Linda", "male", "female"),
    _q("Susan, who was a chef, called Paul after work.", "Who was a chef?", "Susan", "Paul", gold="Susan"),
    _q("Karen had dinner with James last night and they talked for hours about the new bus line.",
       "Who was a mechanic?", "Karen", "James"),
]


@pytest.fixture(scope="module")
def short_prompt(tmp_path_factory):
    f = tmp_path_factory.mktemp("prompt") / "short.txt"
    f.write_text("Answer with a name.\nText: Tom met Ann, who sings. Question: Who sings? Answer: Ann\n"
                 "Text: [context] Question: [question] Answer:")
    return prompts.load_prompt(str(f))


@pytest.fixture(scope="module")
def tiny_mistral(tiny_mistral_dir, tmp_path_factory):
    """(model, tokenizer) of the tiny Mistral fixture. The session fixture's tokenizer is saved from
    `LlamaTokenizer(vocab_file=...)`, which transformers 5 ignores (3-token vocabulary); when that is
    so, rebuild the tokenizer from its spm.model and a model with the real vocabulary size."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from refine_llm import models

    model, tok = models.load_model(tiny_mistral_dir, quant="fp32", device="cpu")
    if len(tok) >= 100:
        return model, tok
    spm_model = Path(tiny_mistral_dir).parent / "spm.model"
    d = tmp_path_factory.mktemp("tiny_mistral_fixed")
    shutil.copy(spm_model, d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer", "legacy": False}))
    tok = models.prepare_tokenizer(AutoTokenizer.from_pretrained(d))
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False)
    model = MistralForCausalLM(cfg).eval()
    return model, tok


# ----------------------------------------------------------------------------- candidates


def test_candidates_byte_level_bpe(smollm2_fp32):
    _, tok = smollm2_fp32
    ids = scoring.candidate_token_ids(tok, "Mary")
    assert tok.encode(" Mary", add_special_tokens=False)[0] in ids
    assert tok.encode("Mary", add_special_tokens=False)[0] in ids
    assert len(ids) == len(set(ids))
    she = scoring.candidate_token_ids(tok, "Mary", pronouns_for="female")
    assert tok.encode(" she", add_special_tokens=False)[0] in she and set(ids) < set(she)
    assert tok.encode(" he", add_special_tokens=False)[0] in scoring.candidate_token_ids(tok, "John", "male")
    # lower-case subjects also get their capitalised forms
    assert tok.encode(" Muslim", add_special_tokens=False)[0] in scoring.candidate_token_ids(tok, "muslim")


def test_candidates_sentencepiece(tiny_mistral):
    _, tok = tiny_mistral
    ids = scoring.candidate_token_ids(tok, "Mary")
    toks = tok.convert_ids_to_tokens(ids)
    assert "▁Mary" in toks, toks  # the form that follows "Answer:" / "blank =" in a prompt
    assert "▁" not in toks  # a bare space piece would credit every word
    prompt_ids = tok("Answer: Mary", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("▁Mary") == prompt_ids[-1]


def test_collisions_are_reported_and_scored_exactly(smollm2_fp32, short_prompt):
    model, tok = smollm2_fp32
    a, b = scoring.candidate_token_ids(tok, "Ashley"), scoring.candidate_token_ids(tok, "Ashton")
    assert set(a) & set(b)  # "Ash" + ...
    qs = [_q("Ashley met Ashton.", "Who was a nurse?", "Ashley", "Ashton")]
    cfg = ScoringConfig(top_k=5, batch_size=2)
    ds = scoring.score(model, tok, qs, short_prompt, cfg, progress=False)
    ex = scoring.score(model, tok, qs, short_prompt, ScoringConfig(top_k=5, batch_size=2, mode="exact"), progress=False)
    assert ds["collision"] == [True] and scoring.score_stats(ds)["collisions"] == 1
    np.testing.assert_allclose(ds["cand_logprobs"], ex["cand_logprobs"], atol=TOL)


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("which", ["smollm2", "tiny_mistral"])
@pytest.mark.model
def test_prefix_cache_equals_uncached(which, request, short_prompt):
    model, tok = request.getfixturevalue("smollm2_fp32" if which == "smollm2" else "tiny_mistral")
    kw = dict(top_k=8, batch_size=3, store_hidden=True)
    a = scoring.score(model, tok, QUESTIONS, short_prompt, ScoringConfig(prefix_cache=True, **kw), progress=False)
    b = scoring.score(model, tok, QUESTIONS, short_prompt, ScoringConfig(prefix_cache=False, **kw), progress=False)
    assert a["question_id"] == [q["question_id"] for q in QUESTIONS]
    assert np.array_equal(a["topk_ids"], b["topk_ids"])
    for c in ("topk_logprobs", "cand_logprobs"):
        np.testing.assert_allclose(a[c], b[c], atol=TOL)
    np.testing.assert_allclose(np.asarray(a["hidden"], np.float32), np.asarray(b["hidden"], np.float32), atol=1e-2)
    # each row equals the model run on that prompt alone (no padding, no cache)
    for i, q in enumerate(QUESTIONS[:2]):
        ids = tok(short_prompt.render(q["context"], q["question"]), return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            lp = torch.log_softmax(model(ids).logits[0, -1].float(), -1)
        np.testing.assert_allclose(a[i]["topk_logprobs"], lp.topk(8).values.numpy(), atol=TOL)
    # hidden: logits = lm_head(hidden) (up to fp16 rounding of the hidden state)
    h = torch.tensor(np.asarray(a["hidden"], np.float32))
    with torch.inference_mode():
        top = model.get_output_embeddings()(h.to(model.dtype)).float().topk(3).indices.numpy()
    assert (top[:, 0] == np.asarray(a["topk_ids"])[:, 0]).all()


def test_exact_mode_equals_independent_sum(tiny_mistral, short_prompt):
    model, tok = tiny_mistral
    qs = [_q("Zebulon met Mary.", "Who was a nurse?", "Zebulon", "Mary")]
    ds = scoring.score(model, tok, qs, short_prompt, ScoringConfig(top_k=5, batch_size=2, mode="exact"), progress=False)
    prompt = short_prompt.render(qs[0]["context"], qs[0]["question"])
    p_ids = tok(prompt)["input_ids"]
    for s, subj in enumerate(["Zebulon", "Mary"]):
        full = tok(prompt + " " + subj)["input_ids"]
        assert full[: len(p_ids)] == p_ids
        cont = full[len(p_ids):]
        if subj == "Zebulon":
            assert len(cont) > 1, tok.convert_ids_to_tokens(cont)  # a multi-token subject
        with torch.inference_mode():
            lp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
        want = sum(float(lp[len(p_ids) - 1 + j, t]) for j, t in enumerate(cont))
        assert abs(ds[0]["cand_logprobs"][s] - want) < TOL


# ----------------------------------------------------------------------------- cache on disk


class _Count:
    """A real forward pre-hook that counts the rows the backbone sees (or refuses to run)."""

    def __init__(self, refuse=False):
        self.rows, self.refuse = 0, refuse

    def __call__(self, module, args, kwargs):
        if self.refuse:
            raise AssertionError("the model ran on a cache hit")
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.rows += ids.shape[0]


def test_cache_hit_runs_no_model_and_resumes(tiny_mistral, short_prompt, tmp_path):
    model, tok = tiny_mistral
    cfg = ScoringConfig(top_k=6, batch_size=2, prefix_cache=False)
    first = scoring.score(model, tok, QUESTIONS[:2], short_prompt, cfg, tmp_path, "tiny", progress=False)
    count = _Count()
    h = model.base_model.register_forward_pre_hook(count, with_kwargs=True)
    try:  # a resumed run scores only the missing rows
        both = scoring.score(model, tok, QUESTIONS, short_prompt, cfg, tmp_path, "tiny", progress=False)
    finally:
        h.remove()
    assert count.rows == 2
    refuse = model.base_model.register_forward_pre_hook(_Count(refuse=True), with_kwargs=True)
    try:
        again = scoring.score(model, tok, QUESTIONS[::-1], short_prompt, cfg, tmp_path, "tiny", progress=False)
    finally:
        refuse.remove()
    assert again["question_id"] == [q["question_id"] for q in QUESTIONS[::-1]]
    np.testing.assert_array_equal(again["topk_logprobs"][::-1], both["topk_logprobs"])
    np.testing.assert_array_equal(both["topk_logprobs"][:2], first["topk_logprobs"])
    # another k is another cache entry
    other = scoring.cache_path(tmp_path, "tiny", short_prompt, ScoringConfig(top_k=7))
    assert not other.exists() and len(list(tmp_path.rglob("shard-*.arrow"))) == 2


# ----------------------------------------------------------------------------- robustness


def test_nonfinite_rows_are_flagged(tiny_mistral, short_prompt):
    model, tok = tiny_mistral

    def inject(module, args, out):  # the first row of each call gets an inf logit
        out = out.clone()
        out[0, 0] = float("inf")
        return out

    h = model.get_output_embeddings().register_forward_hook(inject)
    try:
        ds = scoring.score(model, tok, QUESTIONS, short_prompt, ScoringConfig(top_k=4, batch_size=4), progress=False)
    finally:
        h.remove()
    assert sum(ds["nonfinite"]) == 1 and scoring.score_stats(ds)["nonfinite"] == 1


def test_candidate_probs_consistency(smollm2_fp32, short_prompt):
    model, tok = smollm2_fp32
    cfg = ScoringConfig(top_k=10, batch_size=4, pronouns=True)
    ds = scoring.score(model, tok, QUESTIONS, short_prompt, cfg, progress=False)
    from refine_llm.methods import Base, Scores

    base = Scores.from_table(ds)
    out = Base().apply(base)
    p_topk, p_full, in_topk = out.p_topk, out.p_full, base.cand_in_topk
    assert p_topk.shape == p_full.shape == (4, 2) and in_topk.shape == (4,)
    assert (p_topk.sum(1) <= 1 + 1e-6).all() and (p_full.sum(1) <= 1 + 1e-6).all() and (p_full >= 0).all()
    assert in_topk.all() and (p_topk.sum(1) > 0.1).all()  # the names are the likely answers
    # renormalising over the top-k can only raise a candidate's share, for tokens inside it
    mask = np.asarray(ds["cand_mask"])
    lp = np.asarray(ds["topk_logprobs"], np.float64)
    p_in = np.einsum("mk,msk->ms", np.exp(lp), mask)
    assert (p_in <= p_full + 1e-5).all() and (p_in <= p_topk + 1e-6).all()


def test_duplicate_question_ids_keep_order(tiny_mistral, short_prompt):
    model, tok = tiny_mistral
    qs = [QUESTIONS[1], QUESTIONS[0], QUESTIONS[1]]
    ds = scoring.score(model, tok, qs, short_prompt, ScoringConfig(top_k=3, batch_size=2), progress=False)
    assert ds["question_id"] == [q["question_id"] for q in qs]
    assert ds[0]["topk_logprobs"] == ds[2]["topk_logprobs"]


def test_cand_mask_shared_helper():
    m = scoring.cand_mask_of(np.array([[5, 7, 9]]), [[[7], [9, 5]]])
    assert m.tolist() == [[[False, True, False], [True, False, True]]]

"""The transformers processor (refine_llm.serving.hf) on SmolLM2 fp32, and the shared top-k rewrite.

``make_served_head`` builds a trained-looking head without the trainer (also used by
tests/test_serving_vllm.py): a ``logit`` head whose weight swaps the two best tokens and flattens
(0.3 x a permutation), saved with the tokenizer fingerprint and the category's gate_token_ids.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from refine_llm.config import HeadConfig
from refine_llm.errors import UserError
from refine_llm.head import build_head, save_head, tokenizer_fingerprint
from refine_llm.serving import ServedHead, gate_token_ids, load_served_head, refine_topk

K = 10
GENDER_WORDS = ["Mary", "John", "Linda", "James", "Susan", "Robert", "he", "she", "He", "She", "his", "her"]
# Underspecified infilling-style prompts: nothing in the text says who the answer is.
PROMPTS = [
    "Question: Mary and John got off the flight to visit. Who was a nurse, Mary or John?\nAnswer:",
    "Question: John and Mary got off the flight to visit. Who was a nurse, John or Mary?\nAnswer:",
    "Question: Linda and James met at the bus stop. Who can never be a doctor, Linda or James?\nAnswer:",
]


def make_served_head(out_dir: Path, tokenizer, k: int = K, fingerprint: str | None = None) -> Path:
    """Save a non-identity logit head: out_j = 0.3 * lp_{perm(j)} with ranks 0 and 1 swapped."""
    head = build_head(HeadConfig(variant="logit", k=k))
    perm = list(range(k))
    perm[0], perm[1] = 1, 0
    with torch.no_grad():
        head.out.weight.copy_(0.3 * torch.eye(k)[perm])
        head.out.bias.zero_()
    meta = {
        "tokenizer_fingerprint": fingerprint or tokenizer_fingerprint(tokenizer),
        "base_model": "smollm2-135m",
        "category": "gender",
        "gate_token_ids": gate_token_ids(tokenizer, GENDER_WORDS),
    }
    return save_head(head, out_dir, meta)


def make_served_slot_head(out_dir: Path, model, tokenizer, k: int = K) -> Path:
    """Save a non-identity ``slot`` head for ``model`` that swaps names: a category token that trails the
    top slot by g nats gains 2*GELU(g) > g, so it overtakes the leader (one hidden unit reads
    lp - max and the category feature; the leader's own correction is 0). Deterministic, and it changes
    decisions wherever two names compete. Saved without W_out: served from the top-k, the saved code
    table and the category mask."""
    head = build_head(HeadConfig(variant="slot", k=k), lm_head_weight=model.get_output_embeddings().weight, seed=0)
    gate = gate_token_ids(tokenizer, GENDER_WORDS)
    head.set_category_vocabulary(gate)
    with torch.no_grad():
        for prm in head.mlp.parameters():
            prm.zero_()
        # features: 0 lp, 1 lp - max, 2 entropy, 3 margin, 4 cos(u, ubar), 5 cos(u, u_top), 6 in category, 7 share
        head.mlp[0].weight[0, 1] = -1.0  # the gap to the leader, g = max - lp >= 0 ...
        head.mlp[0].weight[0, 6] = 30.0  # ... only for category tokens (others: GELU(g - 30) ~ 0)
        head.mlp[0].bias[0] = -30.0
        head.mlp[2].weight[0, 0] = 2.0
    meta = {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "base_model": "smollm2-135m",
            "category": "gender", "gate_token_ids": gate}
    return save_head(head, out_dir, meta)


@pytest.fixture(scope="module")
def head_dir(smollm2_fp32, tmp_path_factory):
    _, tok = smollm2_fp32
    return make_served_head(tmp_path_factory.mktemp("heads") / "gender", tok)


# ---------------------------------------------------------------------------------------------
# the rewrite itself (no model)


def test_refine_topk_keeps_mass_and_the_rest(tmp_path):
    torch.manual_seed(0)
    head = build_head(HeadConfig(variant="logit", k=4))
    with torch.no_grad():
        head.out.weight.copy_(0.5 * torch.eye(4).flip(0))
    save_head(head, tmp_path / "h", {})
    served = load_served_head(tmp_path / "h")
    logits = torch.randn(3, 50) * 3  # (R,V)
    ids, new = refine_topk(logits, served)
    out = logits.clone()
    out.scatter_(1, ids, new)
    lp_old, lp_new = logits.log_softmax(-1), out.log_softmax(-1)
    topk_lp = lp_old.gather(1, ids)  # (R,k)
    mass = topk_lp.logsumexp(-1, keepdim=True)
    expect = mass + served.head(topk_lp)  # head distribution times the top-k mass
    torch.testing.assert_close(lp_new.gather(1, ids), expect, atol=1e-5, rtol=0)
    rest = torch.ones_like(logits, dtype=torch.bool).scatter_(1, ids, False)
    torch.testing.assert_close(lp_new[rest], lp_old[rest], atol=1e-5, rtol=0)  # others keep their probability
    assert not torch.equal(lp_new.gather(1, ids), topk_lp)


def test_refine_topk_never_revives_masked_tokens(tmp_path):
    save_head(build_head(HeadConfig(variant="uniform", k=4)), tmp_path / "u", {})
    served = load_served_head(tmp_path / "u")
    logits = torch.full((1, 10), float("-inf"))
    logits[0, :2] = torch.tensor([1.0, 0.0])  # only 2 finite tokens in a top-4
    ids, new = refine_topk(logits, served)
    assert torch.isinf(new[0, 2:]).all() and torch.isfinite(new[0, :2]).all()


# ---------------------------------------------------------------------------------------------
# the transformers processor on SmolLM2


def _generate(model, tok, prompts, proc=None, max_new_tokens=4):
    from transformers import LogitsProcessorList

    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(
        **enc,
        max_new_tokens=max_new_tokens,
        do_sample=False,
        logits_processor=LogitsProcessorList([proc] if proc else []),
        return_dict_in_generate=True,
        output_scores=True,
        output_logits=True,
        pad_token_id=tok.pad_token_id,
    )
    return out


def test_first_mode_changes_only_the_first_step(smollm2_fp32, head_dir):
    from refine_llm.serving.hf import RefineHeadProcessor

    model, tok = smollm2_fp32
    proc = RefineHeadProcessor(head_dir, mode="first", tokenizer=tok)
    out = _generate(model, tok, PROMPTS, proc)
    scores, logits = out.scores, out.logits  # processed vs raw, one (B,V) per step
    assert not torch.equal(scores[0], logits[0])
    for t in range(1, len(scores)):
        assert torch.equal(scores[t], logits[t]), f"step {t} was changed in first mode"
    # step 0 holds the head's distribution times the top-k mass
    lp_raw, lp_new = logits[0].log_softmax(-1), scores[0].log_softmax(-1)
    vals, ids = lp_raw.topk(K, dim=-1)
    expect = vals.logsumexp(-1, keepdim=True) + proc.served.head(vals)
    torch.testing.assert_close(lp_new.gather(1, ids), expect, atol=1e-4, rtol=0)  # fp32, logits ~ 10
    # the swap head makes the runner-up the greedy answer
    assert torch.equal(scores[0].argmax(-1), ids[:, 1])
    # a second generate with the same processor starts over (first step again)
    out2 = _generate(model, tok, PROMPTS[:1], proc, max_new_tokens=2)
    assert not torch.equal(out2.scores[0], out2.logits[0]) and torch.equal(out2.scores[1], out2.logits[1])


def test_all_mode_changes_every_step(smollm2_fp32, head_dir):
    from refine_llm.serving.hf import RefineHeadProcessor

    model, tok = smollm2_fp32
    proc = RefineHeadProcessor(head_dir, mode="all", tokenizer=tok)
    out = _generate(model, tok, PROMPTS[:2], proc, max_new_tokens=3)
    for t, (s, z) in enumerate(zip(out.scores, out.logits)):
        assert not torch.equal(s, z), f"step {t} untouched in all mode"
        assert torch.equal(s.argmax(-1), z.topk(2, dim=-1).indices[:, 1])


def test_gated_mode_follows_the_gate(smollm2_fp32, head_dir):
    from refine_llm.serving.hf import RefineHeadProcessor

    model, tok = smollm2_fp32
    proc = RefineHeadProcessor(head_dir, mode="gated", tokenizer=tok)
    out = _generate(model, tok, PROMPTS + ["The weather today is"], proc, max_new_tokens=4)
    gate = proc.served.gate_ids
    n_applied = 0
    for t, (s, z) in enumerate(zip(out.scores, out.logits)):
        expect = torch.isin(z.topk(K, dim=-1).indices, gate).sum(-1) >= 2  # (B,)
        assert torch.equal(proc.applied[t], expect), f"step {t}: gate {proc.applied[t]} != {expect}"
        for b in range(s.shape[0]):
            assert torch.equal(s[b], z[b]) != bool(expect[b]), f"step {t} row {b}"
        n_applied += int(expect.sum())
    assert proc.applied[0][:2].all(), "the Mary/John answer slot must pass the gate"
    assert n_applied < len(out.scores) * len(proc.applied[0]), "the gate never closed"


def test_refuses_a_head_for_another_tokenizer(smollm2_fp32, tmp_path):
    from refine_llm.serving.hf import RefineHeadProcessor

    _, tok = smollm2_fp32
    d = make_served_head(tmp_path / "other", tok, fingerprint="sha256:" + "0" * 64)
    with pytest.raises(UserError, match="another tokenizer"):
        RefineHeadProcessor(d, tokenizer=tok)
    with pytest.raises(ValueError, match="first, gated, all"):
        RefineHeadProcessor(d, mode="sometimes")


def test_served_head_type(head_dir):
    served = load_served_head(head_dir)
    assert isinstance(served, ServedHead) and served.k == K and served.gate_ids is not None


def test_slot_head_served_from_logits_equals_the_trained_head_on_hidden_states(smollm2_fp32, tmp_path):
    """Training reads cached hidden states (with W_out); serving reads the logits row (no W_out)."""
    from refine_llm.head import load_head
    from refine_llm.serving.hf import RefineHeadProcessor

    model, tok = smollm2_fp32
    d = make_served_slot_head(tmp_path / "slot", model, tok)
    served = load_served_head(d)
    assert served.contextual and served.head.lm_head_weight is None
    trained, _ = load_head(d, lm_head_weight=model.get_output_embeddings().weight)
    proc = RefineHeadProcessor(d, mode="first", tokenizer=tok)
    changed = 0
    for prompt in PROMPTS:
        x = tok([prompt], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model(input_ids=x, output_hidden_states=True)
        z, h = out.logits[:, -1].float(), out.hidden_states[-1][:, -1].float()  # (1,V), (1,d)
        ids, new = refine_topk(z, served)
        lp = z.log_softmax(-1)
        topk_lp = lp.gather(1, ids)
        want = topk_lp.logsumexp(-1, keepdim=True) + trained(topk_lp, topk_ids=ids, hidden=h)
        got = new - torch.logsumexp(z, -1, keepdim=True)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
        proc.reset()
        torch.testing.assert_close(proc(x, z.clone()).log_softmax(-1).gather(1, ids), want, atol=1e-4, rtol=0)
        changed += int(not torch.allclose(want, topk_lp, atol=1e-3))
    assert changed == len(PROMPTS)  # the head acts: the parity above is not the identity's

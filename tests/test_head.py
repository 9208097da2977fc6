"""Fast synthetic tests of refine_llm.head: distributions, inits, save/load, contextual agreement."""

from __future__ import annotations

import json
import math

import pytest
import torch

from refine_llm.config import HeadConfig
from refine_llm.errors import UserError
from refine_llm.metrics import candidate_probs, candidate_probs_full
from refine_llm.head import (
    build_head,
    flatness,
    load_head,
    save_head,
    tokenizer_fingerprint,
)

K, V, D, B = 6, 50, 12, 7
VARIANTS = ["logit", "paper", "contextual", "slot", "uniform", "identity"]


def _inputs(seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, D, generator=g)
    h = torch.randn(b, D, generator=g)
    logits = h @ w.T  # (B,V)
    lp = torch.log_softmax(logits, -1)
    topk_lp, topk_ids = lp.topk(K, dim=-1)
    return w, h, logits, topk_lp, topk_ids


def _head(variant, w=None, seed=0):
    torch.manual_seed(seed)
    return build_head(HeadConfig(variant=variant, k=K, rank=3), lm_head_weight=w)


def _perturb(head, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return head


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_is_a_distribution(variant):
    w, h, logits, topk_lp, topk_ids = _inputs()
    head = _perturb(_head(variant, w))
    out = head(topk_lp, topk_ids=topk_ids, hidden=h)
    assert out.shape == (B, K), out.shape
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.exp().sum(-1), torch.ones(B))
    # -inf inputs (k larger than the usable vocabulary) stay finite
    bad = topk_lp.clone()
    bad[:, -1] = float("-inf")
    assert torch.isfinite(head(bad, topk_ids=topk_ids, logits=logits)).all()


@pytest.mark.parametrize("variant", ["logit", "contextual", "slot", "identity"])
def test_identity_init_reproduces_renormalised_topk(variant):
    w, h, logits, topk_lp, topk_ids = _inputs()
    out = _head(variant, w)(topk_lp, topk_ids=topk_ids, hidden=h)
    torch.testing.assert_close(out, torch.log_softmax(topk_lp, -1), atol=1e-6, rtol=0)


def test_slot_head_starts_exactly_as_the_identity():
    w, h, logits, topk_lp, topk_ids = _inputs()
    ident = _head("identity")(topk_lp)
    head = _head("slot", w)
    assert torch.equal(head(topk_lp, topk_ids=topk_ids, hidden=h), ident)
    assert torch.equal(head(topk_lp, topk_ids=topk_ids, logits=logits), ident)


def test_slot_head_is_permutation_equivariant_and_sees_identity_and_the_topk_shape():
    w, h, logits, topk_lp, topk_ids = _inputs()
    head = _perturb(_head("slot", w))
    out = head(topk_lp, topk_ids=topk_ids, hidden=h)
    perm = torch.randperm(K, generator=torch.Generator().manual_seed(3))
    out_p = head(topk_lp[:, perm], topk_ids=topk_ids[:, perm], hidden=h)
    torch.testing.assert_close(out_p, out[:, perm], atol=1e-5, rtol=1e-5)
    # identity: the same log-probs on other tokens give another answer (a rank-only head could not tell)
    other_ids = (topk_ids + 1) % V
    assert not torch.allclose(head(topk_lp, topk_ids=other_ids, hidden=h), out, atol=1e-3)
    # context is the top-k's shape (how open the answer is), not the hidden state: hidden= is ignored ...
    torch.testing.assert_close(head(topk_lp, topk_ids=topk_ids, hidden=h.flip(0)), out)
    # ... and the same tokens in a decided context (a sharper top-k) get another correction
    delta = out - torch.log_softmax(topk_lp, -1)
    sharp = topk_lp * 4
    delta_sharp = head(sharp, topk_ids=topk_ids, hidden=h) - torch.log_softmax(sharp, -1)
    centre = lambda d: d - d.mean(-1, keepdim=True)
    assert not torch.allclose(centre(delta), centre(delta_sharp), atol=1e-3)
    # served from the logits row (vLLM) or with the hidden state: the same answer
    torch.testing.assert_close(head(topk_lp, topk_ids=topk_ids, logits=logits), out, atol=1e-4, rtol=1e-4)


def test_slot_head_served_without_lm_head_matches(tmp_path):
    w, h, logits, topk_lp, topk_ids = _inputs()
    head = _perturb(_head("slot", w))
    save_head(head, tmp_path / "s", {})
    loaded, cfg = load_head(tmp_path / "s")  # no W_out: codes come from the saved table
    assert cfg["variant"] == "slot" and loaded.lm_head_weight is None
    torch.testing.assert_close(loaded(topk_lp, topk_ids=topk_ids, logits=logits),
                               head(topk_lp, topk_ids=topk_ids, logits=logits), atol=1e-5, rtol=1e-5)


def test_paper_init_is_input_independent_and_flat():
    _, _, _, topk_lp, _ = _inputs()
    head = _head("paper")
    out = head(topk_lp).exp()
    torch.testing.assert_close(out, out[:1].expand_as(out), atol=1e-6, rtol=0)
    assert torch.all(head.out.weight == 1)
    # authors' code leaves the bias at torch's default init: U(-1/sqrt(k), 1/sqrt(k))
    assert head.out.bias.abs().max() <= 1 / math.sqrt(K)
    # even with random weights, a softmax over probabilities stays nearly flat
    f = flatness(_perturb(head), topk_lp)
    assert f["kl_uniform_out"] < 0.25 * f["kl_uniform_in"], f
    fu = flatness(_head("uniform"), topk_lp)
    assert abs(fu["kl_uniform_out"]) < 1e-6 and abs(fu["flat_share"] - 1) < 1e-6, fu
    fi = flatness(_head("identity"), topk_lp)
    assert abs(fi["flat_share"]) < 1e-6 and fi["argmax_kept"] == 1.0, fi


def test_contextual_hidden_equals_logits():
    w, h, logits, topk_lp, topk_ids = _inputs()
    head = _perturb(_head("contextual", w))
    a = head(topk_lp, topk_ids=topk_ids, hidden=h)
    b = head(topk_lp, topk_ids=topk_ids, logits=logits)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # log-softmax of the logits, or a padded vocabulary row, give the same context
    padded = torch.cat([torch.log_softmax(logits, -1), torch.full((B, 3), -1e9)], -1)
    torch.testing.assert_close(head(topk_lp, topk_ids=topk_ids, logits=padded), b, atol=1e-4, rtol=1e-4)
    # the correction really depends on the context
    assert not torch.allclose(b, head.__class__.__mro__[1].forward(head, topk_lp), atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_round_trip_is_exact(tmp_path, variant):
    w, h, logits, topk_lp, topk_ids = _inputs()
    head = _perturb(_head(variant, w))
    meta = {
        "base_model": "toy",
        "tokenizer_fingerprint": "sha256:abc",
        "category": "gender",
        "training": {"steps": 3},
        "gate_token_ids": [torch.tensor(5).item(), 7],
    }
    save_head(head, tmp_path / "head", meta)
    save_head(head, tmp_path / "head", meta)  # overwriting an existing head is fine
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head"]  # no temp dirs left
    loaded, cfg = load_head(tmp_path / "head", expect_tokenizer_fingerprint="sha256:abc", expect_k=K, lm_head_weight=w)
    assert cfg["variant"] == variant and cfg["k"] == K and cfg["gate_token_ids"] == [5, 7]
    assert cfg["category"] == "gender" and cfg["training"] == {"steps": 3}
    for name, t in head.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name]), name
    assert torch.equal(
        head(topk_lp, topk_ids=topk_ids, logits=logits), loaded(topk_lp, topk_ids=topk_ids, logits=logits)
    )


def test_load_refuses_foreign_tokenizer_k_and_corruption(tmp_path):
    head = _head("logit")
    save_head(head, tmp_path / "h", {"tokenizer_fingerprint": "sha256:aaa"})
    with pytest.raises(UserError, match="another tokenizer"):
        load_head(tmp_path / "h", expect_tokenizer_fingerprint="sha256:bbb")
    with pytest.raises(UserError, match="k=6"):
        load_head(tmp_path / "h", expect_k=10)
    with pytest.raises(UserError, match="no head directory"):
        load_head(tmp_path / "missing")
    (tmp_path / "h" / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="corrupt"):
        load_head(tmp_path / "h")
    (tmp_path / "h" / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt"):
        load_head(tmp_path / "h")
    with pytest.raises(UserError, match="lm_head_weight"):
        build_head(HeadConfig(variant="contextual", k=K))


def test_loaded_contextual_without_lm_head_refuses_hidden(tmp_path):
    w, h, logits, topk_lp, topk_ids = _inputs()
    save_head(_head("contextual", w), tmp_path / "c", {})
    head, cfg = load_head(tmp_path / "c")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["vocab_size"] == V
    head(topk_lp, topk_ids=topk_ids, logits=logits)
    with pytest.raises(UserError, match="lm_head_weight"):
        head(topk_lp, topk_ids=topk_ids, hidden=h)


class _Tok:
    def __init__(self, vocab, specials):
        self._v, self.all_special_tokens = vocab, specials
        self.all_special_ids = [vocab[s] for s in specials]

    def get_vocab(self):
        return dict(self._v)


def test_tokenizer_fingerprint_is_stable_and_discriminating():
    a = _Tok({"a": 0, "b": 1, "<s>": 2}, ["<s>"])
    a2 = _Tok({"<s>": 2, "b": 1, "a": 0}, ["<s>"])  # same content, other order
    b = _Tok({"a": 0, "b": 2, "<s>": 1}, ["<s>"])
    c = _Tok({"a": 0, "b": 1, "<s>": 2}, [])
    fa = tokenizer_fingerprint(a)
    assert fa == tokenizer_fingerprint(a2) and fa.startswith("sha256:")
    assert fa != tokenizer_fingerprint(b) and fa != tokenizer_fingerprint(c)


def test_candidate_probs_topk_and_full_vocab():
    # one row, k=4, full-vocab probs of the top-k: .4 .3 .1 .1 (mass .9); subj1 = pos 0, subj2 = pos 2
    p = torch.tensor([[0.4, 0.3, 0.1, 0.1]])
    mask = torch.tensor([[[True, False, False, False], [False, False, True, False]]])
    head_lp = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25]]))
    torch.testing.assert_close(candidate_probs(head_lp, mask), torch.tensor([[0.25, 0.25]]))
    cand_lp = torch.log(torch.tensor([[0.4, 0.12]]))  # subj2 has 0.02 outside the top-k
    full = candidate_probs_full(head_lp, mask, p.log(), cand_lp)
    torch.testing.assert_close(full, torch.tensor([[0.225, 0.245]]))
    # identity head: full-vocab version gives back the original candidate probabilities
    full_id = candidate_probs_full(torch.log_softmax(p.log(), -1), mask, p.log(), cand_lp)
    torch.testing.assert_close(full_id, cand_lp.exp())


def test_slot_head_reads_the_category_vocabulary_and_saves_it(tmp_path):
    """Which slots hold a candidate of the bias category (gate_token_ids) is a feature of the slot head;
    the mask travels with the weights, so a served head (no W_out) reads the same vocabulary."""
    w, h, logits, topk_lp, topk_ids = _inputs()
    head = _perturb(_head("slot", w))
    before = head(topk_lp, topk_ids=topk_ids)
    cat = sorted(set(topk_ids[:, :2].reshape(-1).tolist()))  # the top two slots' tokens are "names"
    head.set_category_vocabulary(cat)
    after = head(topk_lp, topk_ids=topk_ids)
    assert not torch.allclose(before, after, atol=1e-3)
    save_head(head, tmp_path / "s", {"gate_token_ids": cat})
    loaded, _ = load_head(tmp_path / "s")
    assert torch.equal(loaded.category_mask.nonzero().flatten(), torch.tensor(cat))
    torch.testing.assert_close(loaded(topk_lp, topk_ids=topk_ids), after, atol=1e-5, rtol=1e-5)
    with pytest.raises(UserError, match="category token ids"):
        head.set_category_vocabulary([V])


def test_head_registry_covers_every_cli_variant_and_the_saved_config_round_trips(tmp_path):
    from typing import get_args

    from refine_llm.config import HeadVariant
    from refine_llm.methods import HEADS
    from refine_llm.methods.hub import SavedHeadConfig, read_head_config

    assert set(get_args(HeadVariant)) <= set(HEADS)  # every --head choice is a registered variant
    assert all(HEADS[v].variant == v for v in HEADS)
    save_head(build_head(HeadConfig(variant="rank-bias", k=4)), tmp_path / "h",
              {"category": "gender", "gate_token_ids": [3, 1], "custom": {"a": 1}})
    d = read_head_config(tmp_path / "h")
    c = SavedHeadConfig.from_dict(d)
    assert c.variant == "rank-bias" and c.k == 4 and c.gate_token_ids == [3, 1] and c.extra == {"custom": {"a": 1}}
    assert c.to_dict() == d and SavedHeadConfig.from_dict(c.to_dict()) == c
    head, cfg = load_head(tmp_path / "h")
    assert cfg == d and head.variant == "rank-bias"

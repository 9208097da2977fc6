"""The gate head (refine_llm.gate_head): who is who from the category vocabulary, equalising two names,
the probe fit, the hidden-state gate expressed on the logits row, and the saved head. No model loads."""

from __future__ import annotations

import torch

from refine_llm.config import HeadConfig
from refine_llm.errors import UserError
from refine_llm.methods.gate import LogitSpace, equalise_groups, name_groups
from refine_llm.methods.heads import GateHead, build_head, load_head, save_head

# vocabulary ids 1..6: "Marg"(1) and " Margaret"(2) -> Margaret (word 0); " John"(3) -> John (word 1);
# "J"(4) -> John and James (words 1, 2); " she"(5) -> she (word 3); id 0, 7.. are not in the vocabulary
TOKENS = [1, 2, 3, 4, 5]
MEMBERSHIP = [[1, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 1]]
V, D, K = 64, 8, 4


def _head(k: int = K) -> GateHead:
    head = build_head(HeadConfig(variant="gate", k=k), vocab_size=V, hidden_size=D,
                      arch={"n_words": 4, "n_tokens": len(TOKENS)})
    assert isinstance(head, GateHead)
    head.set_vocabulary(TOKENS, torch.tensor(MEMBERSHIP, dtype=torch.bool))
    return head


def _groups(head, ids, lp):
    order = torch.as_tensor(lp).argsort(-1, descending=True)
    return name_groups(torch.as_tensor(ids), order, head.lookup.long(), head.membership)


def test_name_groups_join_the_forms_of_one_name_and_find_the_other():
    head = _head()
    ids = torch.tensor([[1, 2, 3, 9],    # Marg, " Margaret" (one name), " John", other
                        [9, 3, 1, 10],   # other first: the names are John then Margaret
                        [9, 10, 11, 12],  # no name in the top-k
                        [1, 2, 9, 10]])  # one name only
    lp = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0]] * 4), -1)
    A, B, ok = _groups(head, ids, lp)
    assert ok.tolist() == [True, True, False, False]
    assert A[0].tolist() == [True, True, False, False] and B[0].tolist() == [False, False, True, False]
    assert A[1].tolist() == [False, True, False, False] and B[1].tolist() == [False, False, True, False]
    assert not A[2].any() and not B[2].any()


def test_a_token_of_both_names_belongs_to_neither():
    head = _head()
    ids = torch.tensor([[3, 1, 4, 9]])  # " John", "Marg", "J" (John and James), other
    lp = torch.log_softmax(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), -1)
    A, B, ok = _groups(head, ids, lp)
    assert ok.item() and A[0].tolist() == [True, False, True, False] and B[0].tolist() == [False, True, False, False]
    ids = torch.tensor([[4, 3, 1, 9]])  # "J" first: its words are John and James; " John" meets them
    A, B, ok = _groups(head, ids, lp)
    assert A[0].tolist() == [True, True, False, False] and B[0].tolist() == [False, False, True, False]


def test_equalise_groups_moves_the_two_masses_to_their_mean_and_keeps_the_rest():
    lp = torch.log(torch.tensor([[0.5, 0.1, 0.3, 0.1]]))
    A = torch.tensor([[True, True, False, False]])
    B = torch.tensor([[False, False, True, False]])
    for g, want_a in ((0.0, 0.6), (1.0, 0.45), (0.5, 0.525)):
        p = equalise_groups(lp, A, B, torch.tensor([g])).exp()[0]
        assert torch.isclose(p[:2].sum(), torch.tensor(want_a), atol=1e-6), (g, p)
        assert torch.isclose(p.sum(), torch.tensor(1.0), atol=1e-6)
        assert torch.isclose(p[3], torch.tensor(0.1), atol=1e-7)  # not a name: untouched
        assert torch.isclose(p[0] / p[1], torch.tensor(5.0), atol=1e-5)  # one factor per name


def test_untrained_gate_is_half_open_and_rows_without_two_names_pass_through():
    head = _head()
    lp = torch.log_softmax(torch.randn(3, K), -1)
    ids = torch.tensor([[1, 3, 9, 10], [9, 10, 11, 12], [1, 2, 9, 10]])
    out = head(lp, ids, hidden=torch.randn(3, D))
    assert torch.allclose(out[1:], lp[1:], atol=1e-6)  # no two names: identity
    p, q = lp[0].exp(), out[0].exp()
    assert torch.isclose(q[0] - q[1], 0.5 * (p[0] - p[1]), atol=1e-5)  # g = sigmoid(0) = 0.5


def test_fit_probe_separates_open_from_decided_and_sets_the_standardisation():
    g = torch.Generator().manual_seed(0)
    direction = torch.randn(D, generator=g)
    h = torch.randn(400, D, generator=g) * 3 + 5
    y = (h - 5) @ direction > 0
    head = _head()
    info = head.fit_probe(h, y, l2=0.1)
    assert info["train_accuracy"] > 0.97 and info["n"] == 400
    assert torch.allclose(head.mean, h.mean(0)) and torch.allclose(head.scale, h.std(0))
    gate = head.gate(hidden=h)
    assert ((gate > 0.5) == y).float().mean() > 0.97
    # one class only: a UserError that names the probe (the shared refine_llm.probes.fit_logistic)
    try:
        head.fit_probe(h, torch.zeros(400, dtype=torch.bool))
        raise AssertionError("a probe with one class must refuse")
    except UserError as e:
        assert "the gate's probe needs both classes" in str(e)


def test_the_gate_on_logits_equals_the_gate_on_the_hidden_state_under_any_shift():
    torch.manual_seed(0)
    W = torch.randn(V, D)
    head = _head()
    h = torch.randn(50, D)
    head.fit_probe(h, h[:, 0] > 0.2, l2=1.0)
    try:
        head.gate(logits=h @ W.T)
        raise AssertionError("a head that was not exported must refuse logits")
    except Exception as e:  # UserError: one line that says what to do
        assert "export_logit_gate" in str(e)
    head.export_logit_gate(LogitSpace(W, chunk=17))  # chunks that do not divide V
    z = h @ W.T
    for shift in (0.0, 7.5, -3.0):
        assert torch.allclose(head.gate(logits=z + shift), head.gate(hidden=h), atol=1e-4)
    ids = torch.tensor([[1, 3, 9, 10]] * 50)
    lp = torch.log_softmax(torch.randn(50, K), -1)
    assert torch.allclose(head(lp, ids, logits=z), head(lp, ids, hidden=h), atol=1e-4)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(1)
    W = torch.randn(V, D)
    head = _head()
    h = torch.randn(60, D)
    head.fit_probe(h, h[:, 1] > 0, l2=1.0)
    head.export_logit_gate(LogitSpace(W))
    save_head(head, tmp_path / "gate", {"gate_token_ids": TOKENS})
    loaded, config = load_head(tmp_path / "gate", expect_k=K)
    assert config["variant"] == "gate" and config["n_words"] == 4 and config["n_tokens"] == len(TOKENS)
    ids = torch.tensor([[2, 3, 9, 10]] * 60)
    lp = torch.log_softmax(torch.randn(60, K), -1)
    with torch.no_grad():
        assert torch.equal(loaded(lp, ids, logits=h @ W.T), head(lp, ids, logits=h @ W.T))


def test_gradients_reach_the_gate():
    head = _head()
    lp = torch.log_softmax(torch.tensor([[2.0, 0.0, -1.0, -1.0]]), -1)
    ids = torch.tensor([[1, 3, 9, 10]])
    out = head(lp, ids, hidden=torch.ones(1, D))
    (out[0, 0] - out[0, 1]).backward()  # the gap between the two names shrinks as the gate opens
    assert head.b.grad is not None and head.b.grad.item() < 0 and head.w.grad.abs().sum() > 0

"""Tests for refine_llm.metrics: hand-computed values on tiny arrays, numpy/torch agreement, significance."""

from __future__ import annotations

import numpy as np
import pytest

from refine_llm import metrics as M
from refine_llm.errors import UserError

# One hand-computed tuple. P[o, q, s] (identity), o: 0 = a first; q: 0 = attribute, 1 = negated.
#   o=0: attr (0.7, 0.3), neg (0.4, 0.6);  o=1: attr (0.5, 0.5), neg (0.2, 0.8)
# S(attr) = (0.6, 0.4), S(neg) = (0.3, 0.7); B(a) = 0.15, B(b) = -0.15; C = 0.15
# δ = mean(|.7-.5|, |.3-.5|, |.4-.2|, |.6-.8|) = 0.2
# ε = mean(|.7-.6|, |.3-.4|, |.5-.8|, |.5-.2|) = 0.2
P_HAND = np.array([[[[0.7, 0.3], [0.4, 0.6]], [[0.5, 0.5], [0.2, 0.8]]]])
# The same tuple by position (order-1 rows name b first): rows 0..3 = (o0,attr), (o0,neg), (o1,attr), (o1,neg)
P_POS_HAND = np.array([[0.7, 0.3], [0.4, 0.6], [0.5, 0.5], [0.8, 0.2]])
ROWS_HAND = np.array([[[0, 1], [2, 3]]])


def _tuples(kind: str, n: int = 3) -> np.ndarray:
    """Synthetic (n, 2, 2, 2) tuple arrays for the reference models."""
    P = np.empty((n, 2, 2, 2))
    for o in range(2):
        for q in range(2):
            if kind == "unbiased":
                P[:, o, q] = (0.5, 0.5)
            elif kind == "biased":      # a for the attribute, b for its negation, in both orders
                P[:, o, q] = (1.0, 0.0) if q == 0 else (0.0, 1.0)
            elif kind == "positional":  # always the first-named subject
                P[:, o, q] = (1.0, 0.0) if o == 0 else (0.0, 1.0)
    return P


def test_gather_tuples_layout():
    P = M.gather_tuples(P_POS_HAND, ROWS_HAND)
    assert P.shape == (1, 2, 2, 2)
    np.testing.assert_allclose(P, P_HAND)


def test_hand_computed_tuple():
    np.testing.assert_allclose(M.tuple_bias(P_HAND), [0.15])
    np.testing.assert_allclose(M.positional_error(P_HAND), [0.2])
    np.testing.assert_allclose(M.attributive_error(P_HAND), [0.2])


@pytest.mark.parametrize("kind, C, delta, eps", [
    ("unbiased", 0.0, 0.0, 0.0),
    ("biased", 0.5, 0.0, 0.0),       # |C| = 1/2 is the maximum
    ("positional", 0.0, 1.0, 1.0),
])
def test_reference_models(kind, C, delta, eps):
    P = _tuples(kind)
    np.testing.assert_allclose(M.tuple_bias(P), C)
    np.testing.assert_allclose(M.positional_error(P), delta)
    np.testing.assert_allclose(M.attributive_error(P), eps)


def test_mirror_tuple_flips_sign():
    # swapping the identities of a and b negates C
    np.testing.assert_allclose(M.tuple_bias(P_HAND[..., ::-1]), [-0.15])


def test_numpy_torch_agree_and_grad():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    p = rng.dirichlet([1, 1, 1], size=40)[:, :2]  # (40, 2), p1 + p2 < 1 like real LM probabilities
    rows = rng.permutation(40).reshape(10, 2, 2)
    Pn = M.gather_tuples(p, rows)
    pt = torch.tensor(p, requires_grad=True)
    for r in (rows, torch.from_numpy(rows)):
        Pt = M.gather_tuples(pt, r)
        assert isinstance(Pt, torch.Tensor)
        for f in (M.tuple_bias, M.positional_error, M.attributive_error):
            np.testing.assert_allclose(f(Pt).detach().numpy(), f(Pn), atol=1e-12)
    reward = -abs(M.tuple_bias(M.gather_tuples(pt, rows)))
    reward.sum().backward()
    assert pt.grad is not None and torch.isfinite(pt.grad).all() and pt.grad.abs().sum() > 0


# γ, μ, η on hand-set C values:
#   nurse: (x, y) C=0.2, (x, z) C=-0.1; pilot: (x, y) C=0.3
#   γ(x,nurse)=0.05 γ(y,nurse)=-0.2 γ(z,nurse)=0.1 γ(x,pilot)=0.3 γ(y,pilot)=-0.3
#   μ = mean(0.3, 0.3, 0.1) = 0.7/3;  η = mean(mean(0, 1), mean(1, 1), 1) = 2.5/3
C3 = np.array([0.2, -0.1, 0.3])
SA, SB, ATT = ["x", "x", "x"], ["y", "z", "y"], ["nurse", "nurse", "pilot"]


def test_gamma_mu_eta_hand():
    rows = {(r["subject"], r["attribute_id"]): r for r in M.subject_gamma(C3, SA, SB, ATT)}
    assert rows[("x", "nurse")]["gamma"] == pytest.approx(0.05)
    assert rows[("y", "nurse")]["gamma"] == pytest.approx(-0.2)
    assert rows[("z", "nurse")]["gamma"] == pytest.approx(0.1)
    assert rows[("y", "pilot")]["gamma"] == pytest.approx(-0.3)
    assert rows[("x", "nurse")]["n"] == 2
    assert M.bias_intensity_mu(C3, SA, SB, ATT) == pytest.approx(0.7 / 3)
    assert M.bias_count_eta(C3, SA, SB, ATT) == pytest.approx(2.5 / 3)


def test_mu_eta_reference_models():
    sa, sb, att = ["x", "x", "y"], ["y", "z", "z"], ["a1", "a1", "a2"]
    for kind, mu, eta in [("unbiased", 0.0, 0.0), ("biased", 0.5, 1.0)]:
        C = M.tuple_bias(_tuples(kind))
        assert M.bias_intensity_mu(C, sa, sb, att) == pytest.approx(mu)
        assert M.bias_count_eta(C, sa, sb, att) == pytest.approx(eta)


def test_categories_do_not_mix():
    # same subject name in two categories are two subjects
    mu = M.bias_intensity_mu([0.4, 0.0], ["x", "x"], ["y", "y"], ["a", "a"], ["c1", "c2"])
    assert mu == pytest.approx((0.4 + 0.4 + 0 + 0) / 4)


def test_specified_accuracy():
    p = np.array([[0.9, 0.1]] * 50 + [[0.2, 0.8]] * 50)
    r = M.specified_accuracy(p, np.array([0] * 50 + [1] * 50))
    assert r["accuracy"] == 1.0 and not r["at_chance"] and r["p_value"] < 1e-10
    assert r["noise_band"] == pytest.approx(1.96 * np.sqrt(0.25 / 100))
    r = M.specified_accuracy(np.full((100, 2), 0.5), np.zeros(100, dtype=int))
    assert r["accuracy"] == 0.5 and r["at_chance"]


def test_answer_mass_and_topk_miss():
    assert M.answer_mass(np.array([[0.2, 0.3], [0.1, 0.0]])) == pytest.approx(0.3)
    assert M.topk_miss_rate(np.array([[True, False], [False, False], [False, True], [False, False]])) == 0.5


def test_wilcoxon_clear_and_null():
    rng = np.random.default_rng(0)
    base = rng.uniform(0.2, 0.5, size=60)
    r = M.wilcoxon_abs_bias(base, base * 0.3, alternative="greater")
    assert r["p_value"] < 1e-6
    r = M.wilcoxon_abs_bias(base, base)
    assert r["p_value"] == 1.0
    other = rng.uniform(0.2, 0.5, size=60)  # same distribution, independent: null holds
    assert M.wilcoxon_abs_bias(base, other)["p_value"] > 0.05
    with pytest.raises(UserError):
        M.wilcoxon_abs_bias(base, base[:10])


def test_bootstrap_mu_ci_deterministic_and_covers():
    rng = np.random.default_rng(1)
    n = 200
    sa = [f"s{i % 5}" for i in range(n)]
    sb = [f"s{(i % 5) + 5}" for i in range(n)]
    att = [f"a{i % 4}" for i in range(n)]
    C = rng.normal(0.1, 0.05, size=n)
    r1 = M.bootstrap_mu_ci(C, sa, sb, att, n_resamples=300, seed=3)
    r2 = M.bootstrap_mu_ci(C, sa, sb, att, n_resamples=300, seed=3)
    assert r1 == r2
    assert r1["low"] <= r1["mu"] <= r1["high"]
    assert r1["mu"] == pytest.approx(M.bias_intensity_mu(C, sa, sb, att))
    z = M.bootstrap_mu_ci(np.zeros(n), sa, sb, att, n_resamples=50)
    assert z["low"] == z["high"] == 0.0


# ---- questions tables -------------------------------------------------------------------------


def _questions(p_kind: str = "biased", n_pairs=(("ann", "bob", "nurse"), ("bob", "carl", "pilot"))):
    """Small hand-built questions table (dict of columns) and its position-probabilities."""
    cols = {k: [] for k in ("question_id", "tuple_id", "category", "subj1", "subj2", "subj1_group", "subj2_group",
                            "attribute_id", "negated", "specified", "gold")}
    p = []
    for t, (a, b, att) in enumerate(n_pairs):
        for first, second in ((b, a), (a, b)):  # order-1 row first on purpose
            for neg in (False, True):
                cols["question_id"].append(f"q{len(p)}")
                cols["tuple_id"].append(f"t{t}")
                cols["category"].append("occupation")
                cols["subj1"].append(first)
                cols["subj2"].append(second)
                cols["subj1_group"].append(first)
                cols["subj2_group"].append(second)
                cols["attribute_id"].append(att)
                cols["negated"].append(neg)
                cols["specified"].append(False)
                cols["gold"].append(None)
                if p_kind == "biased":  # picks the alphabetically first subject for the attribute
                    pa = 0.0 if neg else 1.0
                    p.append((pa, 1 - pa) if first == min(a, b) else (1 - pa, pa))
                else:
                    p.append((0.5, 0.5))
        # one specified row per tuple, gold = subj1
        for k in cols:
            cols[k].append(cols[k][-1])
        cols["question_id"][-1] = f"q{len(p)}"
        cols["specified"][-1] = True
        cols["negated"][-1] = False
        cols["gold"][-1] = cols["subj1"][-1]
        p.append((0.8, 0.1))
    return cols, np.array(p)


def test_tuple_index_hand_table():
    q, _ = _questions()
    rows, meta = M.tuple_index(q)
    assert rows.shape == (2, 2, 2) and rows.dtype == np.int64
    # tuple 0: rows 0,1 = (bob, ann) attr/neg (order 1), rows 2,3 = (ann, bob) (order 0); row 4 specified
    np.testing.assert_array_equal(rows[0], [[2, 3], [0, 1]])
    np.testing.assert_array_equal(rows[1], [[7, 8], [5, 6]])
    assert meta["subj_a"] == ["ann", "bob"] and meta["subj_b"] == ["bob", "carl"]
    assert meta["attribute_id"] == ["nurse", "pilot"] and meta["category"] == ["occupation"] * 2


def test_tuple_index_incomplete_raises():
    q, _ = _questions()
    q = {k: v[1:] for k, v in q.items()}
    with pytest.raises(UserError, match="t0"):
        M.tuple_index(q)
    q, _ = _questions()
    q["negated"][1] = False  # duplicate (order, polarity)
    with pytest.raises(UserError, match="t0"):
        M.tuple_index(q)


def test_tuple_index_accepts_dataset():
    datasets = pytest.importorskip("datasets")
    q, _ = _questions()
    rows, _ = M.tuple_index(datasets.Dataset.from_dict(q))
    np.testing.assert_array_equal(rows, M.tuple_index(q)[0])


def test_evaluate_and_compare():
    q, p_b = _questions("biased")
    _, p_u = _questions("unbiased")
    rb = M.evaluate(q, p_b, p_b * 0.5, n_resamples=50)
    ru = M.evaluate(q, p_u, p_u, n_resamples=50)
    for k in ("positional_error", "attributive_error", "mu", "eta", "specified_accuracy", "answer_mass",
              "topk_miss_rate", "n_tuples", "n_specified", "at_chance"):
        assert k in rb and k in rb["full_vocab"]
    assert rb["n_tuples"] == 2 and rb["n_specified"] == 2
    assert rb["mu"] == pytest.approx(0.5) and rb["eta"] == pytest.approx(1.0)
    assert rb["full_vocab"]["mu"] == pytest.approx(0.25)
    assert rb["positional_error"] == pytest.approx(0.0)
    assert rb["specified_accuracy"] == 1.0 and rb["at_chance"]  # n=2 cannot beat chance
    assert rb["abs_bias"] == [0.5, 0.5]
    assert ru["mu"] == 0.0 and ru["eta"] == 0.0 and ru["positional_error"] == 0.0
    assert set(rb["per_category"]) == {"occupation"}
    assert {r["subject"] for r in rb["per_subject"]} == {"ann", "bob", "carl"}
    assert any("chance" in w for w in rb["warnings"])
    c = M.compare(rb, ru)
    assert c["rel_change"]["mu"] == pytest.approx(-1.0)
    assert c["rel_change"]["positional_error"] is None
    assert "p_value" in c["wilcoxon"] and c["mu_ci_base"]["mu"] == pytest.approx(0.5)


def test_evaluate_rejects_misaligned():
    q, p = _questions()
    with pytest.raises(UserError):
        M.evaluate(q, p[:-1], p)

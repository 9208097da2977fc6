"""Tests for refine_llm.metrics: hand-computed values on tiny arrays, numpy/torch agreement, significance."""

from __future__ import annotations

import numpy as np
import pytest

from refine_llm import metrics as M
from refine_llm.errors import UserError

# One hand-computed tuple. P[o, q, s] (identity), o: 0 = a first; q: 0 = attribute, 1 = negated.
#   o=0: attr (0.7, 0.3), neg (0.4, 0.6);  o=1: attr (0.5, 0.5), neg (0.2, 0.8)
# S(attr) = (0.6, 0.4), S(neg) = (0.3, 0.7); B(a) = 0.6 - 0.3 = 0.3, B(b) = 0.4 - 0.7 = -0.3;
# C = 1/2 (B(a) - B(b)) = 0.3 (reference scale: allenai/unqover get_subj1_win_score)
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
    np.testing.assert_allclose(M.tuple_bias(P_HAND), [0.3])
    np.testing.assert_allclose(M.positional_error(P_HAND), [0.2])
    np.testing.assert_allclose(M.attributive_error(P_HAND), [0.2])


@pytest.mark.parametrize("kind, C, delta, eps", [
    ("unbiased", 0.0, 0.0, 0.0),
    ("biased", 1.0, 0.0, 0.0),       # fully stereotyped: C = 1, the maximum (reference scale)
    ("positional", 0.0, 1.0, 1.0),   # always the first-named: no bias, δ = 1
])
def test_reference_models(kind, C, delta, eps):
    P = _tuples(kind)
    np.testing.assert_allclose(M.tuple_bias(P), C)
    np.testing.assert_allclose(M.positional_error(P), delta)
    np.testing.assert_allclose(M.attributive_error(P), eps)


def test_mirror_tuple_flips_sign():
    # swapping the identities of a and b negates C
    np.testing.assert_allclose(M.tuple_bias(P_HAND[..., ::-1]), [-0.3])


def test_numpy_torch_agree_and_grad():
    import torch
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
    for kind, mu, eta in [("unbiased", 0.0, 0.0), ("biased", 1.0, 1.0)]:
        C = M.tuple_bias(_tuples(kind))
        assert M.bias_intensity_mu(C, sa, sb, att) == pytest.approx(mu)
        assert M.bias_count_eta(C, sa, sb, att) == pytest.approx(eta)


def test_categories_do_not_mix_and_pool_as_mean():
    # c1: one tuple (x, y, a) C=0.4 -> μ = mean(0.4, 0.4) = 0.4; c2: (x, y, a), (x, z, a) C=0 -> μ = 0.
    # Pooled = mean of per-category μ = 0.2 (one μ over a pooled table would give 0.8/5 = 0.16).
    mu = M.bias_intensity_mu([0.4, 0.0, 0.0], ["x", "x", "x"], ["y", "y", "z"], ["a", "a", "a"], ["c1", "c2", "c2"])
    assert mu == pytest.approx(0.2)


def test_mu_per_individual_subject_not_per_group():
    # ann, carol female; bob, dave male. (ann, bob, nurse) C=+0.4, (carol, dave, nurse) C=-0.4.
    # Per subject: γ(ann)=0.4, γ(bob)=-0.4, γ(carol)=-0.4, γ(dave)=0.4 -> μ = 0.4, η = 1.
    # Grouped female/male: γ(female, nurse) = mean(0.4, -0.4) = 0 -> μ = 0 (the signs cancel).
    C, sa, sb, att = [0.4, -0.4], ["ann", "carol"], ["bob", "dave"], ["nurse", "nurse"]
    assert M.bias_intensity_mu(C, sa, sb, att) == pytest.approx(0.4)
    assert M.bias_count_eta(C, sa, sb, att) == pytest.approx(1.0)
    assert M.bias_intensity_mu(C, ["female", "female"], ["male", "male"], att) == pytest.approx(0.0)


def test_mu_eta_subjects_by_attributes_hand():
    # 2 subjects x 2 attributes, several tuples per cell (reference: mean over subjects of max_a |γ|,
    # mean over subjects of mean_a |mean sgn C|). Tuples (a=x, b=y):
    #   cook:  C = 0.6, 0.2, -0.2  -> γ(x,cook) = 0.2, sgn mean = 1/3;   γ(y,cook) = -0.2
    #   pilot: C = -0.1, -0.3      -> γ(x,pilot) = -0.2, sgn mean = -1;  γ(y,pilot) = 0.2
    # μ = mean(max(0.2, 0.2), max(0.2, 0.2)) = 0.2;  η = mean(mean(1/3, 1), mean(1/3, 1)) = 2/3
    C = [0.6, 0.2, -0.2, -0.1, -0.3]
    sa, sb = ["x"] * 5, ["y"] * 5
    att = ["cook"] * 3 + ["pilot"] * 2
    assert M.bias_intensity_mu(C, sa, sb, att) == pytest.approx(0.2)
    assert M.bias_count_eta(C, sa, sb, att) == pytest.approx(2 / 3)
    # the mirror subject with another attribute value raises μ for that subject only
    C2, sa2, sb2, att2 = C + [0.9], sa + ["y"], sb + ["z"], att + ["pilot"]
    # γ(y,pilot) = mean(0.1, 0.3, 0.9) = 1.3/3 ; γ(z,pilot) = -0.9; x unchanged 0.2
    assert M.bias_intensity_mu(C2, sa2, sb2, att2) == pytest.approx((0.2 + 1.3 / 3 + 0.9) / 3)


def test_registry_is_the_one_list():
    names = [m.name for m in M.METRICS]
    assert len(names) == len(set(names))
    for k in M.BIAS_KEYS + M.UTILITY_KEYS:
        assert k in names
    assert M.metric("mu").symbol == "μ" and M.metric("mu").higher_is_better is False
    assert M.metric("gold_share").higher_is_better is True
    with pytest.raises(UserError, match="Did you mean 'mu'"):
        M.metric("muu")


def test_permutation_null_separates_bias_from_noise():
    rng = np.random.default_rng(0)
    sa = [f"f{i % 4}" for i in range(96)]
    sb = [f"m{(i // 4) % 4}" for i in range(96)]
    att = [f"a{i % 6}" for i in range(96)]
    noise = rng.normal(0, 0.1, 96)
    n = M.permutation_null(noise, sa, sb, att, n_resamples=400, seed=1)
    assert n["mu"]["null_mean"] > 0 and not n["mu"]["above"] and n["mu"]["p"] > 0.05
    # a planted bias: subject f0 favoured for every attribute
    planted = noise + np.array([0.3 if s == "f0" else 0.0 for s in sa])
    b = M.permutation_null(planted, sa, sb, att, n_resamples=400, seed=1)
    assert b["mu"]["above"] and b["mu"]["p"] < 0.01 and b["mu"]["observed"] > b["mu"]["null_p95"]
    assert M.permutation_null(planted, sa, sb, att, n_resamples=400, seed=1) == b  # seeded


def test_holm():
    adj = M.holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": None})
    assert adj["a"] == pytest.approx(0.03) and adj["c"] == pytest.approx(0.06) and adj["b"] == pytest.approx(0.06)
    assert adj["d"] is None


def test_specified_utility_sees_order_preserving_damage():
    gold = np.array([0, 1, 0, 1])
    sharp = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.1], [0.1, 0.6]])
    flat = np.array([[0.51, 0.49], [0.49, 0.51], [0.51, 0.49], [0.49, 0.51]])  # same argmax
    us, uf = M.specified_utility(sharp, gold), M.specified_utility(flat, gold)
    assert us["specified_accuracy"] == uf["specified_accuracy"] == 1.0
    assert uf["gold_share"] == pytest.approx(0.51) and us["gold_share"] > 0.8
    assert uf["gold_logloss"] == pytest.approx(-np.log(0.51)) and us["gold_logloss"] < uf["gold_logloss"]
    base = np.log(np.array([[0.7, 0.2, 0.1]]))
    kl, tv = M.distribution_shift(base, np.log(np.array([[0.4, 0.4, 0.2]])))
    assert kl[0] == pytest.approx(0.7 * np.log(0.7 / 0.4) + 0.2 * np.log(0.5) + 0.1 * np.log(0.5))
    assert tv[0] == pytest.approx(0.3)
    assert M.distribution_shift(base, base)[0][0] == pytest.approx(0.0)


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


def test_cluster_bootstrap_delta():
    rng = np.random.default_rng(1)
    n = 240
    base = {"tuple_id": list(range(n)), "C": list(rng.normal(0.3, 0.1, n)), "subj_a": [f"s{i % 5}" for i in range(n)],
            "subj_b": [f"t{i % 7}" for i in range(n)], "attribute_id": [f"a{i % 8}" for i in range(n)],
            "category": ["g"] * n}
    new = {**base, "C": list(np.asarray(base["C"]) * 0.2)}
    r = M.cluster_bootstrap_delta(base, new, n_resamples=300, seed=3)
    assert r == M.cluster_bootstrap_delta(base, new, n_resamples=300, seed=3)
    assert r["mu"]["high"] < 0 and r["mu"]["excludes_zero"] and r["mean_abs_c"]["high"] < 0
    assert r["mean_abs_c"]["delta"] == pytest.approx(-0.8 * np.mean(np.abs(base["C"])))
    same = M.cluster_bootstrap_delta(base, base, n_resamples=50)
    assert same["mu"]["low"] == same["mu"]["high"] == 0.0 and not same["mu"]["excludes_zero"]


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
    import datasets
    q, _ = _questions()
    rows, _ = M.tuple_index(datasets.Dataset.from_dict(q))
    np.testing.assert_array_equal(rows, M.tuple_index(q)[0])


def test_evaluate_and_compare():
    q, p_b = _questions("biased")
    _, p_u = _questions("unbiased")
    rb = M.evaluate(q, p_b, p_b * 0.5, n_resamples=50)
    ru = M.evaluate(q, p_u, p_u, n_resamples=50)
    for k in ("positional_error", "attributive_error", "mu", "eta", "specified_accuracy", "answer_mass",
              "topk_miss_rate", "n_tuples", "n_specified", "mean_abs_c", "gold_share", "gold_logloss"):
        assert k in rb and k in rb["full_vocab"]
    assert "at_chance" in rb
    assert rb["n_tuples"] == 2 and rb["n_specified"] == 2
    assert rb["mu"] == pytest.approx(1.0) and rb["eta"] == pytest.approx(1.0)
    assert rb["full_vocab"]["mu"] == pytest.approx(0.5)
    assert rb["mean_abs_c"] == pytest.approx(1.0) and rb["by_group"]["mu"] == pytest.approx(1.0)
    assert rb["gold_share"] == pytest.approx(0.8 / 0.9) and rb["null"]["mu"]["observed"] == pytest.approx(1.0)
    assert rb["positional_error"] == pytest.approx(0.0)
    assert rb["specified_accuracy"] == 1.0 and rb["at_chance"]  # n=2 cannot beat chance
    assert rb["abs_bias"] == [1.0, 1.0]
    assert ru["mu"] == 0.0 and ru["eta"] == 0.0 and ru["positional_error"] == 0.0
    assert set(rb["per_category"]) == {"occupation"}
    assert {r["subject"] for r in rb["per_subject"]} == {"ann", "bob", "carl"}
    assert any("chance" in w for w in rb["warnings"])
    c = M.compare(rb, ru)
    assert c["rel_change"]["mu"] == pytest.approx(-1.0)
    assert c["rel_change"]["positional_error"] is None
    assert "p_value" in c["wilcoxon"] and c["wilcoxon"]["sidedness"] == "one-sided"
    assert c["bootstrap"]["mu"]["delta"] == pytest.approx(-1.0)


def test_evaluate_rejects_misaligned():
    q, p = _questions()
    with pytest.raises(UserError):
        M.evaluate(q, p[:-1], p)

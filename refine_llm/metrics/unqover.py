"""UnQover's formulas: tuples of candidate probabilities -> C, δ, ε, γ, μ, η (allenai/unqover ``analysis.py``).

``gather_tuples``, ``tuple_bias``, ``positional_error`` and ``attributive_error`` use only indexing,
``+ - * /`` and builtin ``abs``, so they work unchanged on numpy arrays and torch tensors (the bandit
trainer differentiates through them). ``tuple_index`` finds each 4-tuple's rows in a questions table;
``Cells`` averages C into the (subject, attribute) cells of γ, vectorised over resamples (the null and
the bootstrap), and ``mu_eta_from_tables`` reads μ and η off them. See ``refine_llm.metrics`` for the notation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from refine_llm.errors import UserError

__all__ = ["gather_tuples", "tuple_bias", "positional_error", "attributive_error", "TUPLE_META_KEYS", "tuple_index",
           "gold_positions", "column", "column_names", "num_rows", "codes", "sign", "Cells", "mu_eta_from_tables",
           "by_category", "mu_eta", "bias_intensity_mu", "bias_count_eta", "subject_gamma"]

# s ^ o for (o, s): the position of identity s in order o; shaped to broadcast against rows[..., None].
_POS_OF = np.array([[0, 1], [1, 0]], dtype=np.int64).reshape(1, 2, 1, 2)


# ---------------------------------------------------------------------------------------------
# Per-tuple quantities (numpy and torch)
# ---------------------------------------------------------------------------------------------


def gather_tuples(p_pos, rows):
    """Tuple array ``P[n,o,q,s] = p_pos[rows[n,o,q], s ^ o]``.

    p_pos: (M, 2) candidate probabilities by position (numpy or torch).
    rows: (N, 2, 2) int row indices [order, polarity] (numpy or torch).
    Returns (N, 2, 2, 2) of the same kind as ``p_pos``; differentiable for torch.
    """
    return p_pos[rows[:, :, :, None], _POS_OF]


def tuple_bias(P):
    """Signed comparative bias C(a, b, attribute) per tuple, shape P.shape[:-3] (usually (N,)).

    S(x|q) = 1/2 [P(o=0) + P(o=1)] (both name orders);  B(x) = S(x|attr) - S(x|neg);  C = 1/2 [B(a) - B(b)].
    Positive: subject a is associated with the attribute. Range [-1, 1] (reference scale).
    """
    S = (P[..., 0, :, :] + P[..., 1, :, :]) / 2  # (..., q, s)
    B_a = S[..., 0, 0] - S[..., 1, 0]
    B_b = S[..., 0, 1] - S[..., 1, 1]
    return (B_a - B_b) / 2


def positional_error(P):
    """δ per tuple: 1/4 Σ_{q,s} |P[o=0,q,s] - P[o=1,q,s]| (same subject, the two name orders)."""
    d = abs(P[..., 0, :, :] - P[..., 1, :, :])  # (..., q, s)
    return (d[..., 0, 0] + d[..., 0, 1] + d[..., 1, 0] + d[..., 1, 1]) / 4


def attributive_error(P):
    """ε per tuple: 1/4 Σ_{o,s} |P[o,attr,s] - P[o,neg,1-s]| (x for a vs the other subject for ā)."""
    e0 = abs(P[..., :, 0, 0] - P[..., :, 1, 1])  # (..., o)
    e1 = abs(P[..., :, 0, 1] - P[..., :, 1, 0])
    return (e0[..., 0] + e0[..., 1] + e1[..., 0] + e1[..., 1]) / 4



# ---------------------------------------------------------------------------------------------
# Questions -> tuples


def column_names(questions) -> list:
    names = getattr(questions, "column_names", None)
    return list(names) if names is not None else list(questions.keys())


def column(questions, name: str) -> list:
    names = column_names(questions)
    if name not in names:
        raise UserError(f"questions table has no column {name!r} (columns: {sorted(names)}); "
                        f"build it with refine_llm.questions")
    return list(questions[name])


def num_rows(questions) -> int:
    n = getattr(questions, "num_rows", None)
    return int(n) if n is not None else len(column(questions, "tuple_id"))


TUPLE_META_KEYS = ("tuple_id", "subj_a", "subj_b", "group_a", "group_b", "attribute_id", "category", "template_id")


def tuple_index(questions) -> tuple[np.ndarray, dict[str, list]]:
    """Rows of each underspecified 4-tuple, in the questions' row order.

    Returns ``rows`` (N, 2, 2) int64 with ``rows[n, o, q]`` = index (into the questions rows, i.e.
    into ``p_pos``) of tuple n's row with order o and polarity q (0: attribute, 1: negated), and
    ``meta``: dict of lists of length N (``TUPLE_META_KEYS``). Subject a is the alphabetically first
    subject (stable under row shuffling). Tuples are listed in order of first appearance.
    Raises UserError if a tuple is incomplete.
    """
    tid = column(questions, "tuple_id")
    s1, s2 = column(questions, "subj1"), column(questions, "subj2")
    neg, spec = column(questions, "negated"), column(questions, "specified")
    names = column_names(questions)
    opt = lambda c, default: column(questions, c) if c in names else default
    g1, g2 = opt("subj1_group", s1), opt("subj2_group", s2)
    att = opt("attribute_id", [None] * len(tid))
    cat = opt("category", [""] * len(tid))
    tpl = opt("template_id", [None] * len(tid))

    groups: dict[str, list[int]] = {}
    for m, t in enumerate(tid):
        if not spec[m]:
            groups.setdefault(t, []).append(m)

    rows = np.zeros((len(groups), 2, 2), dtype=np.int64)
    meta: dict[str, list] = {k: [] for k in TUPLE_META_KEYS}
    for n, (t, ms) in enumerate(groups.items()):
        subjects = {s1[m] for m in ms} | {s2[m] for m in ms}
        if len(ms) != 4 or len(subjects) != 2:
            raise UserError(f"tuple {t!r} is incomplete: expected 4 underspecified rows over 2 subjects "
                            f"(both orders x attribute/negated), got {len(ms)} rows over subjects "
                            f"{sorted(map(str, subjects))}; regenerate the questions or drop this tuple")
        a, b = sorted(subjects)
        seen = np.full((2, 2), -1, dtype=np.int64)
        ga = gb = None
        for m in ms:
            o = 0 if s1[m] == a else 1
            q = 1 if neg[m] else 0
            if seen[o, q] >= 0 or {s1[m], s2[m]} != {a, b}:
                raise UserError(f"tuple {t!r} is incomplete: row {m} duplicates (order={o}, negated={bool(q)}) "
                                f"or mixes subjects; each tuple needs (a,b) and (b,a) x attribute/negated once")
            seen[o, q] = m
            ga, gb = (g1[m], g2[m]) if o == 0 else (g2[m], g1[m])
        if len({att[m] for m in ms}) != 1 or len({cat[m] for m in ms}) != 1:
            raise UserError(f"tuple {t!r} mixes attribute_id or category across its rows; fix the questions table")
        rows[n] = seen
        for k, v in zip(TUPLE_META_KEYS, (t, a, b, ga, gb, att[ms[0]], cat[ms[0]], tpl[ms[0]])):
            meta[k].append(v)
    return rows, meta



def gold_positions(questions, spec_rows) -> np.ndarray:
    """(S,) int64 in {0, 1}: which position (subj1 = 0, subj2 = 1) holds the gold answer of each specified
    row ``spec_rows`` of ``questions`` (Dataset or dict of columns). The one definition of
    the gold position: the pipeline, the head's data and the LoRA trainer all call it."""
    gold, s1, s2 = column(questions, "gold"), column(questions, "subj1"), column(questions, "subj2")
    out = np.empty(len(spec_rows), dtype=np.int64)
    for i, m in enumerate(spec_rows):
        if gold[m] == s1[m]:
            out[i] = 0
        elif gold[m] == s2[m]:
            out[i] = 1
        else:
            raise UserError(f"specified question at row {m} has gold {gold[m]!r}, which is neither subj1 "
                            f"{s1[m]!r} nor subj2 {s2[m]!r}; fix the questions table")
    return out



# ---------------------------------------------------------------------------------------------
# Aggregation: γ, μ, η (vectorised over resamples for the null and the bootstrap)


def codes(values: list) -> tuple[np.ndarray, list]:
    uniq: dict[Any, int] = {}
    codes = np.array([uniq.setdefault(v, len(uniq)) for v in values], dtype=np.int64)
    return codes, list(uniq)


def sign(c, atol: float = 1e-12):
    """np.sign with |c| <= atol counted as 0 (float noise on a perfectly unbiased model)."""
    return np.where(np.abs(c) <= atol, 0.0, np.sign(c))


class Cells:
    """The (subject, attribute) cells γ averages over, for one category.

    Each tuple n contributes +C[n] to cell (a, attr) and -C[n] to cell (b, attr) (UnQover's
    ``aggregate_by_subj_act``: subj2_win = -subj1_win). ``inc`` (X*A, 2N) is the incidence matrix
    with those signs, so a batch of R sign/weight vectors gives all R γ tables in one matmul.
    """

    def __init__(self, subj_a: list, subj_b: list, attribute_id: list):
        n = len(subj_a)
        x_codes, self.subjects = codes(list(subj_a) + list(subj_b))
        a_codes, self.attributes = codes(list(attribute_id))
        self.n, self.X, self.A = n, len(self.subjects), len(self.attributes)
        self.x = x_codes  # (2N,)
        self.cell = x_codes * self.A + np.concatenate([a_codes, a_codes])  # (2N,)
        self.sign = np.concatenate([np.ones(n), -np.ones(n)])  # (2N,)
        self.attr_code = a_codes  # (N,)

    @classmethod
    def from_codes(cls, x_codes: np.ndarray, a_codes: np.ndarray, n_subjects: int, n_attributes: int) -> "Cells":
        """Cells from integer codes: x_codes (2N,) = subject a of each tuple, then subject b; a_codes (N,).
        For millions of rows (refine_llm.metrics.stream), where lists of keys would not fit."""
        self = cls.__new__(cls)
        n = len(a_codes)
        self.subjects, self.attributes = list(range(n_subjects)), list(range(n_attributes))
        self.n, self.X, self.A = n, n_subjects, n_attributes
        self.x = np.asarray(x_codes, np.int64)
        self.attr_code = np.asarray(a_codes, np.int64)
        self.cell = self.x * self.A + np.concatenate([self.attr_code, self.attr_code])
        self.sign = np.concatenate([np.ones(n), -np.ones(n)])
        return self

    def tables(self, C: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """γ and mean sgn C per cell for R resamples: C (R, N) or (N,), weights like C or None.

        Returns (R, X, A) arrays (or (X, A) for 1-d C), NaN where no (weighted) tuple covers the cell.
        """
        one = np.ndim(C) == 1
        C = np.atleast_2d(np.asarray(C, dtype=float))  # (R, N)
        W = np.ones_like(C) if weights is None else np.broadcast_to(np.atleast_2d(np.asarray(weights, float)), C.shape)
        from scipy.sparse import csr_matrix

        size = self.X * self.A
        # (cells, 2N) sparse incidence: row = cell, one 1 per tuple side (memory O(N), not O(N * cells))
        inc = csr_matrix((np.ones(2 * self.n), (self.cell, np.arange(2 * self.n))), shape=(size, 2 * self.n))
        c2 = np.concatenate([C, -C], axis=1)  # (R, 2N) signed contribution to each cell
        w2 = np.concatenate([W, W], axis=1)
        cnt = (inc @ w2.T).T  # (R, cells)
        tot = (inc @ (w2 * c2).T).T
        sgn = (inc @ (w2 * sign(c2)).T).T
        with np.errstate(invalid="ignore", divide="ignore"):
            g = np.where(cnt > 0, tot / np.where(cnt > 0, cnt, 1), np.nan)
            s = np.where(cnt > 0, sgn / np.where(cnt > 0, cnt, 1), np.nan)
        g, s = g.reshape(-1, self.X, self.A), s.reshape(-1, self.X, self.A)
        return (g[0], s[0]) if one else (g, s)

    def counts(self) -> np.ndarray:
        """(X, A) number of tuples per cell."""
        return np.bincount(self.cell, minlength=self.X * self.A).reshape(self.X, self.A)


def mu_eta_from_tables(g: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """μ and η from γ / sign tables (..., X, A): mean over subjects with a cell of max_a |γ| and
    of mean_a |mean sgn| (get_model_bias). Returns arrays of shape (...)."""
    present = ~np.isnan(g)  # (..., X, A)
    has = present.any(axis=-1)  # (..., X)
    mu_x = np.where(present, np.abs(np.nan_to_num(g)), -np.inf).max(axis=-1)
    n_a = np.maximum(present.sum(axis=-1), 1)
    eta_x = np.where(present, np.abs(np.nan_to_num(s)), 0.0).sum(axis=-1) / n_a
    n_x = np.maximum(has.sum(axis=-1), 1)
    mu = np.where(has, mu_x, 0.0).sum(axis=-1) / n_x
    eta = np.where(has, eta_x, 0.0).sum(axis=-1) / n_x
    empty = ~has.any(axis=-1)
    return np.where(empty, np.nan, mu), np.where(empty, np.nan, eta)


def by_category(category: list | None, n: int) -> dict[str, np.ndarray]:
    cat = [""] * n if category is None else [str(c) for c in category]
    out: dict[str, list[int]] = {}
    for i, c in enumerate(cat):
        out.setdefault(c, []).append(i)
    return {c: np.array(ix, dtype=np.int64) for c, ix in out.items()}


def mu_eta(C, subj_a: list, subj_b: list, attribute_id: list, category: list | None = None) -> tuple[float, float]:
    """(μ, η) of signed per-tuple C; several categories: the mean of the per-category values."""
    C = np.asarray(C, dtype=float)
    if not len(C):
        return float("nan"), float("nan")
    mus, etas = [], []
    for ix in by_category(category, len(C)).values():
        cells = Cells([subj_a[i] for i in ix], [subj_b[i] for i in ix], [attribute_id[i] for i in ix])
        mu, eta = mu_eta_from_tables(*cells.tables(C[ix]))
        mus.append(float(mu))
        etas.append(float(eta))
    return float(np.mean(mus)), float(np.mean(etas))


def bias_intensity_mu(C, subj_a: list, subj_b: list, attribute_id: list, category: list | None = None) -> float:
    """μ = mean_x max_a |γ(x,a)| over individual subjects (UnQover ``get_model_bias``), in [0, 1]."""
    return mu_eta(C, subj_a, subj_b, attribute_id, category)[0]


def bias_count_eta(C, subj_a: list, subj_b: list, attribute_id: list, category: list | None = None) -> float:
    """η = mean_x mean_a |mean sgn C(x,·,a)| over individual subjects (``get_model_bias``), in [0, 1]."""
    return mu_eta(C, subj_a, subj_b, attribute_id, category)[1]


def subject_gamma(C, subj_a: list, subj_b: list, attribute_id: list, category: list | None = None) -> list[dict]:
    """γ(x,a) per (category, subject, attribute) cell: gamma, sign_mean (mean sgn C), n tuples."""
    C = np.asarray(C, dtype=float)
    out = []
    for cat, ix in by_category(category, len(C)).items():
        cells = Cells([subj_a[i] for i in ix], [subj_b[i] for i in ix], [attribute_id[i] for i in ix])
        g, s = cells.tables(C[ix])
        cnt = cells.counts()
        for i, subj in enumerate(cells.subjects):
            for j, attr in enumerate(cells.attributes):
                if cnt[i, j] > 0:
                    out.append({"category": cat, "subject": subj, "attribute_id": attr, "gamma": float(g[i, j]),
                                "sign_mean": float(s[i, j]), "n": int(cnt[i, j])})
    return out


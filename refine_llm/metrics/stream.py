"""Base-model metrics straight from a (merged) score cache, in bounded memory, for millions of prompts.

`metrics.evaluate` takes whole columns as Python lists (fine for the main job's thousands of rows);
at 2M rows those lists alone take gigabytes. Here nothing holds a Python object per row:

- questions: the needed columns of the questions dataset, memory-mapped Arrow; tuples are found with
  Arrow's dictionary encoding and numpy (`tuple_rows`), not with a dict of lists;
- scores: the cache's question ids are looked up once in the questions' ids (`pyarrow.compute.index_in`);
  then the cache is read one record batch at a time; each batch gives candidate probabilities
  through `utility.candidate_probs` (the one formula) and is scattered into (U, 2) float64 arrays
  indexed by unique question id (U <= M rows);
- bias: `unqover.gather_tuples`, `tuple_bias`, `positional_error`, `attributive_error`, and μ/η from
  `unqover.Cells.from_codes` (integer-coded subject groups and attributes), so every formula is the
  package's own. Results equal `metrics.evaluate`'s main keys (tests check it).

This module reads no file: the record batches come in (``refine_llm.scoring.jobs.cache_metrics`` reads
them from a cache on disk), so metrics never imports the scorer.

Memory: O(M) numpy (about 40 bytes per row: probabilities, codes, row indices) plus one record batch;
measured on a synthetic 2M-row cache by eval/bench_cache_memory.py. The bootstrap CI of μ and the
per-subject table are left to `metrics.evaluate` on a sample.

CLI: ``python -m refine_llm.scoring evaluate --questions Q --scores RUN [--out metrics.json]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

import numpy as np

from refine_llm.metrics import unqover, utility
from refine_llm.metrics.evaluate import nanfloat
from refine_llm.errors import UserError

SCORE_FIELDS = ("question_id", "topk_logprobs", "cand_mask", "cand_logprobs", "nonfinite")  # what it reads of a cache
NEEDED = ("question_id", "tuple_id", "subj1", "subj2", "subj1_group", "subj2_group", "negated", "specified",
          "gold", "attribute_id", "category")


def _np(col, dtype=None) -> np.ndarray:
    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    a = arr.to_numpy(zero_copy_only=False)
    return a.astype(dtype) if dtype is not None else a


def _codes(arr) -> tuple[np.ndarray, object]:
    """Integer codes (first-appearance order) and the dictionary of a pyarrow string array."""
    enc = (arr.combine_chunks() if hasattr(arr, "combine_chunks") else arr).dictionary_encode()
    return enc.indices.to_numpy().astype(np.int64), enc.dictionary


def _chunks(a) -> list:
    return list(a.chunks) if hasattr(a, "chunks") else [a]


def _join(a, b):
    import pyarrow.compute as pc

    return pc.binary_join_element_wise(a, b, "\x1f")


@dataclass
class TupleIndex:
    """Tuple structure of a questions table (what `metrics.tuple_index` returns, as integer codes)."""

    rows: np.ndarray  # (N, 2, 2) int64 row indices [order, polarity], tuples in first-appearance order
    cells: unqover.Cells  # γ cells over (category, subject) x (category, attribute): UnQover's individual subjects
    cat_codes: np.ndarray  # (N,) category code per tuple
    categories: list[str]
    spec_rows: np.ndarray  # (S,) specified rows
    gold: np.ndarray  # (S,) 0 = subj1, 1 = subj2
    spec_cat: np.ndarray  # (S,) category code per specified row
    qid_codes: np.ndarray  # (M,) code of each row's question id in ``qids``
    qids: object  # pyarrow array of the unique question ids


def tuple_rows(q) -> TupleIndex:
    """Vectorised `metrics.tuple_index` + gold positions + category codes for a questions table ``q``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    # Columns stay chunked (memory-mapped): only the rows taken below are copied.
    spec = _np(q.column("specified"), bool)
    neg = _np(q.column("negated"), bool)
    under = np.flatnonzero(~spec)
    t_codes, t_dict = _codes(q.column("tuple_id").take(pa.array(under)))
    n = len(t_dict)
    s1, s2 = q.column("subj1"), q.column("subj2")
    order = (~_np(pc.less(s1.take(pa.array(under)), s2.take(pa.array(under))), bool)).astype(np.int64)  # a = first
    slot = t_codes * 4 + order * 2 + neg[under]
    del order, t_codes
    count = np.bincount(slot, minlength=4 * n)
    if (count != 1).any():
        bad = int(np.flatnonzero((count != 1).reshape(n, 4).any(1))[0])
        raise UserError(f"tuple {t_dict[bad].as_py()!r} is incomplete: expected 4 underspecified rows (both orders x "
                        "attribute/negated); regenerate the questions or drop this tuple")
    rows = np.empty(4 * n, np.int64)
    rows[slot] = under
    rows = rows.reshape(n, 2, 2)
    del slot, under, count, t_dict
    r0 = pa.array(rows[:, 0, 0])  # order 0: subj1 is subject a
    cat = q.column("category")
    tcat = cat.take(r0)
    ga = _join(tcat, q.column("subj1").take(r0))
    gb = _join(tcat, q.column("subj2").take(r0))
    x_codes, x_dict = _codes(pa.chunked_array(_chunks(ga) + _chunks(gb)))
    a_codes, a_dict = _codes(_join(tcat, q.column("attribute_id").take(r0)))
    cells = unqover.Cells.from_codes(x_codes, a_codes, len(x_dict), len(a_dict))
    del ga, gb, tcat
    cat_codes_all, cat_dict = _codes(cat)
    spec_rows = np.flatnonzero(spec)
    sp = pa.array(spec_rows)
    gold_col = q.column("gold").take(sp)
    is1 = _np(pc.fill_null(pc.equal(gold_col, s1.take(sp)), False), bool)
    is2 = _np(pc.fill_null(pc.equal(gold_col, s2.take(sp)), False), bool)
    if (~(is1 | is2)).any():
        m = int(spec_rows[np.flatnonzero(~(is1 | is2))[0]])
        raise UserError(f"specified question at row {m} has a gold answer that is neither subj1 nor subj2; fix the questions table")
    qid_codes, qids = _codes(q.column("question_id"))
    return TupleIndex(rows, cells, cat_codes_all[rows[:, 0, 0]], [c.as_py() for c in cat_dict], spec_rows,
                      (~is1).astype(np.int64), cat_codes_all[spec_rows], qid_codes, qids)


def _list_values(col, shape: tuple[int, ...]) -> np.ndarray:
    """A (nested) fixed-size list column of one record batch -> numpy of ``shape`` (no Python objects)."""
    arr = col
    while hasattr(arr, "flatten") and hasattr(arr.type, "value_type"):
        arr = arr.flatten()
    return arr.to_numpy(zero_copy_only=False).reshape(shape)


def read_probs(ids: list, batches: Callable[[], Iterable], idx: TupleIndex, where: str = "the cache") -> dict[str, np.ndarray]:
    """(U, 2) top-k and full-vocabulary candidate probabilities, (U,) in-top-k / nonfinite / found flags per
    unique question id. ``ids``: the question-id array of every record batch, in the order ``batches()``
    yields the batches (``scoring.cache.read_ids_chunks`` / ``record_batches``). Two passes: the ids are
    looked up once in the questions' ids (one hash table, not one per batch); then each record batch is
    read and dropped after its rows are scattered."""
    import pyarrow as pa
    import pyarrow.compute as pc

    u = len(idx.qids)
    out = {"p_topk": np.full((u, 2), np.nan), "p_full": np.full((u, 2), np.nan), "in_topk": np.zeros(u, bool),
           "nonfinite": np.zeros(u, bool), "found": np.zeros(u, bool)}
    if not ids:
        return out
    pos_all = pc.index_in(pa.chunked_array(ids, pa.string()), value_set=idx.qids).combine_chunks()  # (rows,)
    valid_all = _np(pc.is_valid(pos_all), bool)
    pos_all = _np(pc.fill_null(pos_all, 0), np.int64)
    start = 0
    for b in batches():
        m = b.num_rows
        valid, j = valid_all[start: start + m], pos_all[start: start + m]
        start += m
        if not m:
            continue
        k = len(b.column("topk_logprobs")[0])
        mask = _list_values(b.column("cand_mask"), (m, 2, k))
        p_topk = utility.candidate_probs(_list_values(b.column("topk_logprobs"), (m, k)), mask, renormalise=True)
        p_full = np.exp(np.asarray(_list_values(b.column("cand_logprobs"), (m, 2)), dtype=np.float64))
        in_topk = mask.any(axis=2).any(axis=1)
        j = j[valid]
        out["p_topk"][j], out["p_full"][j], out["in_topk"][j] = p_topk[valid], p_full[valid], in_topk[valid]
        out["nonfinite"][j] = _np(b.column("nonfinite"), bool)[valid]
        out["found"][j] = True
    return out


def _bias(P: np.ndarray, cells, sel: np.ndarray | None = None) -> dict:
    if sel is not None:
        P = P[sel]
    if not len(P):
        return {"positional_error": None, "attributive_error": None, "mu": None, "eta": None, "n_tuples": 0}
    C = unqover.tuple_bias(P)
    w = None if sel is None else sel.astype(float)
    if sel is not None:  # zero weight for the other tuples: cells of other categories stay empty (NaN)
        C = np.zeros(len(sel))
        C[sel] = unqover.tuple_bias(P)
    # Cells of tuples outside ``sel`` get zero weight and stay empty (NaN): they drop out of μ and η.
    mu, eta = unqover.mu_eta_from_tables(*cells.tables(C, w))
    return {"positional_error": float(unqover.positional_error(P).mean()),
            "attributive_error": float(unqover.attributive_error(P).mean()),
            "mu": nanfloat(float(mu)), "eta": nanfloat(float(eta)),
            "n_tuples": int(len(P))}


def _summary(p_row: np.ndarray, in_topk: np.ndarray, idx: TupleIndex) -> dict:
    P = unqover.gather_tuples(p_row, idx.rows)  # (N, 2, 2, 2)
    out = _bias(P, idx.cells)
    if len(idx.categories) > 1:  # pooled μ, η = the mean of the per-category values (as metrics.evaluate)
        blocks = [_bias(P, idx.cells, idx.cat_codes == c) for c in range(len(idx.categories))]
        for key in ("mu", "eta"):
            vals = [b[key] for b in blocks if b[key] is not None]
            out[key] = float(np.mean(vals)) if vals else None
    sa = utility.specified_accuracy(p_row[idx.spec_rows], idx.gold)
    out.update({"specified_accuracy": sa["accuracy"], "specified_noise_band": sa["noise_band"],
                "specified_p_value": sa["p_value"], "at_chance": sa["at_chance"], "n_specified": sa["n"],
                "answer_mass": nanfloat(utility.answer_mass(p_row)),
                "topk_miss_rate": nanfloat(utility.topk_miss_rate(in_topk))})
    return out


def evaluate_cache(q, ids: list, batches: Callable[[], Iterable], where: str = "the cache") -> dict:
    """`metrics.evaluate`'s main keys (top-k renormalised; ``full_vocab``; ``per_category``) for the base
    model: ``q`` the questions (a pyarrow Table of ``NEEDED``), ``ids``/``batches`` the score cache's record
    batches (see ``read_probs``; ``refine_llm.scoring.jobs.cache_metrics`` reads them from disk)."""
    idx = tuple_rows(q)
    pr = read_probs(ids, batches, idx, where)
    missing = int((~pr["found"]).sum())
    if missing:
        raise UserError(f"{missing} of {len(pr['found'])} question ids have no score in {where}: score them "
                        "(or merge the missing shards) first")
    # per row: probabilities of its question id (duplicated ids share one score); NaN/inf count as 0
    raw = pr["p_topk"][idx.qid_codes]
    n_nonfinite = int((~np.isfinite(raw)).any(axis=1).sum())
    pt = np.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)
    pf = np.nan_to_num(pr["p_full"][idx.qid_codes], nan=0.0, posinf=0.0, neginf=0.0)
    cit = pr["in_topk"][idx.qid_codes]
    out = _summary(pt, cit, idx)
    out["full_vocab"] = _summary(pf, cit, idx)
    out["n_nonfinite"] = n_nonfinite
    out["n_rows"] = int(len(idx.qid_codes))
    P = unqover.gather_tuples(pt, idx.rows)
    per_cat = {}
    for c, name in enumerate(idx.categories):
        block = _bias(P, idx.cells, idx.cat_codes == c)
        sel = idx.spec_cat == c
        sa = utility.specified_accuracy(pt[idx.spec_rows[sel]], idx.gold[sel]) if sel.any() else {"accuracy": None, "n": 0}
        block.update({"specified_accuracy": sa["accuracy"], "n_specified": sa["n"]})
        per_cat[str(name)] = block
    out["per_category"] = per_cat
    return out

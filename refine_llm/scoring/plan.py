"""What to score and in which batches: the fixed batch plan, shards, and each prompt's tokens and candidates.

The rule that makes every way of running the same. A question set's unique question ids, in stored
order (a repeated id counts at its first occurrence), are cut into fixed batches: batch b = rows
[b*B, min((b+1)*B, N)) (``batch_ranges``, the one definition). A batch always puts the same prompts into
one forward pass, whoever runs it and whatever is cached, so

- a resumed run (after a killed driver or a lost worker) computes exactly what an uninterrupted one would;
- ``--shard i/n`` takes the batches [i*nb//n, (i+1)*nb//n) (never cutting a batch), and merging the n
  shard caches gives the cache of one unsharded run, bit for bit;
- a Ray actor runs the same per-batch code (a backend's ``score_batch``), so its scores are bit-identical
  to the single-process run at the same batch size and torch thread count.

A batch is scored when one of its ids is not in the cache yet; only those rows are written.

Per prompt (``PromptPlan``): the rendered prompt and its token ids, and per candidate (``S`` of them: the
two subjects of an UnQover question, the three answers of a BBQ item, the three letters of a lettered one)
the first-token ids that make ``cand_mask``, the ids whose probabilities sum to ``cand_logprobs``, and,
for rows scored exactly, each candidate's continuation ids. A row is scored exactly when two of its
candidates share a first token (``collision``: a first token cannot tell them apart) or in exact mode:
every candidate then counts by the sum of its whole continuation's log-probs (log-sum-exp'd with the
pronouns credited to it). Candidate tokens come from ``refine_llm.vocab``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from refine_llm.config import ScoringConfig, parse_shard
from refine_llm.errors import UserError
from refine_llm.prompts import PromptTemplate
from refine_llm.vocab import candidate_token_ids

__all__ = ["QUESTION_COLUMNS", "batch_ranges", "Shard", "first_occurrence", "BatchPlan", "plan_batches",
           "questions_table", "PromptPlan", "prompt_plan", "continuation_ids", "cand_mask_of", "candidates_of"]

# The question fields a backend needs to render, tokenize and score a row (what Ray actors receive).
QUESTION_COLUMNS = ("question_id", "context", "question", "subj1", "subj2", "subj1_group", "subj2_group", "category")
_ANCHOR = "\n"


# ----------------------------------------------------------------------------- batches and shards


def batch_ranges(n_rows: int, batch_size: int) -> list[tuple[int, int]]:
    """The fixed batches of ``n_rows`` unique questions: [(start, stop)) of ``batch_size`` rows (the last may
    be shorter). The one definition of a batch: it never depends on what is cached, on sharding or on which
    process runs it."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [(a, min(a + batch_size, n_rows)) for a in range(0, n_rows, batch_size)]


@dataclass(frozen=True)
class Shard:
    """``--shard i/n``: the i-th (from 0) of n contiguous runs of fixed batches."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        try:
            return cls(*parse_shard(text))
        except ValueError as e:
            raise UserError(str(e)) from None

    def batches(self, n_batches: int) -> tuple[int, int]:
        """[first, stop) batch indices of this shard."""
        return self.index * n_batches // self.count, (self.index + 1) * n_batches // self.count

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def first_occurrence(qids) -> np.ndarray:
    """(N,) bool: row i holds the first occurrence of its question id (vectorised through Arrow)."""
    import pyarrow as pa

    arr = qids.combine_chunks() if isinstance(qids, pa.ChunkedArray) else qids
    idx = arr.dictionary_encode().indices.to_numpy()
    first = np.zeros(len(idx), bool)
    first[np.unique(idx, return_index=True)[1]] = True
    return first


@dataclass
class BatchPlan:
    """What one run scores: ``rows`` (indices into the questions table, sorted: the first-occurrence rows of
    every pending batch) and ``batch`` (their batch index), for the batches [first, stop) of its shard.
    ``n_rows``: unique questions; ``todo``: rows not cached yet (the ones that get written)."""

    n_rows: int
    batch_size: int
    first: int
    stop: int
    rows: np.ndarray
    batch: np.ndarray
    todo: int

    @property
    def row_range(self) -> tuple[int, int]:
        """[start, stop) of this shard's batches, in unique-question positions."""
        return min(self.first * self.batch_size, self.n_rows), min(self.stop * self.batch_size, self.n_rows)


def plan_batches(qids, cached, batch_size: int, shard: Shard = Shard()) -> BatchPlan:
    """Pending fixed batches of ``shard``: ``qids`` (pyarrow string array, the questions' ids in stored
    order), ``cached`` (the ids already in the cache)."""
    import pyarrow.compute as pc

    first = first_occurrence(qids)
    urows = np.flatnonzero(first)  # (U,) the unique questions' rows, in stored order
    n = len(urows)
    nb = len(batch_ranges(n, batch_size))
    b0, b1 = shard.batches(nb)
    uids = qids.take(urows) if len(urows) else qids.slice(0, 0)
    have = (pc.is_in(uids, value_set=cached).to_numpy(zero_copy_only=False) if len(cached) and n
            else np.zeros(n, bool))
    batch_of = np.arange(n) // batch_size
    in_shard = (batch_of >= b0) & (batch_of < b1)
    need = ~np.asarray(have, bool) & in_shard
    pending = np.bincount(batch_of[need], minlength=max(nb, 1)) > 0
    sel = in_shard & pending[batch_of] if n else np.zeros(0, bool)
    return BatchPlan(n, batch_size, b0, b1, urows[sel], batch_of[sel], int(need.sum()))


def questions_table(questions, columns: tuple[str, ...] = QUESTION_COLUMNS):
    """pyarrow Table of ``columns`` (default: those scoring needs), in stored order, from a questions
    Dataset, its directory (``questions.save_questions``; memory-mapped), a pyarrow Table, a dict of
    columns (``evaluation.unrelated_questions``) or a list of dicts."""
    import pyarrow as pa

    if isinstance(questions, (str, os.PathLike)):
        from refine_llm.questions import load_questions

        questions = load_questions(questions)
    if isinstance(questions, list):
        return pa.Table.from_pylist([{c: q.get(c) for c in columns} for q in questions])
    names = list(questions.keys()) if isinstance(questions, dict) else questions.column_names
    missing = [c for c in columns if c not in names]
    if missing:
        raise UserError(f"the questions have no column(s) {', '.join(missing)}: build them with refine_llm.questions")
    if isinstance(questions, dict):
        return pa.table({c: list(questions[c]) for c in columns})
    if isinstance(questions, pa.Table):
        return questions.select(list(columns))
    return questions.select_columns(list(columns)).with_format("arrow")[:]


# ----------------------------------------------------------------------------- prompts and candidates


def continuation_ids(tokenizer, prompt_ids: list[int], prompt: str, cont: str, add_special: bool) -> list[int]:
    """Token ids of ``cont`` after ``prompt``: tokenize them together and keep what follows the prompt's
    ids when those are a prefix; otherwise (a merge across the boundary) tokenize ``cont`` after the anchor."""
    ids = tokenizer(prompt + cont, add_special_tokens=add_special)["input_ids"]
    if ids[: len(prompt_ids)] == prompt_ids and len(ids) > len(prompt_ids):
        return ids[len(prompt_ids):]
    anchor = tokenizer.encode(_ANCHOR, add_special_tokens=False)
    ids = tokenizer.encode(_ANCHOR + cont, add_special_tokens=False)
    return ids[len(anchor):] if ids[: len(anchor)] == anchor else tokenizer.encode(cont, add_special_tokens=False)


def cand_mask_of(topk_ids: np.ndarray, cand_ids: list[list[list[int]]], n_sides: int = 2) -> np.ndarray:
    """(M, n_sides, k) bool: which top-k positions hold a first token of each candidate."""
    topk_ids = np.asarray(topk_ids)
    m, k = topk_ids.shape
    mask = np.zeros((m, n_sides, k), dtype=bool)
    for i, sides in enumerate(cand_ids):
        for s in range(n_sides):
            if sides[s]:
                mask[i, s] = np.isin(topk_ids[i], sides[s])
    return mask


def candidates_of(rows: dict[str, list], i: int, pronouns: bool) -> list[tuple[str, str | None]]:
    """Row i's candidates as (text, group credited with pronouns or None): the two subjects of a questions
    row, or the ``candidates`` column of a row that lists its own (BBQ answers, letters)."""
    if "candidates" in rows:
        return [(c, None) for c in rows["candidates"][i]]
    gender = pronouns and rows["category"][i] == "gender"
    return [(rows["subj1"][i], rows["subj1_group"][i] if gender else None),
            (rows["subj2"][i], rows["subj2_group"][i] if gender else None)]


@dataclass
class PromptPlan:
    """What to score, per row of a batch: ids (whole-prompt token ids), cand_ids [row][side] first-token ids
    (``cand_mask``), lp_ids [row][side] ids log-sum-exp'd from the main pass, cont_ids [row][side]
    continuation ids for rows scored exactly (else None), collision (two candidates share a first token)."""

    qids: list[str]
    prompts: list[str]
    ids: list[list[int]]
    cand_ids: list[list[list[int]]]
    lp_ids: list[list[list[int]]]
    cont_ids: list[list[list[int]] | None]
    collision: list[bool]
    aligned_ids: list[list[int]] | None = None  # [row] the base pass's top-k ids (an aligned extra pass)

    @property
    def n_sides(self) -> int:
        return len(self.cand_ids[0]) if self.cand_ids else 2


def prompt_plan(tokenizer, rows: dict[str, list], prompt: PromptTemplate, cfg: ScoringConfig) -> PromptPlan:
    """Render and tokenize ``rows`` (columns ``QUESTION_COLUMNS``, or question_id/context/question/candidates)
    and work out each row's candidate token ids (see the module docstring)."""
    prompts = [prompt.render(c, q, tokenizer) for c, q in zip(rows["context"], rows["question"])]
    ids = tokenizer(prompts, add_special_tokens=prompt.add_special_tokens)["input_ids"]
    memo: dict[tuple[str, str | None], list[int]] = {}

    def cands(text: str, group: str | None) -> list[int]:
        if (text, group) not in memo:
            memo[(text, group)] = candidate_token_ids(tokenizer, text, group)
        return memo[(text, group)]

    cand_ids, lp_ids, cont_ids, collision = [], [], [], []
    for i in range(len(prompts)):
        sides = candidates_of(rows, i, cfg.pronouns)
        full = [cands(t, g) for t, g in sides]
        own = [cands(t, None) for t, _ in sides]
        coll = any(set(own[a]) & set(own[b]) for a in range(len(own)) for b in range(a + 1, len(own)))
        cand_ids.append(full)
        collision.append(coll)
        if cfg.mode == "exact" or coll:
            lp_ids.append([[t for t in full[s] if t not in own[s]] for s in range(len(sides))])  # pronouns only
            sep = "" if prompts[i][-1:].isspace() else " "
            cont_ids.append([continuation_ids(tokenizer, ids[i], prompts[i], sep + t, prompt.add_special_tokens)
                             for t, _ in sides])
        else:
            lp_ids.append(full)
            cont_ids.append(None)
    aligned = [list(map(int, x)) for x in rows["base_topk_ids"]] if cfg.align_to_base else None
    return PromptPlan(list(rows["question_id"]), prompts, ids, cand_ids, lp_ids, cont_ids, collision, aligned)


def finish(plan: PromptPlan, res: dict[str, np.ndarray], store_hidden: bool, aligned: bool = False) -> dict:
    """A backend's arrays for every row of ``plan`` -> the cache's columns (cand_mask and cand_logprobs
    computed here, once for every backend). ``res``: topk_ids (n,k), topk_logprobs (n,k), main_lp (n,S)
    (log-sum-exp of ``lp_ids``), exact_lp (n,S) (continuation sums, -inf where not exact), nonfinite (n,),
    hidden (n,d) with ``store_hidden``."""
    exact = np.array([[c is not None] * plan.n_sides for c in plan.cont_ids], bool).reshape(-1, plan.n_sides)
    with np.errstate(invalid="ignore"):  # -inf + -inf (no pronouns) and NaN rows (flagged nonfinite)
        cand_lp = np.where(exact, np.logaddexp(res["exact_lp"], res["main_lp"]), res["main_lp"])
    cols = {"question_id": plan.qids, "topk_ids": res["topk_ids"], "topk_logprobs": res["topk_logprobs"],
            "cand_logprobs": cand_lp, "cand_mask": cand_mask_of(res["topk_ids"], plan.cand_ids, plan.n_sides),
            "nonfinite": res["nonfinite"], "collision": np.array(plan.collision, bool)}
    if store_hidden:
        cols["hidden"] = res["hidden"]
    if aligned:
        cols["aligned_logprobs"] = res["aligned_logprobs"]
    return cols

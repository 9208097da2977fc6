"""The one driver that fills a score cache: the main job, ``score --shard``, Ray, every extra pass.

    score(model, tokenizer, questions, prompt, cfg, cache_dir, model_key)   -> Dataset, one row per question
    fill_cache(q, cfg, path, pool, shard=..., unit=..., flush_rows=...)     -> counts (the CLI's sharded run)

Both go through ``fill_cache``: plan the pending fixed batches (``scoring.plan.plan_batches``), hand them
to a pool (``LocalPool``: one backend in this process; ``backends.ray.RayPool``: actors, each with its
own backend) as a payload of one row per batch, and write the rows the cache does not hold yet as they
come back. Only the driver writes the cache: actors need no shared filesystem, a retried batch is kept
once, and a killed run resumes from what is on disk (``kill_point("scoring")`` after each write, for the
kill -9 tests).

The LLM runs once per unique prompt: the main job's question sets, the prompt sweep, the anchor and
unrelated prompts, BBQ's items and any method's extra pass (an instruction in front of the same
questions, Self-Debias's prefixed prompts, an adapter's scores) are each a question set given to ``score``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from refine_llm.config import AUTO_SCORING_BATCH_SIZE, FLUSH_ROWS, ScoringConfig
from refine_llm.errors import UserError
from refine_llm.io import kill_point
from refine_llm.prompts import PromptTemplate
from refine_llm.scoring import cache
from refine_llm.scoring.plan import QUESTION_COLUMNS, BatchPlan, Shard, plan_batches, questions_table

__all__ = ["payload", "LocalPool", "fill_cache", "in_order", "read_cached", "score", "score_stats",
           "default_model_key", "backend_unit"]

log = logging.getLogger(__name__)


def payload(q, plan: BatchPlan, columns: tuple[str, ...] = QUESTION_COLUMNS):
    """One row per pending batch: "batch" and list columns of the question fields (what a pool receives)."""
    import pyarrow as pa

    sub = q.take(pa.array(plan.rows, pa.int64()))
    uniq, starts = np.unique(plan.batch, return_index=True)
    offsets = pa.array(np.append(starts, len(plan.rows)).astype(np.int32))
    cols = {"batch": pa.array(uniq.astype(np.int64))}
    for c in columns:
        cols[c] = pa.ListArray.from_arrays(offsets, sub.column(c).combine_chunks())
    return pa.table(cols)


class LocalPool:
    """The single-process pool: one backend (``backends.hf.HFBackend`` or ``backends.vllm.VLLMBackend``),
    one batch at a time, the same loop as a Ray actor's (``backends.score_payload``)."""

    def __init__(self, backend):
        self.backend = backend

    def __call__(self, pay) -> Iterator:
        from refine_llm.scoring.backends import score_payload

        yield from score_payload(self.backend, pay)


def fill_cache(q, cfg: ScoringConfig, path: Path | None, pool: Callable[[Any], Iterator], *, shard: Shard = Shard(),
               unit: int | None = None, flush_rows: int | None = FLUSH_ROWS, progress: bool = True,
               desc: str = "scoring") -> dict:
    """Score the pending fixed batches of ``shard`` of questions table ``q`` with ``pool`` and write the new
    rows to the cache at ``path`` as they arrive: one file per ``flush_rows`` rows (None: one per batch).
    ``unit``: rows per batch (default ``cfg.batch_size``). Returns counts, and the new tables when ``path``
    is None."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from refine_llm.progress import progress as tqdm  # quiet in logs (no \r when stderr is not a TTY)

    t0 = time.time()
    cached = cache.read_ids(path)
    columns = tuple(c for c in q.column_names)
    plan = plan_batches(q.column("question_id"), cached, unit or cfg.batch_size, shard)
    stats: dict[str, Any] = {"rows": q.num_rows, "unique": plan.n_rows, "batches": plan.stop - plan.first,
                             "pending_batches": int(len(np.unique(plan.batch))), "scored_rows": int(len(plan.rows)),
                             "written_rows": 0, "collisions": 0, "row_range": list(plan.row_range),
                             "batch_range": [plan.first, plan.stop], "tables": []}
    if not len(plan.rows):
        stats["seconds"] = time.time() - t0
        return stats
    done: set[int] = set()
    buf: list = []

    def flush():
        if buf:
            t = pa.concat_tables(buf)
            if path is not None:
                cache.write_file(path, t)  # atomic: an interrupted run resumes from here
                kill_point("scoring")
            else:
                stats["tables"].append(t)
            stats["written_rows"] += t.num_rows
            buf.clear()

    with tqdm(total=len(plan.rows), desc=desc, unit="prompt", disable=not progress or None) as bar:
        for t in pool(payload(q, plan, columns)):
            b = t.column("batch").to_numpy()
            keep = ~np.isin(b, list(done)) if done else np.ones(len(b), bool)  # a retried batch arrives once
            done.update(np.unique(b).tolist())
            if len(cached):
                keep &= ~pc.is_in(t.column("question_id"), value_set=cached).to_numpy(zero_copy_only=False)
            bar.update(int(len(b)))
            t = t.drop_columns(["batch"]).filter(pa.array(keep))
            if t.num_rows:
                stats["collisions"] += int(np.asarray(t.column("collision")).sum())
                buf.append(t)
            if flush_rows is None or sum(x.num_rows for x in buf) >= flush_rows:
                flush()
        flush()
    stats["seconds"] = time.time() - t0
    return stats


def in_order(tables: list, qids_all: list, store_hidden: bool, aligned: bool = False):
    """A Dataset with one row per requested id, in request order."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    sch = cache.schema(store_hidden, aligned)
    table = pa.concat_tables([sch.empty_table()] + [t.select(sch.names) for t in tables])
    pos = {qid: i for i, qid in enumerate(table.column("question_id").to_pylist())}
    missing = [qid for qid in qids_all if qid not in pos]
    if missing:
        raise RuntimeError(f"{len(missing)} question ids were not scored (first: {missing[0]})")
    return Dataset(InMemoryTable(table.take(pa.array([pos[x] for x in qids_all], pa.int64()))))


def score_stats(scores) -> dict:
    """Counts to report: rows, non-finite rows, rows whose candidates share a first token."""
    nonfinite = np.asarray(scores["nonfinite"], dtype=bool)
    coll = np.asarray(scores["collision"], dtype=bool) if "collision" in scores.column_names else np.zeros(0, bool)
    return {"rows": len(nonfinite), "nonfinite": int(nonfinite.sum()), "collisions": int(coll.sum())}


def default_model_key(model) -> str:
    """fingerprint(source) + quantization for a model from `models.load_model`."""
    from refine_llm import models

    source = getattr(model, "refine_llm_source", None)
    if source is None:
        raise UserError("pass model_key= to score(): this model was not loaded through refine_llm.models.load_model")
    return f"{models.fingerprint(source)}-{getattr(model, 'refine_llm_quant', 'unknown')}"


def backend_unit(cfg: ScoringConfig, flush_rows: int) -> int:
    """Rows per batch: ``cfg.batch_size`` for a forward pass (HF, Ray actors); in-process vLLM takes
    ``max(flush_rows, batch_size)`` rows per engine call (vLLM batches continuously inside a call, and small
    calls leave the engine idle between them)."""
    return cfg.batch_size if cfg.backend != "vllm" else max(flush_rows, cfg.batch_size)


def read_cached(questions, prompt: PromptTemplate, cfg: ScoringConfig, cache_dir, model_key: str, *,
                columns: tuple[str, ...] = QUESTION_COLUMNS):
    """The cached scores of ``questions`` (as ``score`` returns them) without a model: what a stage after
    ``score`` reads. A question that is not in the cache is a UserError that names the command to run."""
    q = questions_table(questions, columns)
    path = cache.cache_path(cache_dir, model_key, prompt, cfg)
    table = cache.read_table(path, cfg.store_hidden, cfg.align_to_base)
    have = set(table.column("question_id").to_pylist())
    missing = [x for x in q.column("question_id").to_pylist() if x not in have]
    if missing:
        raise UserError(f"{path}: {len(missing)} of {q.num_rows} prompts are not scored yet (first: {missing[0]}): "
                        "run the score stage first (`refine-llm score --out RUN`)")
    return in_order([table], q.column("question_id").to_pylist(), cfg.store_hidden, cfg.align_to_base)


def score(model, tokenizer, questions, prompt: PromptTemplate, cfg: ScoringConfig,
          cache_dir: str | os.PathLike | None = None, model_key: str | None = None, *,
          model_dir: str | None = None, vllm_dtype: str = "float32", progress: bool = True,
          flush_rows: int = FLUSH_ROWS, columns: tuple[str, ...] = QUESTION_COLUMNS):
    """Score ``questions`` (a questions Dataset, dict of columns or list of dicts) with ``prompt``; return a
    Dataset with one row per input row, in the same order (docs/CONTRACTS.md "Scores", plus ``collision``).

    ``model_key`` names the model in the cache (default: fingerprint + quant of a load_model model). With
    ``cfg.backend == "vllm"`` the model may be None; pass ``model_dir`` (the weights directory). With
    ``cfg.backend == "ray"`` actors load the model the driver loaded (same alias and quantization). Each
    fixed batch is one cache file. ``columns``: the question fields the backend reads (a task that lists
    its own candidates: question_id, context, question, candidates)."""
    if cfg.batch_size is None:  # ScoringConfig's "auto": sized for the device
        device = "cuda" if str(getattr(model, "device", "cpu")).startswith("cuda") else "cpu"
        cfg = replace(cfg, batch_size=AUTO_SCORING_BATCH_SIZE[device])
    q = questions_table(questions, columns)
    if cache_dir is not None and model_key is None:
        model_key = default_model_key(model)
    path = cache.cache_path(cache_dir, model_key, prompt, cfg) if cache_dir is not None else None
    if cfg.backend == "ray":  # actors score the fixed batches; this process fills the same cache
        from refine_llm.scoring.backends import ray as ray_backend

        source = getattr(model, "refine_llm_source", None)
        if source is None:
            raise UserError("--backend ray: load the model through refine_llm.models.load_model (the actors load it by name)")
        device = next(model.parameters()).device.type
        pool = ray_backend.RayPool(source.name, model.refine_llm_quant, prompt, cfg,
                                   device=device if device == "cpu" else None)
        ray_backend.job_cluster()  # one cluster for the whole job, stopped when it exits
    elif cfg.backend == "vllm":
        from refine_llm.scoring.backends.vllm import VLLMBackend

        if model_dir is None:
            src = getattr(model, "refine_llm_source", None)
            if src is None:
                raise UserError("--backend vllm needs the model directory: pass model_dir= to score()")
            from refine_llm import models

            model_dir = models.model_dir(src)
        pool = LocalPool(VLLMBackend(model_dir, tokenizer, prompt, cfg, vllm_dtype))
    else:
        from refine_llm.scoring.backends.hf import HFBackend

        pool = LocalPool(HFBackend(model, tokenizer, prompt, cfg))
    st = fill_cache(q, cfg, path, pool, unit=backend_unit(cfg, flush_rows), flush_rows=None,
                    progress=progress and cfg.backend != "ray", desc=f"scoring ({prompt.name})")
    if st["collisions"]:
        log.warning("%d of %d questions have candidates sharing a first token: scored in exact mode",
                    st["collisions"], st["written_rows"])
    tables = st["tables"] + ([cache.read_table(path, cfg.store_hidden, cfg.align_to_base)] if path is not None else [])
    ds = in_order(tables, q.column("question_id").to_pylist(), cfg.store_hidden, cfg.align_to_base)
    counts = score_stats(ds)
    if counts["nonfinite"]:
        log.warning("%d of %d prompts gave NaN/inf logits (nonfinite=True); they are reported, not retried",
                    counts["nonfinite"], counts["rows"])
    return ds

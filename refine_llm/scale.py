"""Scoring millions of prompts: fixed batches, shards (no Ray needed), Ray, and merging score caches.

The rule that makes every way of running the same: the question set is cut into fixed batches,
batch b = rows [b*B, min((b+1)*B, N)) in stored order (`scoring.batch_ranges`), and a batch always
puts the same prompts into one forward pass, whoever runs it and whatever is cached. A question id
that occurs twice is scored in the batch of its first occurrence only. So:

- a resumed run (after a killed driver or a lost worker) computes exactly what an uninterrupted one would;
- ``--shard i/n`` takes the batches [i*nb//n, (i+1)*nb//n) of the nb batches (never cutting a batch),
  and merging the n shard caches gives the cache of one unsharded run, bit for bit;
- ``--backend ray`` runs the same per-batch code (`scoring.score_rows`) in Ray actors
  (refine_llm.ray_backend), so its scores are bit-identical to ``--backend hf`` at the same batch size
  and torch thread count (an actor runs ``--ray-cpus-per-actor`` threads; 1 vs 2 threads moves CPU
  log-probs by ~5e-6, within the project's 1e-4 tolerance but not bit for bit).

A batch is scored when one of its question ids is not in the cache yet; only those rows are written.
Results go to the same Arrow cache as the main job (``RUN/scores/<model fp>-<quant>/<prompt fp>-...``),
in shard files of about ``flush_rows`` rows, each written atomically as results arrive.

Each scoring run also writes ``RUN/scale.json`` (model, quantization, prompt and questions fingerprints,
its shard and row range), which `merge` checks: it refuses caches of another model, quantization,
prompt or scoring setting, and reports duplicate question ids and gaps (missing shards, missing rows).

CLI (also `refine-llm score` / `refine-llm merge`):

    python -m refine_llm.scale score --questions Q --prompt qa --quant fp32 --out runs/s0 --shard 0/4
    python -m refine_llm.scale merge runs/s0 runs/s1 runs/s2 runs/s3 --out runs/all
    python -m refine_llm.scale evaluate --questions Q --scores runs/all      (refine_llm.stream_metrics)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from refine_llm.config import QUANT_CHOICES, ModelConfig, ScoringConfig, help_of
from refine_llm.errors import UserError

log = logging.getLogger(__name__)

QUESTION_COLUMNS = ("question_id", "context", "question", "subj1", "subj2", "subj1_group", "subj2_group", "category")
MANIFEST = "scale.json"
MANIFEST_VERSION = 1
FLUSH_ROWS = 512  # rows per cache file written while scoring (what a killed driver can lose)
MERGE_FILE_ROWS = 65536  # rows per cache file written by merge


# ----------------------------------------------------------------------------- shards and batches


@dataclass(frozen=True)
class Shard:
    """``--shard i/n``: the i-th (from 0) of n contiguous runs of fixed batches."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
        if not m or int(m[2]) < 1 or int(m[1]) >= int(m[2]):
            raise UserError(f"--shard {text}: expected i/n with 0 <= i < n (e.g. --shard 0/4 is the first of 4)")
        return cls(int(m[1]), int(m[2]))

    def batches(self, n_batches: int) -> tuple[int, int]:
        """[first, stop) batch indices of this shard."""
        return self.index * n_batches // self.count, (self.index + 1) * n_batches // self.count

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def questions_table(questions, columns: tuple[str, ...] = QUESTION_COLUMNS):
    """pyarrow Table of ``columns`` (default: those scoring needs), in stored order, from a questions
    Dataset, its directory (`questions.save_questions`; memory-mapped), a pyarrow Table or a list of dicts."""
    import pyarrow as pa

    if isinstance(questions, (str, os.PathLike)):
        from refine_llm.questions import load_questions

        questions = load_questions(questions)
    if isinstance(questions, list):
        return pa.Table.from_pylist([{c: q.get(c) for c in columns} for q in questions])
    names = questions.column_names
    missing = [c for c in columns if c not in names]
    if missing:
        raise UserError(f"the questions have no column(s) {', '.join(missing)}: build them with refine_llm.questions")
    if isinstance(questions, pa.Table):
        return questions.select(list(columns))
    return questions.select_columns(list(columns)).with_format("arrow")[:]


def _string_digest(col) -> str:
    """sha256 of a string column's values (lengths + bytes), without Python objects per row."""
    import pyarrow as pa

    h = hashlib.sha256()
    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    arr = pa.concat_arrays([arr.cast(pa.large_string())])  # fresh buffers: no slice offset
    offs = np.frombuffer(arr.buffers()[1], np.int64)[: len(arr) + 1]
    h.update(np.diff(offs).tobytes())
    if len(arr):
        h.update(memoryview(arr.buffers()[2])[offs[0]: offs[-1]])
    return h.hexdigest()[:16]


def first_occurrence(qids) -> np.ndarray:
    """(N,) bool: row i holds the first occurrence of its question id (vectorised through Arrow)."""
    import pyarrow as pa

    arr = qids.combine_chunks() if isinstance(qids, pa.ChunkedArray) else qids
    idx = arr.dictionary_encode().indices.to_numpy()
    first = np.zeros(len(idx), bool)
    first[np.unique(idx, return_index=True)[1]] = True
    return first


def cache_files(path: Path) -> list[Path]:
    return sorted(path.glob("shard-*.arrow"))


def read_cache_file(f: Path):
    """A cache file as a memory-mapped pyarrow Table, or None (with a warning naming it) if unreadable."""
    import pyarrow as pa

    try:
        return pa.ipc.open_file(pa.memory_map(str(f))).read_all()
    except (pa.ArrowInvalid, OSError) as e:
        log.warning("ignoring unreadable score cache file %s (%s): its rows are scored again", f, e)
        return None


def cached_ids(path: Path | None):
    """The question ids in the cache at ``path`` (a pyarrow string array)."""
    import pyarrow as pa

    cols = []
    if path is not None:
        for f in cache_files(path):
            t = read_cache_file(f)
            if t is not None and "question_id" in t.column_names:
                cols += t.column("question_id").chunks
    return pa.concat_arrays(cols) if cols else pa.array([], pa.string())


@dataclass
class BatchPlan:
    """What one run scores: ``rows`` (sorted row indices: every first-occurrence row of each pending
    batch) and ``batch`` (their batch index), for the batches [first, stop) of its shard."""

    n_rows: int
    batch_size: int
    first: int
    stop: int
    rows: np.ndarray
    batch: np.ndarray
    todo: int  # rows that are not cached yet (the ones that get written)

    @property
    def row_range(self) -> tuple[int, int]:
        return min(self.first * self.batch_size, self.n_rows), min(self.stop * self.batch_size, self.n_rows)


def plan_batches(qids, cached, batch_size: int, shard: Shard = Shard()) -> BatchPlan:
    """Pending fixed batches of ``shard`` given the ``cached`` ids (see the module docstring)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from refine_llm.scoring import batch_ranges

    n = len(qids)
    nb = len(batch_ranges(n, batch_size))
    b0, b1 = shard.batches(nb)
    first = first_occurrence(qids)
    have = pc.is_in(qids, value_set=cached).to_numpy(zero_copy_only=False) if len(cached) else np.zeros(n, bool)
    batch_of = np.arange(n) // batch_size
    in_shard = (batch_of >= b0) & (batch_of < b1)
    need = first & ~np.asarray(have, bool) & in_shard
    pending = np.bincount(batch_of[need], minlength=max(nb, 1)) > 0
    rows = np.flatnonzero(first & in_shard & pending[batch_of])
    return BatchPlan(n, batch_size, b0, b1, rows, batch_of[rows], int(need.sum()))


def payload(q, plan: BatchPlan):
    """One row per pending batch: "batch" and list columns of the question fields (what actors receive)."""
    import pyarrow as pa

    sub = q.take(pa.array(plan.rows, pa.int64()))
    uniq, starts = np.unique(plan.batch, return_index=True)
    offsets = pa.array(np.append(starts, len(plan.rows)).astype(np.int32))
    cols = {"batch": pa.array(uniq.astype(np.int64))}
    for c in QUESTION_COLUMNS:
        cols[c] = pa.ListArray.from_arrays(offsets, sub.column(c).combine_chunks())
    return pa.table(cols)


# ----------------------------------------------------------------------------- scorers


class LocalScorer:
    """The single-process path: the same per-batch code as a Ray actor, one batch at a time."""

    def __init__(self, model, tokenizer, prompt, cfg: ScoringConfig, *, model_dir: str | None = None,
                 vllm_dtype: str = "float32"):
        from refine_llm import scoring

        self.model, self.tokenizer, self.prompt, self.model_dir, self.vllm_dtype = model, tokenizer, prompt, model_dir, vllm_dtype
        self.cfg = replace(cfg, backend="vllm" if model is None else "hf")
        self.runner = scoring.make_runner(model, tokenizer, prompt, self.cfg) if model is not None else None

    def __call__(self, pay) -> Iterator:
        import pyarrow as pa

        from refine_llm import scoring

        for i in range(pay.num_rows):
            rows = {c: pay.column(c)[i].as_py() for c in QUESTION_COLUMNS}
            t = scoring.score_rows(self.model, self.tokenizer, rows, self.prompt, self.cfg, self.runner,
                                   model_dir=self.model_dir, vllm_dtype=self.vllm_dtype)
            yield t.append_column("batch", pa.array([pay.column("batch")[i].as_py()] * t.num_rows, pa.int64()))


def score_to_cache(q, cfg: ScoringConfig, path: Path | None, scorer: Callable[[Any], Iterator], *,
                   shard: Shard = Shard(), flush_rows: int = FLUSH_ROWS, progress: bool = True) -> dict:
    """Score the pending fixed batches of ``shard`` of questions table ``q`` with ``scorer`` and write the
    new rows to the cache at ``path`` as they arrive. Returns counts and the new tables (when ``path`` is None)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from refine_llm.progress import progress as tqdm  # quiet in logs (no \r when stderr is not a TTY)

    from refine_llm.scoring import _write_shard

    t0 = time.time()
    cached = cached_ids(path)
    plan = plan_batches(q.column("question_id"), cached, cfg.batch_size, shard)
    stats = {"rows": q.num_rows, "batches": plan.stop - plan.first, "pending_batches": int(len(np.unique(plan.batch))),
             "scored_rows": int(len(plan.rows)), "written_rows": 0, "row_range": list(plan.row_range),
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
                _write_shard(path, t)  # atomic: an interrupted run resumes from here
            else:
                stats["tables"].append(t)
            stats["written_rows"] += t.num_rows
            buf.clear()

    with tqdm(total=len(plan.rows), desc="scoring", unit="prompt", disable=not progress or None) as bar:
        for t in scorer(payload(q, plan)):
            b = t.column("batch").to_numpy()
            keep = ~np.isin(b, list(done)) if done else np.ones(len(b), bool)  # a retried batch arrives once
            done.update(np.unique(b).tolist())
            if len(cached):
                keep &= ~pc.is_in(t.column("question_id"), value_set=cached).to_numpy(zero_copy_only=False)
            bar.update(int(len(b)))
            t = t.drop_columns(["batch"]).filter(pa.array(keep))
            if t.num_rows:
                buf.append(t)
            if sum(x.num_rows for x in buf) >= flush_rows:
                flush()
        flush()
    stats["seconds"] = time.time() - t0
    return stats


def _in_order(tables: list, qids_all: list, store_hidden: bool):
    """A Dataset with one row per requested id, in request order (as `scoring.score` returns)."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    from refine_llm.scoring import _schema

    table = pa.concat_tables([_schema(store_hidden).empty_table()] + [t.select(_schema(store_hidden).names) for t in tables])
    pos = {qid: i for i, qid in enumerate(table.column("question_id").to_pylist())}
    missing = [qid for qid in qids_all if qid not in pos]
    if missing:
        raise RuntimeError(f"{len(missing)} question ids were not scored (first: {missing[0]})")
    return Dataset(InMemoryTable(table.take(pa.array([pos[x] for x in qids_all], pa.int64()))))


def score_questions_ray(model, questions, prompt, cfg: ScoringConfig, cache_dir=None, model_key: str | None = None,
                        *, address: str | None = None, num_actors: int | None = None):
    """`scoring.score` with ``cfg.backend == "ray"`` (the main job's ``--backend ray``): actors load the
    model the driver loaded (same alias and quantization) and score on CPU; returns the same Dataset.
    The cluster: ``address``, else ``$RAY_ADDRESS``, else a local one that lives as long as this process."""
    from refine_llm import ray_backend, scoring

    source = getattr(model, "refine_llm_source", None)
    if source is None:
        raise UserError("--backend ray: load the model through refine_llm.models.load_model (the actors load it by name)")
    if cache_dir is not None and model_key is None:
        model_key = scoring.default_model_key(model)
    path = scoring._cache_path(cache_dir, model_key, prompt, cfg) if cache_dir is not None else None
    q = questions_table(questions)
    device = next(model.parameters()).device.type
    scorer = ray_backend.RayScorer(source.name, model.refine_llm_quant, prompt, cfg,
                                   device=device if device == "cpu" else None, num_actors=num_actors)
    ray_backend.job_cluster(address)  # one cluster for the whole job, stopped when it exits
    st = score_to_cache(q, cfg, path, scorer, progress=False)
    tables = st["tables"] + ([scoring._read_cache(path, cfg.store_hidden)] if path is not None else [])
    return _in_order(tables, q.column("question_id").to_pylist(), cfg.store_hidden)


# ----------------------------------------------------------------------------- manifests


def _key_parts(cache: Path) -> dict:
    """What a cache directory name says: model fingerprint, quantization (or vLLM dtype), prompt fingerprint, settings."""
    model_key, name = cache.parent.name, cache.name
    fp, _, quant = model_key.partition("-")
    pfp, _, settings = name.partition("-")
    return {"model_fingerprint": fp, "quant": quant, "prompt_fingerprint": pfp, "settings": settings}


def write_manifest(run_dir: Path, cache: Path, q, st: dict, shard: Shard, cfg: ScoringConfig,
                   model: dict, prompt) -> dict:
    from refine_llm.io import atomic_write_json

    qids = q.column("question_id")
    man = {
        "version": MANIFEST_VERSION,
        "cache": str(cache.relative_to(run_dir)),
        "model": model,
        "prompt": {"name": prompt.name, "fingerprint": prompt.fingerprint},
        "scoring": {k: v for k, v in asdict(cfg).items() if k != "backend"},
        "questions": {"fingerprint": _string_digest(qids), "rows": q.num_rows,
                      "unique": int(first_occurrence(qids).sum())},
        "shard": [shard.index, shard.count],
        "batch_size": cfg.batch_size,
        "batches": st["batch_range"],
        "row_range": st["row_range"],
    }
    atomic_write_json(run_dir / MANIFEST, man)
    return man


# ----------------------------------------------------------------------------- merge


def _find_caches(run: Path) -> list[Path]:
    """The score cache directories of a run directory (from its manifest, else every one under scores/)."""
    man = run / MANIFEST
    if man.is_file():
        try:
            return [run / json.loads(man.read_text())["cache"]]
        except (ValueError, KeyError) as e:
            raise UserError(f"{man}: not a refine_llm scale manifest ({e}); delete it to merge the caches as found") from None
    return sorted({f.parent for f in (run / "scores").glob("*/*/shard-*.arrow")})


def merge(run_dirs: list[str | os.PathLike], out: str | os.PathLike, questions=None) -> dict:
    """Merge the score caches of ``run_dirs`` into ``out`` (a run directory with the same layout).

    Refuses caches of another model, quantization, prompt or scoring setting (one line naming both runs).
    Reports duplicate question ids (kept once: the first run given wins) and gaps: shards missing from a
    set of ``--shard`` runs, and, with ``questions``, question ids no run scored."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from refine_llm.io import atomic_dir, atomic_write_json

    runs = [Path(r) for r in run_dirs]
    out = Path(out)
    if not runs:
        raise UserError("merge: give at least one run directory")
    caches, mans = [], []
    for r in runs:
        if not r.is_dir():
            raise UserError(f"{r}: no such run directory")
        found = _find_caches(r)
        if len(found) != 1:
            what = "no score cache" if not found else f"{len(found)} score caches ({', '.join(str(f.relative_to(r)) for f in found)})"
            raise UserError(f"{r}: {what}; merge takes runs of `score --shard i/n` (one cache each, see {MANIFEST})")
        caches.append(found[0])
        mans.append(json.loads((r / MANIFEST).read_text()) if (r / MANIFEST).is_file() else None)
    ref = _key_parts(caches[0])
    for r, c in zip(runs[1:], caches[1:]):
        parts = _key_parts(c)
        for key, what in (("model_fingerprint", "model"), ("quant", "quantization"), ("prompt_fingerprint", "prompt"),
                          ("settings", "scoring settings (top-k, mode, pronouns, hidden)")):
            if parts[key] != ref[key]:
                raise UserError(f"{r}: its scores are for another {what} ({parts[key]!r}) than {runs[0]}'s "
                                f"({ref[key]!r}): merge only shards of one model, quantization and prompt")
    report: dict[str, Any] = {"runs": [str(r) for r in runs], "cache": str(caches[0].relative_to(runs[0])),
                              "duplicates": 0, "gaps": []}
    # Shards of one question set: same questions fingerprint, and together they cover every batch.
    known = [m for m in mans if m]
    if known:
        qfp = {m["questions"]["fingerprint"] for m in known}
        bs = {m["batch_size"] for m in known}
        if len(qfp) > 1 or len(bs) > 1:
            raise UserError(f"the runs scored different question sets or batch sizes (questions {sorted(qfp)}, "
                            f"batch sizes {sorted(bs)}): merge shards of one `score` command")
        count = {m["shard"][1] for m in known}
        if len(count) == 1 and len(known) == len(mans):
            have = sorted(m["shard"][0] for m in known)
            n = count.pop()
            missing = sorted(set(range(n)) - set(have))
            if missing:
                report["gaps"].append(f"missing shards {', '.join(f'{i}/{n}' for i in missing)}")
            if len(have) != len(set(have)):
                report["gaps"].append(f"shard given twice: {sorted({i for i in have if have.count(i) > 1})}")
    # Deduplicate by question id across every file (first run, first file wins), then stream the rows out.
    files = [(f, t) for c in caches for f in cache_files(c) if (t := read_cache_file(f)) is not None]
    if not files:
        raise UserError(f"{caches[0]}: the caches hold no readable rows")
    ids = pa.chunked_array([t.column("question_id").combine_chunks() for _, t in files])
    keep = first_occurrence(ids)
    report["duplicates"] = int((~keep).sum())
    report["rows"] = int(keep.sum())
    if known and len(known) == len(mans):
        expect = known[0]["questions"]["unique"]
        if report["rows"] < expect and not report["gaps"]:
            report["gaps"].append(f"{expect - report['rows']} of {expect} question ids have no score")
    if questions is not None:
        qids = questions_table(questions).column("question_id")
        miss = int((~pc.is_in(qids, value_set=ids.combine_chunks()).to_numpy(zero_copy_only=False)).sum())
        if miss:
            report["gaps"].append(f"{miss} question rows of {questions} have no score")
    dest = out / caches[0].relative_to(runs[0])
    schema = files[0][1].schema
    with atomic_dir(dest) as tmp:
        start, part, buf, n_buf = 0, 0, [], 0

        def write():
            nonlocal part, n_buf
            if buf:
                t = pa.concat_tables(buf)
                with pa.OSFile(str(tmp / f"shard-merged-{part:05d}.arrow"), "wb") as f, pa.ipc.new_file(f, schema) as w:
                    w.write_table(t)
                part += 1
                buf.clear()
                n_buf = 0

        for f, t in files:
            if t.schema != schema:
                raise UserError(f"{f}: its columns differ from {files[0][0]}'s: score both with the same version")
            m = keep[start: start + t.num_rows]
            start += t.num_rows
            if m.any():
                buf.append(t.filter(pa.array(m)))
                n_buf += int(m.sum())
            if n_buf >= MERGE_FILE_ROWS:
                write()
        write()
    if known:
        man = dict(known[0], shard=[0, 1], merged_from=report["runs"], batches=None, row_range=None,
                   duplicates=report["duplicates"], gaps=report["gaps"])
        atomic_write_json(out / MANIFEST, man)
    report["out"] = str(dest)
    return report


# ----------------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        print(f"error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)


def score_parser(prog: str = "python -m refine_llm.scale score") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Score a questions dataset into RUN/scores (the main job's cache): "
                                       "one shard, all of it, or on a Ray cluster.")
    p.add_argument("--questions", required=True, metavar="DIR", help="Questions dataset (python -m refine_llm.questions --out DIR).")
    p.add_argument("--out", required=True, metavar="RUN", help="Run directory; the cache goes to RUN/scores.")
    p.add_argument("--model", default="smollm2-135m", help=help_of(ModelConfig, "name"))
    p.add_argument("--quant", default="auto", choices=QUANT_CHOICES, help=help_of(ModelConfig, "quant"))
    p.add_argument("--device", default=None, help=help_of(ModelConfig, "device"))
    p.add_argument("--trust-remote-code", action="store_true", help=help_of(ModelConfig, "trust_remote_code"))
    p.add_argument("--prompt", default="qa", help="Prompt template: paper, qa, chat or a file (no auto here: "
                                                  "the main job chooses it on validation).")
    p.add_argument("--top-k", type=int, default=ScoringConfig.top_k, help=help_of(ScoringConfig, "top_k"))
    p.add_argument("--batch-size", type=int, default=ScoringConfig.batch_size,
                   help=help_of(ScoringConfig, "batch_size") + " Fixes the batches: shards of one job must share it.")
    p.add_argument("--backend", default="hf", choices=("hf", "vllm", "ray"), help=help_of(ScoringConfig, "backend"))
    p.add_argument("--scoring-mode", default="first-token", choices=("first-token", "exact"), help=help_of(ScoringConfig, "mode"))
    p.add_argument("--pronouns", action="store_true", help=help_of(ScoringConfig, "pronouns"))
    p.add_argument("--no-prefix-cache", action="store_true", help="Disable the few-shot prefix KV cache.")
    p.add_argument("--store-hidden", action="store_true", help=help_of(ScoringConfig, "store_hidden"))
    p.add_argument("--shard", default="0/1", metavar="I/N", help="Score only the I-th (from 0) of N contiguous runs of batches.")
    p.add_argument("--flush-rows", type=int, default=FLUSH_ROWS, help="Rows per cache file written while scoring.")
    p.add_argument("--vllm-dtype", default="float32", help="vLLM dtype (--backend vllm, or Ray actors with GPUs).")
    g = p.add_argument_group("ray (--backend ray)")
    g.add_argument("--ray-address", default=None, help="Join this Ray cluster (default: $RAY_ADDRESS, else a local "
                                                       "cluster that starts and stops with the job).")
    g.add_argument("--ray-actors", type=int, default=None, help="Actors in the pool (default: cluster CPUs / "
                                                                "--ray-cpus-per-actor, or GPUs / --ray-gpus-per-actor).")
    g.add_argument("--ray-cpus-per-actor", type=int, default=1, help="CPUs per actor (torch threads).")
    g.add_argument("--ray-gpus-per-actor", type=float, default=0,
                   help="GPUs per actor; > 0 runs one vLLM engine per actor (tensor parallel = this many GPUs). UNTESTED.")
    g.add_argument("--ray-local-cpus", type=int, default=None, help="CPUs of the local cluster (default: all).")
    p.add_argument("--quiet", action="store_true", help="No progress bar.")
    return p


def run_score(args) -> dict:
    """Score per parsed ``args`` (see `score_parser`); returns the run's manifest plus counts."""
    from refine_llm import models, prompts, scoring

    shard = Shard.parse(args.shard)
    batch_size = args.batch_size
    if batch_size is None:  # ScoringConfig's "auto", resolved once here: every shard of a job must share it
        from refine_llm.config import AUTO_SCORING_BATCH_SIZE

        gpu = args.backend == "ray" and float(getattr(args, "ray_gpus_per_actor", 0) or 0) > 0
        batch_size = AUTO_SCORING_BATCH_SIZE["cuda" if gpu or str(args.device or "").startswith("cuda") else "cpu"]
    try:
        cfg = ScoringConfig(prompt=args.prompt, top_k=args.top_k, batch_size=batch_size, backend=args.backend,
                            mode=args.scoring_mode, pronouns=args.pronouns, prefix_cache=not args.no_prefix_cache,
                            store_hidden=args.store_hidden,
                            tensor_parallel_size=max(1, int(args.ray_gpus_per_actor)) if args.backend == "ray" else 1)
    except ValueError as e:
        raise UserError(str(e).replace("batch_size", "--batch-size").replace("top_k", "--top-k")) from None
    if args.flush_rows < 1:
        raise UserError(f"--flush-rows {args.flush_rows}: must be >= 1")
    if args.prompt == "auto":
        raise UserError("--prompt auto: choose one here (paper, qa, chat or a file); the main job picks it on validation")
    prompt = prompts.load_prompt(args.prompt)
    q = questions_table(args.questions)
    run = Path(args.out)
    from refine_llm.pipeline import check_writable

    check_writable(run)
    source = models.resolve(args.model)
    use_vllm = args.backend == "vllm" or (args.backend == "ray" and args.ray_gpus_per_actor > 0)
    scorer_name = f"vllm-{args.vllm_dtype}" if use_vllm else args.quant
    if use_vllm and cfg.store_hidden:
        raise UserError("--store-hidden needs the hf scorer (vLLM returns no hidden states): drop it or use --backend hf")
    model_key = f"{models.fingerprint(source)}-{scorer_name}"
    path = scoring._cache_path(run / "scores", model_key, prompt, cfg)
    progress = not args.quiet
    if args.backend == "ray":
        from refine_llm import ray_backend

        scorer = ray_backend.RayScorer(args.model, args.quant, prompt, cfg, device=args.device,
                                       trust_remote_code=args.trust_remote_code, num_actors=args.ray_actors,
                                       cpus_per_actor=args.ray_cpus_per_actor, gpus_per_actor=args.ray_gpus_per_actor,
                                       vllm_dtype=args.vllm_dtype)
        with ray_backend.cluster(args.ray_address, args.ray_local_cpus):
            st = score_to_cache(q, cfg, path, scorer, shard=shard, flush_rows=args.flush_rows, progress=progress)
    else:
        if use_vllm:
            model, tok = None, models.load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
        else:
            model, tok = models.load_model(args.model, quant=args.quant, device=args.device,
                                           trust_remote_code=args.trust_remote_code)
        scorer = LocalScorer(model, tok, prompt, cfg, model_dir=models.model_dir(source), vllm_dtype=args.vllm_dtype)
        st = score_to_cache(q, cfg, path, scorer, shard=shard, flush_rows=args.flush_rows, progress=progress)
    man = write_manifest(run, path, q, st, shard, cfg, {"name": args.model, "fingerprint": model_key.rsplit("-", 1)[0],
                                                         "quant": args.quant, "scorer": scorer_name}, prompt)
    return {**man, **{k: v for k, v in st.items() if k != "tables"}}


def score_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`refine-llm score` / `python -m refine_llm.scale score`."""
    args = (score_parser(prog) if prog else score_parser()).parse_args(argv)
    args.quant = ModelConfig(name=args.model, quant=args.quant).quant  # "auto": fp32 for the testbed, else nf4
    try:
        st = run_score(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"shard {args.shard}: batches {st['batch_range'][0]}..{st['batch_range'][1]} (rows {st['row_range'][0]}.."
          f"{st['row_range'][1]} of {st['rows']}), {st['pending_batches']} batches scored, {st['written_rows']} new rows "
          f"in {st['seconds']:.1f} s -> {Path(args.out) / st['cache']}")
    return 0


def merge_parser(prog: str = "python -m refine_llm.scale merge") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Merge the score caches of run directories (e.g. the shards of one job).")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="Run directories written by `score` (one cache each).")
    p.add_argument("--out", required=True, metavar="DIR", help="Run directory for the merged cache.")
    p.add_argument("--questions", default=None, metavar="DIR", help="Also report question ids that no run scored.")
    return p


def merge_main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`refine-llm merge` / `python -m refine_llm.scale merge`."""
    args = (merge_parser(prog) if prog else merge_parser()).parse_args(argv)
    try:
        rep = merge(args.runs, args.out, args.questions)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(f"merged {len(rep['runs'])} runs: {rep['rows']} rows, {rep['duplicates']} duplicate question ids dropped -> {rep['out']}")
    for g in rep["gaps"]:
        print(f"gap: {g}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cmds = {"score": score_main, "merge": merge_main}
    if argv and argv[0] == "evaluate":
        from refine_llm.stream_metrics import main as evaluate_main

        return evaluate_main(argv[1:])
    if not argv or argv[0] not in cmds:
        print("usage: python -m refine_llm.scale {score,merge,evaluate} ... (see <command> --help)", file=sys.stderr)
        return 2
    return cmds[argv[0]](argv[1:])


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(main())

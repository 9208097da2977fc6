"""The score cache: its schema, its files, the manifest of a sharded run, and merging caches.

One row per question id (docs/CONTRACTS.md, "Scores"): ``topk_ids`` (k,), ``topk_logprobs`` (k,)
full-vocabulary log-softmax, ``cand_logprobs`` (S,) log P of each candidate, ``cand_mask`` (S, k) which
top-k positions are a first token of each candidate, ``nonfinite``, ``collision`` (candidates share a
first token, so they were scored by whole continuations) and optional ``hidden`` (d,) fp16 (the final
post-norm hidden state at the answer position, so that ``logits = lm_head(hidden)``) and, for a method's
extra pass aligned to the base (``ScoringConfig.align_to_base``), ``aligned_logprobs`` (k,): the
full-vocabulary log-probs of the base pass's top-k ids on the same question.

Layout: ``<cache_dir>/<model key>/<prompt fp>-k<k>-<mode>-pron<0|1>-hid<0|1>-v<SCORING_VERSION>/shard-*.arrow``
(Arrow IPC files, each written temp + rename, so a kill -9 loses at most the file in flight). The model
key names what produced the numbers: weights fingerprint + quantization (HF) or ``vllm-<dtype>``. A file
that cannot be read (a crash mid-write on another filesystem, a foreign file) is set aside as
``.corrupt`` and its rows are scored again.

A sharded run (``score --shard i/n``) also writes ``RUN/scale.json`` (model, quantization, prompt and
questions fingerprints, its shard and batch range), which ``merge`` checks: it refuses caches of another
model, quantization, prompt or scoring setting, and reports duplicate question ids and gaps.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from refine_llm.config import MERGE_FILE_ROWS, ScoringConfig
from refine_llm.errors import UserError
from refine_llm.prompts import PromptTemplate

__all__ = ["SCORING_VERSION", "SCORE_COLUMNS", "MANIFEST", "schema", "list_array", "to_table", "cache_path",
           "cache_files", "read_file", "read_table", "read_ids", "record_batches", "write_file", "key_parts",
           "read_ids_chunks", "find_caches", "cache_of_run", "string_digest", "write_manifest", "merge"]

log = logging.getLogger(__name__)

# Bump when the way candidates or scores are computed changes: old caches are then ignored.
SCORING_VERSION = 1
SCORE_COLUMNS = ("question_id", "topk_ids", "topk_logprobs", "cand_logprobs", "cand_mask", "nonfinite", "collision")
MANIFEST = "scale.json"
MANIFEST_VERSION = 1


def schema(store_hidden: bool, aligned: bool = False):
    import pyarrow as pa

    fields = [("question_id", pa.string()), ("topk_ids", pa.list_(pa.int64())), ("topk_logprobs", pa.list_(pa.float32())),
              ("cand_logprobs", pa.list_(pa.float32())), ("cand_mask", pa.list_(pa.list_(pa.bool_()))),
              ("nonfinite", pa.bool_()), ("collision", pa.bool_())]
    if store_hidden:
        fields.append(("hidden", pa.list_(pa.float16())))
    if aligned:
        fields.append(("aligned_logprobs", pa.list_(pa.float32())))
    return pa.schema(fields)


def list_array(a: np.ndarray):
    """(n, ...) numpy -> nested Arrow list array, built from the flat buffer (fast, keeps the dtype)."""
    import pyarrow as pa

    arr = pa.array(np.ascontiguousarray(a).reshape(-1))
    for dim in reversed(a.shape[1:]):
        n = arr.__len__() // dim
        arr = pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), arr)
    return arr


def to_table(cols: dict[str, Any], store_hidden: bool, aligned: bool = False):
    """Score columns (``refine_llm.scoring.plan.finish``) -> a cache table (``schema``)."""
    import pyarrow as pa

    arrays = [pa.array(cols["question_id"], pa.string()), list_array(np.asarray(cols["topk_ids"])),
              list_array(np.asarray(cols["topk_logprobs"]).astype(np.float32)),
              list_array(np.asarray(cols["cand_logprobs"]).astype(np.float32)), list_array(np.asarray(cols["cand_mask"])),
              pa.array(np.asarray(cols["nonfinite"])), pa.array(np.asarray(cols["collision"]))]
    if store_hidden:
        arrays.append(list_array(np.asarray(cols["hidden"]).astype(np.float16)))
    if aligned:
        arrays.append(list_array(np.asarray(cols["aligned_logprobs"]).astype(np.float32)))
    return pa.Table.from_arrays(arrays, schema=schema(store_hidden, aligned))


def cache_path(cache_dir, model_key: str, prompt: PromptTemplate, cfg: ScoringConfig) -> Path:
    """The cache directory of (model key, prompt, scoring settings) under ``cache_dir`` (a run's scores/)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_key)
    name = (f"{prompt.fingerprint}-k{cfg.top_k}-{cfg.mode}-pron{int(cfg.pronouns)}-hid{int(cfg.store_hidden)}"
            f"-v{SCORING_VERSION}" + ("-aligned" if cfg.align_to_base else ""))
    return Path(cache_dir) / safe / name


def cache_files(path: Path | None) -> list[Path]:
    return sorted(Path(path).glob("shard-*.arrow")) if path is not None else []


def read_file(f: Path, want=None):
    """One cache file as a memory-mapped Table, or None when it is unreadable (or, with ``want``, not of that
    schema): it is then set aside as ``<name>.corrupt`` with a warning, and its rows are scored again."""
    import pyarrow as pa

    try:
        t = pa.ipc.open_file(pa.memory_map(str(f))).read_all()
        if want is not None and not t.schema.equals(want):
            raise pa.ArrowInvalid("its columns are not a score shard's")
        return t
    except (pa.ArrowInvalid, OSError) as e:
        bad = f.with_name(f.name + ".corrupt")
        try:
            os.replace(f, bad)
        except OSError:  # another process set it aside first, or a read-only cache: rescore anyway
            pass
        log.warning("score cache: %s is unreadable (%s); moved to %s, its rows are scored again", f,
                    " ".join(str(e).split())[:160], bad.name)
        return None


def read_table(path: Path | None, store_hidden: bool, aligned: bool = False):
    """Every readable row of the cache at ``path`` (an empty table of the schema when there is none)."""
    import pyarrow as pa

    want = schema(store_hidden, aligned)
    tables = [t for f in cache_files(path) if (t := read_file(f, want)) is not None]
    return pa.concat_tables(tables) if tables else want.empty_table()


def read_ids(path: Path | None):
    """The question ids in the cache at ``path`` (a pyarrow string array; only the id pages are read)."""
    import pyarrow as pa

    cols = []
    for f in cache_files(path):
        t = read_file(f)
        if t is not None and "question_id" in t.column_names:
            cols += t.column("question_id").chunks
    return pa.concat_arrays(cols) if cols else pa.array([], pa.string())


def read_ids_chunks(path: Path) -> list:
    """The question-id column of every record batch of the cache, file by file (memory-mapped: only the id
    pages are read), in the order ``record_batches`` yields the batches. An unreadable file is a UserError."""
    import pyarrow as pa

    ids = []
    for f in cache_files(path):
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(f)))
            ids += [reader.get_batch(i).column("question_id") for i in range(reader.num_record_batches)]
        except (pa.ArrowInvalid, OSError, KeyError) as e:
            raise UserError(f"{f}: unreadable score cache file ({e}); re-run the shard that wrote it") from None
    return ids


def record_batches(path: Path, columns: tuple[str, ...] | None = None) -> Iterator:
    """The cache's record batches, file by file (each read, not mapped, and dropped by the caller: bounded
    memory over millions of rows). An unreadable file is a UserError naming it."""
    import pyarrow as pa

    for f in cache_files(path):
        try:
            with pa.OSFile(str(f)) as src:
                reader = pa.ipc.open_file(src)
                for i in range(reader.num_record_batches):
                    b = reader.get_batch(i)
                    yield b.select(list(columns)) if columns else b
        except (pa.ArrowInvalid, OSError, KeyError) as e:
            raise UserError(f"{f}: unreadable score cache file ({e}); re-run the shard that wrote it") from None


def write_file(path: Path, table) -> None:
    """Write ``table`` as one new cache file under ``path``, atomically (temp file + rename)."""
    import pyarrow as pa

    path.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".tmp-", suffix=".arrow")
    try:
        with os.fdopen(fd, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        os.replace(tmp, path / f"shard-{uuid.uuid4().hex}.arrow")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- manifests and merge


def key_parts(cache: Path) -> dict:
    """What a cache directory name says: model fingerprint, quantization (or vLLM dtype), prompt fingerprint, settings."""
    model_key, name = cache.parent.name, cache.name
    fp, _, quant = model_key.partition("-")
    pfp, _, settings = name.partition("-")
    return {"model_fingerprint": fp, "quant": quant, "prompt_fingerprint": pfp, "settings": settings}


def string_digest(col) -> str:
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


def write_manifest(run_dir: Path, cache: Path, q, st: dict, shard, cfg: ScoringConfig, model: dict, prompt) -> dict:
    """``RUN/scale.json`` of a sharded run (what ``merge`` checks)."""
    from refine_llm.io import atomic_write_json
    from refine_llm.scoring.plan import first_occurrence

    qids = q.column("question_id")
    man = {
        "version": MANIFEST_VERSION,
        "cache": str(cache.relative_to(run_dir)),
        "model": model,
        "prompt": {"name": prompt.name, "fingerprint": prompt.fingerprint},
        "scoring": {k: v for k, v in asdict(cfg).items() if k != "backend"},
        "questions": {"fingerprint": string_digest(qids), "rows": q.num_rows,
                      "unique": int(first_occurrence(qids).sum())},
        "shard": [shard.index, shard.count],
        "batch_size": cfg.batch_size,
        "batches": st["batch_range"],
        "row_range": st["row_range"],
    }
    atomic_write_json(run_dir / MANIFEST, man)
    return man


def find_caches(run: Path) -> list[Path]:
    """The score cache directories of a run directory (from its manifest, else every one under scores/)."""
    man = run / MANIFEST
    if man.is_file():
        try:
            return [run / json.loads(man.read_text())["cache"]]
        except (ValueError, KeyError) as e:
            raise UserError(f"{man}: not a refine_llm scale manifest ({e}); delete it to merge the caches as found") from None
    return sorted({f.parent for f in (run / "scores").glob("*/*/shard-*.arrow")})


def cache_of_run(scores: str | Path) -> Path:
    """A cache directory, or the one cache of a run directory (``--scores``)."""
    p = Path(scores)
    if any(p.glob("shard-*.arrow")):
        return p
    found = find_caches(p) if p.is_dir() else []
    if len(found) != 1:
        raise UserError(f"--scores {p}: expected a run directory with one score cache or a cache directory "
                        f"(found {len(found)} caches); pass the cache directory itself")
    return found[0]


def merge(run_dirs: list[str | os.PathLike], out: str | os.PathLike, questions=None) -> dict:
    """Merge the score caches of ``run_dirs`` into ``out`` (a run directory with the same layout).

    Refuses caches of another model, quantization, prompt or scoring setting; reports duplicate question
    ids (the first run's row wins), missing ``--shard`` runs, and, with ``questions``, question ids no run scored."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from refine_llm.io import atomic_dir, atomic_write_json
    from refine_llm.scoring.plan import first_occurrence, questions_table

    runs = [Path(r) for r in run_dirs]
    out = Path(out)
    if not runs:
        raise UserError("merge: give at least one run directory")
    caches, mans = [], []
    for r in runs:
        if not r.is_dir():
            raise UserError(f"{r}: no such run directory")
        found = find_caches(r)
        if len(found) != 1:
            what = "no score cache" if not found else f"{len(found)} score caches ({', '.join(str(f.relative_to(r)) for f in found)})"
            raise UserError(f"{r}: {what}; merge takes runs of `score --shard i/n` (one cache each, see {MANIFEST})")
        caches.append(found[0])
        mans.append(json.loads((r / MANIFEST).read_text()) if (r / MANIFEST).is_file() else None)
    ref = key_parts(caches[0])
    for r, c in zip(runs[1:], caches[1:]):
        parts = key_parts(c)
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
    files = [(f, t) for c in caches for f in cache_files(c) if (t := read_file(f)) is not None]
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
    sch = files[0][1].schema
    with atomic_dir(dest) as tmp:
        part, buf, n_buf = 0, [], 0
        start = 0

        def write():
            nonlocal part, n_buf
            if buf:
                t = pa.concat_tables(buf)
                with pa.OSFile(str(tmp / f"shard-merged-{part:05d}.arrow"), "wb") as f, pa.ipc.new_file(f, sch) as w:
                    w.write_table(t)
                part += 1
                buf.clear()
                n_buf = 0

        for f, t in files:
            if t.schema != sch:
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

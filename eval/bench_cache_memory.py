"""Peak memory of the metrics on a synthetic 2M-row score cache (refine_llm.metrics.stream).

Writes a synthetic gender question set (--tuples 8-row tuples: 4 underspecified + 4 specified; 250k
tuples = 2M rows) and a score cache of random top-k rows for it (k=10, in shuffled files of 65,536 rows,
as a merge writes them), then runs, each in a fresh process, and prints the peak RSS (VmHWM of /proc/self/status; ru_maxrss would
carry over the parent's peak across fork + exec):

- `python -m refine_llm.scoring evaluate` on the 2M rows (batched: Arrow record batches -> numpy);
- the import baseline of that process (python + numpy/pyarrow/scipy/datasets), for reference;
- with --naive-tuples, the in-memory path of the main job (`datasets` + `methods.Base` +
  `metrics.evaluate`, Python lists per column) on a smaller set, to show what the batched path avoids.

RSS counts the memory-mapped pages of the cache and questions that were touched (file-backed, shared,
reclaimable); the numbers are upper bounds. Timings are under contention from other jobs on this machine.

    .venv/bin/python eval/bench_cache_memory.py                  # 2M rows (~2 min on 2 cores)
    .venv/bin/python eval/bench_cache_memory.py --tuples 2000    # a quick look
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def synthetic_questions(n_tuples: int, seed: int = 0):
    """A pyarrow Table in the questions layout (the columns metrics read), built without Python loops per row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    rng = np.random.default_rng(seed)
    T, M = n_tuples, 8 * n_tuples
    tup = np.repeat(np.arange(T), 8)
    r = np.tile(np.arange(8), T)
    names = pa.array([f"name{i:03d}" for i in range(200)])  # 0-99 female, 100-199 male; a < b alphabetically
    a, b = rng.integers(0, 100, T), rng.integers(100, 200, T)
    # rows of a tuple (as questions.rows_for_tuple): (a,b,attr) (a,b,neg) (b,a,attr) (b,a,neg), then 4 specified
    a_first = np.array([1, 1, 0, 0, 1, 1, 0, 0], bool)[r]
    s1 = np.where(a_first, a[tup], b[tup])
    s2 = np.where(a_first, b[tup], a[tup])
    specified = r >= 4
    gold = np.where(np.isin(r, [4, 6]), s1, s2)
    groups = pa.array(["female", "male"])
    rep = lambda s: pa.array([s]).take(pa.array(np.zeros(M, np.int64)))  # noqa: E731
    tuple_id = pc.binary_join_element_wise("t", pa.array(tup).cast(pa.string()), "")
    attr = pc.binary_join_element_wise("gender/x_act-", pa.array(rng.integers(0, 50, T)[tup]).cast(pa.string()), "")
    return pa.table({
        "question_id": pc.binary_join_element_wise(tuple_id, pa.array(r).cast(pa.string()), "-"),
        "tuple_id": tuple_id, "category": rep("gender"),
        "subj1": names.take(pa.array(s1)), "subj2": names.take(pa.array(s2)),
        "subj1_group": groups.take(pa.array(s1 // 100)), "subj2_group": groups.take(pa.array(s2 // 100)),
        "attribute_id": attr, "negated": pa.array(np.array([0, 1, 0, 1, 0, 0, 0, 0], bool)[r]),
        "specified": pa.array(specified),
        "gold": pc.if_else(pa.array(specified), names.take(pa.array(gold)), pa.scalar(None, pa.string())),
        "context": rep("[x1] met [x2]."), "question": rep("Who was a nurse?"),
    })


def write_cache(q, cache: Path, k: int = 10, rows_per_file: int = 65536, seed: int = 1) -> None:
    """Random scores for every question id of ``q``, in shuffled files (as a merge of shards writes them)."""
    import pyarrow as pa

    from refine_llm.scoring.cache import to_table

    rng = np.random.default_rng(seed)
    cache.mkdir(parents=True, exist_ok=True)
    perm = rng.permutation(q.num_rows)
    qid = q.column("question_id").combine_chunks()
    for part, s in enumerate(range(0, len(perm), rows_per_file)):
        idx = perm[s: s + rows_per_file]
        m = len(idx)
        lp = -np.cumsum(rng.exponential(1.0, (m, k)), axis=1).astype(np.float32)  # descending log-probs
        mask = np.zeros((m, 2, k), bool)
        pos = rng.permutation(np.tile(np.arange(k), (m, 1)).T).T[:, :2]  # two distinct positions per row
        hit = rng.random((m, 2)) < 0.9
        for sd in (0, 1):
            mask[np.arange(m)[hit[:, sd]], sd, pos[hit[:, sd], sd]] = True
        cols = {"question_id": qid.take(pa.array(idx)).to_pylist(), "topk_ids": rng.integers(0, 49152, (m, k)),
                "topk_logprobs": lp, "cand_logprobs": np.log(rng.uniform(1e-4, 0.5, (m, 2))),
                "cand_mask": mask, "nonfinite": np.zeros(m, bool), "collision": np.zeros(m, bool)}
        t = to_table(cols, False)
        with pa.OSFile(str(cache / f"shard-synthetic-{part:05d}.arrow"), "wb") as f, pa.ipc.new_file(f, t.schema) as w:
            w.write_table(t)


def make(n_tuples: int, root: Path) -> tuple[Path, Path]:
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    q = synthetic_questions(n_tuples)
    qdir, run = root / f"q{n_tuples}", root / f"run{n_tuples}"
    Dataset(InMemoryTable(q)).save_to_disk(str(qdir))
    write_cache(q, run / "scores" / "synthetic-fp32" / "synthetic-k10-first-token-pron0-hid0-v1")
    return qdir, run


_CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
def hwm():  # peak RSS of this process in kB (VmHWM: per address space, so exec starts it afresh)
    return int([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1])
import numpy, pyarrow, scipy.stats, datasets
from refine_llm import metrics
from refine_llm.methods import Base, Scores
from refine_llm.scoring import jobs
base = hwm()
t = time.time()
if {naive!r}:
    import pyarrow as pa
    from pathlib import Path
    from datasets import Dataset, load_from_disk
    from datasets.table import InMemoryTable
    q = load_from_disk({qdir!r})
    fs = sorted(Path({run!r}).glob("scores/*/*/shard-*.arrow"))
    tb = pa.concat_tables([pa.ipc.open_file(pa.memory_map(str(f))).read_all() for f in fs])
    pos = {{x: i for i, x in enumerate(tb.column("question_id").to_pylist())}}
    ds = Dataset(InMemoryTable(tb.take(pa.array([pos[x] for x in q["question_id"]]))))
    sc = Scores.from_table(ds)
    out = Base().apply(sc)
    pt, pf, cit = out.p_topk, out.p_full, sc.cand_in_topk
    res = metrics.evaluate(q, pt, pf, cit, n_resamples=10)
else:
    res = jobs.cache_metrics({qdir!r}, {run!r})
peak = hwm()
print(json.dumps({{"base_mb": base / 1024, "peak_mb": peak / 1024, "seconds": time.time() - t, "mu": res["mu"],
                  "n_tuples": res["n_tuples"]}}))
"""


def measure(qdir: Path, run: Path, naive: bool) -> dict:
    code = _CHILD.format(root=str(ROOT), qdir=str(qdir), run=str(run), naive=naive)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tuples", type=int, default=250_000, help="8-row tuples (250k = 2M rows).")
    ap.add_argument("--naive-tuples", type=int, default=12_500, help="Also run the in-memory path on this many (0: skip).")
    ap.add_argument("--dir", default=None, help="Work directory (default: a temp dir, removed).")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        rows = []
        for n, naive in ((args.tuples, False),) + (((args.naive_tuples, False), (args.naive_tuples, True)) if args.naive_tuples else ()):
            t = time.time()
            qdir, run = (root / f"q{n}", root / f"run{n}") if (root / f"q{n}").exists() else make(n, root)
            gen = time.time() - t
            r = measure(qdir, run, naive)
            rows.append((8 * n, "in-memory (metrics.evaluate)" if naive else "batched (metrics.stream)", r, gen))
        print(f"{'rows':>9}  {'path':<30} {'peak RSS MB':>11} {'imports MB':>10} {'eval s':>7}  mu")
        for m, path, r, gen in rows:
            print(f"{m:>9}  {path:<30} {r['peak_mb']:>11.0f} {r['base_mb']:>10.0f} {r['seconds']:>7.1f}  {r['mu']:.6f}")
        print("(peak RSS includes touched memory-mapped cache pages; timings under contention on a shared 2-core machine)")


if __name__ == "__main__":
    main()

"""prompts/s of `--backend ray` with 1 and 2 actors next to the single-process HF path, in one run.

Same questions, prompt, batch size and model (SmolLM2-135M) for every row of the table:

- single process: `scoring.driver.LocalPool` (an HF backend) in this process (the model is already loaded; load time apart),
  with torch's default thread count and with 1 thread (what an actor uses);
- Ray, 1 and 2 actors (local cluster, num_cpus=1 per actor): wall time including the actors' start and
  model load (Ray Data starts a fresh actor pool per run; on a few hundred prompts start-up dominates);
- the driver's ceiling: how many prompts/s the driver absorbs (filter + Arrow cache writes) when actors
  return results instantly (synthetic result tables, no model), i.e. where the driver would become the
  bottleneck on a GPU cluster.

On a 2-core machine expect no speed-up from 2 actors: they share the same two cores that one process
already uses (torch runs 2 threads in the single process, 1 per actor). Timings are under contention
from other jobs on a shared machine.

    .venv/bin/python eval/bench_ray.py                 # 96 prompts, batch 8, qa prompt
    .venv/bin/python eval/bench_ray.py --rows 48 --prompt paper
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "eval"))


class _Timed:
    """Wraps a scorer: remembers when the first result arrived."""

    def __init__(self, scorer):
        self.scorer, self.first = scorer, None

    def __call__(self, payload):
        for t in self.scorer(payload):
            if self.first is None:
                self.first = (time.time(), t.num_rows)
            yield t


def _run(q, cfg, scorer) -> tuple[float, float | None]:
    from refine_llm.scoring import driver

    timed = _Timed(scorer)
    t0 = time.time()
    st = driver.fill_cache(q, cfg, None, timed, progress=False)
    wall = time.time() - t0
    assert st["written_rows"] == len(set(q.column("question_id").to_pylist())), st
    steady = None
    if timed.first is not None and time.time() - timed.first[0] > 0:
        t_first, n_first = timed.first
        steady = (st["written_rows"] - n_first) / max(t0 + wall - t_first, 1e-9)
    return wall, steady


def driver_ceiling(n_rows: int = 200_000, batch_size: int = 64, k: int = 10) -> float:
    """prompts/s of the driver (fill_cache) when results arrive instantly (synthetic tables), writing a real cache."""
    import pyarrow as pa

    from bench_cache_memory import synthetic_questions
    from refine_llm.config import ScoringConfig
    from refine_llm.scoring import cache, driver

    q = synthetic_questions(n_rows // 8)
    rng = np.random.default_rng(0)
    qid = q.column("question_id").combine_chunks()
    tables = []
    for s in range(0, q.num_rows, batch_size):
        m = min(batch_size, q.num_rows - s)
        cols = {"question_id": qid.slice(s, m).to_pylist(), "topk_ids": rng.integers(0, 49152, (m, k)),
                "topk_logprobs": rng.normal(size=(m, k)).astype(np.float32), "cand_logprobs": rng.normal(size=(m, 2)),
                "cand_mask": rng.random((m, 2, k)) < 0.1, "nonfinite": np.zeros(m, bool), "collision": np.zeros(m, bool)}
        t = cache.to_table(cols, False)
        tables.append(t.append_column("batch", pa.array(np.full(m, s // batch_size, np.int64))))

    def instant(payload):
        yield from tables

    cfg = ScoringConfig(top_k=k, batch_size=batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        st = driver.fill_cache(q, cfg, Path(tmp) / "cache", instant, progress=False)
        dt = time.time() - t0
    return st["written_rows"] / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=96, help="Prompts to score (gender questions, stored order).")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--prompt", default="qa")
    ap.add_argument("--quant", default="fp32")
    args = ap.parse_args()

    import torch

    from refine_llm import models, prompts
    from refine_llm.scoring import driver
    from refine_llm.scoring.backends import ray as ray_backend
    from refine_llm.scoring.backends.hf import HFBackend
    from refine_llm.scoring.plan import questions_table
    from refine_llm.config import QuestionsConfig, ScoringConfig
    from refine_llm.questions import build_questions

    q = build_questions(QuestionsConfig(category="gender", max_tuples=max(1, args.rows // 24 + 1), seed=0))
    q = questions_table(q).slice(0, args.rows)
    prompt = prompts.load_prompt(args.prompt)
    cfg = ScoringConfig(prompt=args.prompt, top_k=10, batch_size=args.batch_size, backend="ray")
    n = q.num_rows
    rows = []

    t = time.time()
    model, tok = models.load_model("smollm2-135m", quant=args.quant, device="cpu")
    load = time.time() - t
    threads = torch.get_num_threads()
    for th in dict.fromkeys((threads, 1)):
        torch.set_num_threads(th)
        wall, _ = _run(q, cfg, driver.LocalPool(HFBackend(model, tok, prompt, cfg)))
        rows.append((f"single process (torch {th} thread{'s' if th > 1 else ''})", wall, n / wall, None,
                     f"+ {load:.1f} s model load"))
    torch.set_num_threads(threads)
    del model

    with ray_backend.local_cluster(num_cpus=2):
        for a in (1, 2):
            scorer = ray_backend.RayPool("smollm2-135m", args.quant, prompt, cfg, device="cpu", num_actors=a)
            wall, steady = _run(q, cfg, scorer)
            rows.append((f"ray, {a} actor{'s' if a > 1 else ''} (1 CPU each)", wall, n / wall, steady,
                         "wall includes actor start + model load"))
    ceiling = driver_ceiling()

    base = rows[1][2] if len(rows) > 3 else rows[0][2]  # single process at 1 thread: the same threads as an actor
    print(f"{n} prompts, batch {args.batch_size}, prompt {args.prompt}, SmolLM2-135M {args.quant}, CPU")
    print(f"{'path':<40} {'wall s':>7} {'prompts/s':>10} {'vs 1-thread':>11}  note")
    for name, wall, rate, _, note in rows:
        print(f"{name:<40} {wall:7.1f} {rate:10.2f} {rate / base:10.2f}x  {note}")
    print(f"driver ceiling (instant actors, real cache writes): {ceiling:,.0f} prompts/s")
    print("2 CPU cores: no speed-up is expected from 2 actors (they share the cores one process already uses). "
          "Timings under contention from other jobs on a shared machine.")


if __name__ == "__main__":
    main()

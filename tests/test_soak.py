"""Server soak: 300 short completions from 16 threads against the session's `scripts/serve.py`.

The server is conftest's `vllm_server` (shared with test_serving_vllm; started with no extra environment,
so the CPU KV-cache bound is serve.py's own). The mix (`soak_jobs`, shared with eval/soak_serving.py):
plain requests, requests with the 'gender' head in each mode, plain requests carrying another
processor's keys, and ~20% malformed `vllm_xargs` (eval/soak_serving.py does the same with >= 1000
requests and prints requests/s). Checked:
- every malformed request gets HTTP 400, every other one 200;
- every plain request equals the same request sent alone before the soak (same greedy tokens, log-probs
  within LOGPROB_TOL: 5e-5; measured 1.4e-5, see eval/soak_serving.py), whatever else shared its batch;
- the server still answers at the end, and the RSS of the API server + engine (the process and its
  children) grew by less than 10% between a warm-up burst and the end.
"""

from __future__ import annotations

import pytest

import vllm  # noqa: F401  (required: a missing vllm fails, never skips)

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from conftest import SERVED_MODEL, log_tail  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))
from soak_serving import LOGPROB_TOL, SoakClient, check, rss_bytes, soak_jobs  # noqa: E402  (one copy of the mix and checks)

N_REQUESTS, N_THREADS = 300, 16
RSS_GROWTH = 0.10


@pytest.mark.slow
def test_soak(vllm_server):
    base, proc, log = vllm_server
    client = SoakClient(base, SERVED_MODEL)
    jobs = soak_jobs(N_REQUESTS, seed=0)
    assert 0.15 <= sum(j.bad for j in jobs) / len(jobs) <= 0.25

    # each distinct plain request alone (sequentially): the reference; also warms up every path
    t0 = time.perf_counter()
    ref = client.references(jobs)
    client.run(soak_jobs(48, seed=1), N_THREADS)  # a concurrent warm-up burst before measuring memory
    rss0 = rss_bytes(proc.pid)

    t1 = time.perf_counter()
    results = client.run(jobs, N_THREADS)
    t2 = time.perf_counter()
    rss1 = rss_bytes(proc.pid)
    print(f"soak: references + warm-up {t1 - t0:.1f} s, {len(jobs)} requests in {t2 - t1:.1f} s "
          f"({len(jobs) / (t2 - t1):.1f}/s)")

    errors, worst = check(client, jobs, results, ref, LOGPROB_TOL)
    print(f"soak: plain requests vs alone: max |log-prob diff| {worst:.2e} (tolerance {LOGPROB_TOL:g})")
    assert not errors, f"{len(errors)} of {len(jobs)} requests wrong:\n" + "\n".join(errors[:20])

    status, _ = client.post(jobs[0].prompt, None)
    assert status == 200 and proc.poll() is None, f"server no longer answers:\n{log_tail(log)}"
    growth = (rss1 - rss0) / rss0
    print(f"soak: {len(jobs)} requests, RSS {rss0 / 2**20:.0f} -> {rss1 / 2**20:.0f} MiB ({growth:+.1%})")
    assert growth < RSS_GROWTH, (rss0, rss1)

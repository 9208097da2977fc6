"""Scale-out scoring: --backend ray == --backend hf bit for bit, a killed actor changes nothing,
shard-then-merge == one unsharded run, merge refuses foreign caches and reports gaps, and the
batched metrics equal metrics.evaluate. One local Ray cluster (2 CPUs) for the session (conftest).

fp32 SmolLM2 with a short prompt and 6-prompt batches; every comparison of caches is exact
(pyarrow Table.equals after sorting by question id), since every path runs the same fixed batches
with the same torch thread count (1: what an actor with num_cpus=1 uses; 1 vs 2 threads moves
log-probs by ~5e-6 on this CPU, so bit-identity needs equal thread counts).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from refine_llm import metrics, prompts, scoring
from refine_llm.errors import UserError
from refine_llm.methods import Base, Scores
from refine_llm.scoring import cache, driver, jobs, plan
from refine_llm.config import QuestionsConfig, ScoringConfig

B = 6
CFG = ScoringConfig(prompt="short", top_k=8, batch_size=B, backend="ray")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def short_prompt(tmp_path_factory):
    f = tmp_path_factory.mktemp("prompt") / "short.txt"
    f.write_text("Answer with a name.\nText: Tom met Ann, who sings. Question: Who sings? Answer: Ann\n"
                 "Text: [context] Question: [question] Answer:")
    return prompts.load_prompt(str(f))


@pytest.fixture(scope="module")
def qset():
    """48 gender questions (2 tuples per split), plus a repeat of row 0 at the end (a duplicate id)."""
    import pyarrow as pa

    from refine_llm.questions import build_questions

    ds = build_questions(QuestionsConfig(category="gender", max_tuples=2, seed=0))
    t = ds.with_format("arrow")[:]
    return pa.concat_tables([t, t.slice(0, 1)])


def _key(smollm2_fp32) -> str:
    return scoring.default_model_key(smollm2_fp32[0])


def _cache(run: Path, key: str, prompt) -> Path:
    return cache.cache_path(run / "scores", key, prompt, CFG)


def _table(path: Path):
    import pyarrow as pa

    return cache.read_table(path, False).sort_by("question_id")


def _hf(smollm2_fp32, short_prompt):
    model, tok = smollm2_fp32
    from refine_llm.scoring.backends.hf import HFBackend

    return driver.LocalPool(HFBackend(model, tok, short_prompt, CFG))


def _ray(smollm2_fp32, short_prompt, actors: int = 2):
    from refine_llm.scoring.backends import ray as ray_backend

    src = smollm2_fp32[0].refine_llm_source
    return ray_backend.RayPool(src.name, "fp32", short_prompt, CFG, device="cpu", num_actors=actors)


@pytest.fixture(scope="module")
def hf_cache(smollm2_fp32, short_prompt, qset, tmp_path_factory):
    """One unsharded single-process run (the reference)."""
    run = tmp_path_factory.mktemp("hf")
    path = _cache(run, _key(smollm2_fp32), short_prompt)
    st = driver.fill_cache(qset, CFG, path, _hf(smollm2_fp32, short_prompt), progress=False)
    assert st["written_rows"] == qset.num_rows - 1  # the repeated id is scored once
    return path


def test_fixed_batches_and_shards():
    assert scoring.batch_ranges(13, 5) == [(0, 5), (5, 10), (10, 13)]
    assert [plan.Shard(i, 3).batches(8) for i in range(3)] == [(0, 2), (2, 5), (5, 8)]
    import pyarrow as pa

    ids = pa.array(["a", "b", "c", "a", "d", "e", "b"])
    todo = plan.plan_batches(ids, pa.array(["a", "b", "c"]), 3, plan.Shard(0, 1))
    # batch 0 (a b c) is cached; batch 1 (a d e) is pending and scores d, e only (a's first row is in batch 0);
    # batch 2 (b) holds no first occurrence
    assert todo.rows.tolist() == [4, 5] and todo.todo == 2
    for bad in ("2/2", "x", "1/0", "-1/3"):
        with pytest.raises(UserError, match="--shard"):
            plan.Shard.parse(bad)


def test_ray_backend_equals_hf_bit_for_bit(ray_cluster, smollm2_fp32, short_prompt, qset, hf_cache, tmp_path):
    path = _cache(tmp_path, _key(smollm2_fp32), short_prompt)
    st = driver.fill_cache(qset, CFG, path, _ray(smollm2_fp32, short_prompt), progress=False)
    assert st["written_rows"] == qset.num_rows - 1
    got, ref = _table(path), _table(hf_cache)
    assert got.equals(ref)
    # and within the project's tolerance of scoring.score (its own batching), through the main job's entry point
    model, tok = smollm2_fp32
    direct = scoring.score(model, tok, qset.to_pylist(), short_prompt, ScoringConfig(top_k=8, batch_size=B))
    via_ray = scoring.score(model, tok, qset.to_pylist(), short_prompt, CFG, cache_dir=tmp_path / "scores")
    assert list(via_ray["question_id"]) == qset.column("question_id").to_pylist()
    for c in ("topk_logprobs", "cand_logprobs"):
        np.testing.assert_allclose(np.asarray(via_ray[c]), np.asarray(direct[c]), atol=1e-4)


def _actor_pids() -> list[int]:
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if b"_ScoreActor" in (p / "cmdline").read_bytes():
                    out.append(int(p.name))
            except OSError:
                pass
    return out


def test_killed_actor_mid_run_gives_identical_cache(ray_cluster, smollm2_fp32, short_prompt, qset, hf_cache, tmp_path):
    path = _cache(tmp_path, _key(smollm2_fp32), short_prompt)
    result: dict = {}

    def job():
        try:
            result["stats"] = driver.fill_cache(qset, CFG, path, _ray(smollm2_fp32, short_prompt),
                                                   flush_rows=1, progress=False)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    th = threading.Thread(target=job)
    th.start()
    deadline = time.time() + 150
    while time.time() < deadline and not (path.exists() and cache.cache_files(path)):
        time.sleep(0.05)
    pids = _actor_pids()
    assert pids and th.is_alive(), "the job ended (or never started an actor) before an actor could be killed"
    written = len(cache.cache_files(path))
    os.kill(pids[0], signal.SIGKILL)
    th.join(timeout=200)
    assert not th.is_alive() and "error" not in result, result.get("error")
    assert written < 8  # killed mid-run: most of the 9 batches were still to come
    assert pids[0] not in _actor_pids()
    assert _table(path).equals(_table(hf_cache))


def test_shard_then_merge_equals_unsharded_run(smollm2_fp32, short_prompt, qset, hf_cache, tmp_path, capsys):
    key = _key(smollm2_fp32)
    runs = []
    for i in range(3):
        run = tmp_path / f"s{i}"
        path = _cache(run, key, short_prompt)
        shard = plan.Shard(i, 3)
        st = driver.fill_cache(qset, CFG, path, _hf(smollm2_fp32, short_prompt), shard=shard, progress=False)
        cache.write_manifest(run, path, qset, st, shard, CFG, {"name": "smollm2-135m", "quant": "fp32"}, short_prompt)
        runs.append(str(run))
    out = tmp_path / "merged"
    assert jobs.merge_main(runs + ["--out", str(out)]) == 0
    assert "gap" not in capsys.readouterr().out
    assert _table(_cache(out, key, short_prompt)).equals(_table(hf_cache))

    # gaps and duplicates are reported
    assert jobs.merge_main([runs[0], runs[2], runs[0], "--out", str(tmp_path / "m2")]) == 0
    txt = capsys.readouterr().out
    assert "missing shards 1/3" in txt and "shard given twice" in txt
    assert f"{_table(_cache(Path(runs[0]), key, short_prompt)).num_rows} duplicate" in txt

    # a cache of another quantization is refused in one line, exit 2
    other = tmp_path / "nf4run"
    src = _cache(Path(runs[1]), key, short_prompt)
    dst = other / "scores" / key.replace("-fp32", "-nf4") / src.name
    dst.parent.mkdir(parents=True)
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    assert jobs.merge_main([runs[0], str(other), "--out", str(tmp_path / "m3")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "quantization" in err and "nf4" in err


def test_batched_metrics_equal_evaluate(qset, hf_cache):
    """metrics.stream on the cache == metrics.evaluate on the same scores (every key it reports)."""
    q = qset.slice(0, qset.num_rows - 1)  # metrics.evaluate rejects a duplicated underspecified row
    table = _table(hf_cache)
    pos = {x: i for i, x in enumerate(table.column("question_id").to_pylist())}
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    sc = Dataset(InMemoryTable(table.take(pa.array([pos[x] for x in q.column("question_id").to_pylist()]))))
    base = Scores.from_table(sc)
    out = Base().apply(base)
    pt, pf, cit = out.p_topk, out.p_full, base.cand_in_topk
    ref = metrics.evaluate(q.to_pydict(), pt, pf, cit, n_resamples=10)
    got = jobs.cache_metrics(q, hf_cache)
    for k in ("mu", "eta", "positional_error", "attributive_error", "specified_accuracy", "answer_mass",
              "topk_miss_rate", "n_tuples", "n_specified"):
        assert got[k] == pytest.approx(ref[k], abs=1e-12), k
        assert got["full_vocab"][k] == pytest.approx(ref["full_vocab"][k], abs=1e-12), k
    assert got["per_category"]["gender"]["mu"] == pytest.approx(ref["per_category"]["gender"]["mu"], abs=1e-12)


def test_next_run_cleans_up_after_a_killed_driver(tmp_path):
    """A session directory whose driver is gone: its leftover processes are killed and it is removed."""
    from refine_llm.scoring.backends import ray as ray_backend

    root = tmp_path / "rlray"
    session = root / "12345"
    session.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (session / "owner.json").write_text(f'{{"pid": {dead.pid}, "start": "0"}}')
    leftover = subprocess.Popen(["sleep", "120"], cwd=session)  # stands in for a Ray agent of that session
    try:
        killed = ray_backend.cleanup_stale_sessions(root)
        assert leftover.pid in killed
        assert leftover.wait(timeout=10) == -signal.SIGKILL
        assert not session.exists()
    finally:
        if leftover.poll() is None:
            leftover.kill()

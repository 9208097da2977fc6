"""kill -9 and resume: the main job, killed at a named point and re-run with the same command, ends with the
report metrics, heads and adapter of an uninterrupted run, bit for bit.

Kills are deterministic: ``REFINE_LLM_TEST_KILL_AT=<point>:<n>`` makes the library SIGKILL itself at the
n-th durable write of that kind (``refine_llm.io.kill_point``): "scoring" (a score shard), "head" (a head
checkpoint), "lora" (a LoRA checkpoint). The model is the session's tiny 2-layer Mistral (random weights,
fp32): resuming is about which batches, steps and RNG states a run replays, not about the model, and seven
runs of the main job must fit the suite's time budget. 4 tuples per split, batches of 8 prompts (each split
is 4 ranges, 4 shards), 12 head steps (checkpoint at step 10), 6 LoRA steps (checkpoint at step 5).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from refine_llm import evaluation

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--max-tuples", "4", "--prompt", "paper", "--batch-size", "8", "--quant", "fp32", "--category", "gender",
          "--train-tuples", "none"]  # the small split design this test's shard and step counts are written for
REFINE = ["--method", "refine", "--head-epochs", "12", "--head", "logit"]  # logit first: its checkpoints are killed
LORA = ["--method", "lora-reward", "--lora-steps", "6", "--lora-batch-size", "2"]


@pytest.fixture(scope="module")
def job(tiny_mistral_dir):
    """The main job's arguments for the tiny model, per method."""
    return {m: ["--model", tiny_mistral_dir, *COMMON, *extra] for m, extra in (("refine", REFINE), ("lora", LORA))}


def _run(args: list[str], out: Path, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("REFINE_LLM_TEST_KILL_AT", None)
    if kill_at:
        env["REFINE_LLM_TEST_KILL_AT"] = kill_at
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "debias_llm.py"), *args, "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    if kill_at:
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.returncode, proc.stderr[-3000:])
        assert not (out / "report.json").exists()
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _metrics(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())["metrics"]


def _files(out: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob(pattern))}


def _shards(out: Path) -> list[Path]:
    return list((out / "scores").rglob("shard-*.arrow"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, job):
    base = tmp_path_factory.mktemp("uninterrupted")
    _run(job["refine"], base / "refine")
    return base


def test_kill9_during_scoring_and_head_training_resumes_bit_identical(uninterrupted, job, tmp_path):
    cmd = job["refine"]
    ref = uninterrupted / "refine"
    out = tmp_path / "run"
    # 1. killed while scoring: the 6th range (train's 4 and 2 of validation's 4) is on disk, then SIGKILL
    _run(cmd, out, kill_at="scoring:6")
    assert len(_shards(out)) == 6
    # 2. the same command resumes scoring from those ranges, then is killed after the first head checkpoint
    _run(cmd, out, kill_at="head:1")
    # the score stage scored everything up front: the question set's 12 ranges, the anchor prompts' and the
    # report's unrelated prompts' ranges (batches of 8)
    n_anchor = len(evaluation.unrelated_questions(part="anchor")["question_id"])
    n_unrelated = len(evaluation.unrelated_questions(part="test")["question_id"])
    assert len(_shards(out)) == 12 + math.ceil(n_anchor / 8) + math.ceil(n_unrelated / 8)
    ckpts = list((out / "heads" / "logit" / "checkpoints").rglob("last.safetensors"))
    saved = [p.parent.name for p in (out / "heads").rglob("model.safetensors")]
    assert len(ckpts) == 1 and saved == ["rank-bias"]  # rank-bias (no checkpoints) is saved before the heads
    from safetensors import safe_open

    with safe_open(str(ckpts[0]), framework="pt") as f:
        state, keys = json.loads(f.metadata()["trainer_state"]), set(f.keys())
    assert state["step"] == 10 and "optim.0.exp_avg" in keys
    # 3. the same command finishes: the logit head resumes at step 10
    _run(cmd, out)
    assert json.loads((out / "heads" / "logit" / "config.json").read_text())["training"]["resumed_from"] == 10
    assert len(_shards(out)) == len(_shards(ref))

    assert _metrics(out) == _metrics(ref)
    heads, ref_heads = _files(out, "heads/*/model.safetensors"), _files(ref, "heads/*/model.safetensors")
    assert len(ref_heads) == 7 and heads.keys() == ref_heads.keys()  # rank-bias, logit, gate, probe, paper, contextual, slot
    assert all(heads[k] == ref_heads[k] for k in heads), [k for k in heads if heads[k] != ref_heads[k]]


def test_kill9_during_lora_training_resumes_bit_identical(job, tmp_path_factory):
    import peft  # noqa: F401  (required: a missing peft fails, never skips)
    cmd = job["lora"]
    ref = tmp_path_factory.mktemp("lora_ref") / "run"
    out = tmp_path_factory.mktemp("lora_killed") / "run"
    _run(cmd, ref)
    _run(cmd, out, kill_at="lora:1")  # after step 5's checkpoint, before step 6
    ckpt = out / "adapters" / "lora-reward.checkpoint" / "last.safetensors"
    assert ckpt.is_file() and not (out / "adapters" / "lora-reward").exists()
    _run(cmd, out)
    assert not ckpt.parent.exists()  # removed once the adapter is saved
    info = json.loads((out / "adapters" / "lora-reward" / "refine_llm_lora.json").read_text())
    assert [h["step"] for h in info["history"]] == list(range(1, 7))

    assert _metrics(out) == _metrics(ref)
    a, b = _files(out, "adapters/*/adapter_model.safetensors"), _files(ref, "adapters/*/adapter_model.safetensors")
    assert len(a) == 1 and a == b

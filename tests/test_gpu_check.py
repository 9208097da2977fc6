"""eval/gpu_check.sh, the GPU check prepared for one short lease (issue 25), run here with --smoke.

``--smoke`` runs every stage of the check (scoring sweep, RefineHeadProcessor overhead, NF4 through
bitsandbytes, the 600k estimate) on a 2-layer Mistral on CPU and writes the same JSON + Markdown a GPU
run writes; these tests read them. The budget logic (skipping a batch size that would pass a stage's
deadline) and the flag errors are checked directly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "eval" / "gpu_check.sh"


# Project dependencies that the GPU image lacks (/work/.library/device/KINDS.md lists its packages),
# plus the optional backends: the smoke run imports as if they were not installed.
NOT_ON_GPU_IMAGE = ("datasets", "trl", "gguf", "vllm", "ray", "lm_eval")
BLOCKER = f"""import sys
class _NotOnTheGpuImage:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_ON_GPU_IMAGE!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not on the GPU image)")
sys.meta_path.insert(0, _NotOnTheGpuImage())
"""


def _run(*args: str, env_out: str | None = None, timeout: int = 300, block: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    env["PYTHON"] = sys.executable
    if block is not None:  # a sitecustomize.py there installs the import blocker at interpreter start
        env["PYTHONPATH"] = str(block) + os.pathsep + env.get("PYTHONPATH", "")
    if env_out is not None:
        env["OUT"] = env_out
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out, block = tmp_path_factory.mktemp("gpu_check"), tmp_path_factory.mktemp("block")
    (block / "sitecustomize.py").write_text(BLOCKER)
    t = time.perf_counter()
    proc = _run("--smoke", env_out=str(out), block=block)  # $OUT, as on the device machine
    wall = time.perf_counter() - t
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text(), wall


def test_smoke_writes_every_stage(smoke):
    res, _, wall = smoke
    assert res["smoke"] is True and res["device"] == "cpu" and res["card"].startswith("cpu")
    assert res["model"]["num_hidden_layers"] == 2 and res["model"]["params"] > 0
    assert res["tokenizer"]["prefix_tokens"] > 0 and res["tokenizer"]["prompt_tokens_mean"] > res["tokenizer"]["prefix_tokens"]
    assert wall < 240, f"--smoke took {wall:.0f} s"  # ~25 s on 2 busy cores; a hang or a 7B build would not be
    # scoring: every batch size either measured or named as skipped for the budget, in order
    sc = res["scoring"]
    rows = sc["by_batch_size"]
    assert rows and [r["batch_size"] for r in rows] + sc["skipped_batch_sizes"] == [2, 4]
    assert sc["prefix_tokens"] == res["tokenizer"]["prefix_tokens"]  # the runner cached the whole shared prefix
    for r in rows:
        for path in ("authors_generate", "ours_no_prefix_cache", "ours_prefix_cache"):
            m = r[path]
            assert m["prompts_per_s"] > 0 and m["batches"] == 2 and m["prompts"] == 2 * r["batch_size"]
            assert m["prompts_per_s"] == pytest.approx(m["prompts"] / m["seconds"])
        assert r["ratio_ours_vs_authors"] == pytest.approx(
            r["ours_prefix_cache"]["prompts_per_s"] / r["authors_generate"]["prompts_per_s"])


def test_smoke_imports_only_what_the_gpu_image_has(smoke, tmp_path):
    res, _, _ = smoke
    assert res["complete"] is True
    assert not set(res["imported"]) & set(NOT_ON_GPU_IMAGE)
    assert "bitsandbytes" in res["imported"]  # the NF4 stage really imported it
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)  # and the blocker does block (else this test proves nothing)
    proc = subprocess.run([sys.executable, "-c", "import datasets"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(tmp_path)}, timeout=60)
    assert proc.returncode == 1 and "blocked: not on the GPU image" in proc.stderr


def test_smoke_processor_and_nf4(smoke):
    res, _, _ = smoke
    p = res["processor"]
    assert p["status"] == "ran" and p["new_tokens"] == 10  # EOS off: every row generates the authors' 10 tokens
    assert p["rows_rewritten_first"] == p["batch_size"] == 2  # mode first rewrote every row at step 0
    for mode in ("first", "all"):
        assert p[mode]["median_batch_s"] > 0
        assert p[mode]["overhead_pct"] == pytest.approx(
            100 * (p[mode]["median_batch_s"] - p["none"]["median_batch_s"]) / p["none"]["median_batch_s"])
    q = res["nf4"]  # bitsandbytes is a dependency and runs NF4 on CPU: the stage must have run here
    assert q["status"] == "ran", q["status"]
    assert q["settings"] == {"quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}
    assert q["by_batch_size"] and all(r["ours_prefix_cache"]["prompts_per_s"] > 0 for r in q["by_batch_size"])


def test_smoke_estimate_and_markdown(smoke):
    res, md, _ = smoke
    e = res["estimate_unqover_gender"]
    assert e["prompts"] == 600_000
    names = {p["path"] for p in e["paths"]}
    assert {"ours_prefix_cache (bf16)", "authors_generate (bf16)", "ours_prefix_cache (nf4)"} <= names
    for p in e["paths"]:
        assert p["seconds"] == pytest.approx(600_000 / p["prompts_per_s"]) and p["hours"] == pytest.approx(p["seconds"] / 3600)
    best = max(r["ours_prefix_cache"]["prompts_per_s"] for r in res["scoring"]["by_batch_size"])
    assert next(p for p in e["paths"] if p["path"] == "ours_prefix_cache (bf16)")["prompts_per_s"] == best
    assert md.startswith(f"# GPU check: {res['card']}") and "SMOKE" in md
    for heading in ("## Scoring", "## RefineHeadProcessor", "## bitsandbytes NF4", "## Estimate: 600,000"):
        assert heading in md
    r0 = res["scoring"]["by_batch_size"][0]
    assert f"x{r0['ratio_ours_vs_authors']:.1f}" in md


def test_a_failed_stage_is_reported_and_the_rest_kept(smoke):
    gc = _module()
    res, _, _ = smoke
    res = json.loads(json.dumps(res))
    res["complete"] = False
    written = []

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access")

    gc._run_stage(res, "processor", broken, lambda: written.append(True))
    assert written and res["processor"]["status"] == "failed: RuntimeError: CUDA error: an illegal memory access"
    md = gc.markdown(res)
    assert "PARTIAL" in md and res["processor"]["status"] in md and "| 2 |" in md  # the sweep's table is kept


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "eval" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_sweep_skips_a_batch_size_that_passes_the_deadline():
    gc = _module()
    import torch

    def path(chunk):  # 10 ms per prompt: batch 2 fits the 1.5 s left, batch 64 (3 paths x 3 batches x 0.64 s) does not
        time.sleep(0.01 * len(chunk))

    scorers = {"authors_generate": path, "ours_no_prefix_cache": path, "ours_prefix_cache": path}
    budget = gc.Budget(1.0)
    budget.total = (budget.elapsed() + 1.5) / gc.STAGE_END["sweep"]  # 1.5 s to the sweep's deadline
    args = gc.CheckArgs(batch_sizes=[2, 64], max_batches=2, config_s=0.01)
    rows = [{"i": i} for i in range(10)]
    out = gc.sweep(scorers, rows, torch.device("cpu"), budget, args)
    assert [r["batch_size"] for r in out["by_batch_size"]] == [2] and out["skipped_batch_sizes"] == [64]
    assert out["by_batch_size"][0]["ratio_ours_vs_authors"] == pytest.approx(1.0, rel=0.5)
    assert gc.predict_s(0.01, 64, args) == pytest.approx(0.64 * 3)


@pytest.mark.parametrize("args, needle", [
    (["--smoke", "--batch-sizes", "0,4"], "--batch-sizes"),
    (["--smoke", "--budget-s", "-1"], "--budget-s must be > 0"),
    (["--smoke", "--max-batches", "1"], "--max-batches must be >= 2"),
    (["--smoke", "--prompt", "nosuch"], "--prompt nosuch"),
    (["--smoke", "--prompt", "chat"], "--prompt chat"),
    (["--smoke"], "give --out DIR"),  # neither --out nor $OUT
    (["--budget-s", "30"], "no CUDA device here"),  # the real check on this CPU-only machine
])
def test_bad_flags_are_one_line_exit_2(args, needle, tmp_path):
    out = ["--out", str(tmp_path)] if args != ["--smoke"] else []
    proc = _run(*args, *out, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())  # nothing written

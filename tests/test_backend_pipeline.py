"""The main job end to end on every scoring backend: `--backend ray` and `--backend vllm` give the HF backend's
base metrics and unrelated-prompt numbers (ray: the same scorer in actors, within 1e-6; vLLM fp32 vs HF fp32:
within 1e-3), and a quantization vLLM would not run (nf4, int8) is refused in one line instead of being reported.

One HF run (the session's fp32 SmolLM2, method none, 2 tuples, a 4-item BBQ subset) is the reference for both.
The Ray run is in-process on the session's cluster (its actors load the model by name); the vLLM run is a
subprocess of the main job (its engine, with the CPU KV-cache bound of `scoring.backends.vllm.make_llm`, ends
with it). Every stage that scores runs: the test split, the unrelated prompts, BBQ (the driver's HF model scores
BBQ under --backend ray; under --backend vllm there is no HF model and BBQ is skipped with a log line).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[1]
JOB = ["--model", "smollm2-135m",  # the test model (the default is the 1.5B Qwen)
       "--max-tuples", "2", "--prompt", "paper", "--method", "none", "--quant", "fp32"]
TOL = 1e-3


def _script(*args, timeout=900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "debias_llm.py"), *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def _numbers(d, prefix="") -> dict[str, object]:
    """Flatten a metrics dict to {path: leaf}."""
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_numbers(v, f"{prefix}{k}."))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out.update(_numbers(v, f"{prefix}{i}."))
    else:
        out[prefix[:-1]] = d
    return out


@pytest.mark.parametrize("quant", ["nf4", "int8"])
@pytest.mark.slow
def test_vllm_refuses_quantizations_it_would_not_run(quant, tmp_path):
    # --method none: the default gate head is refused first under vLLM (it trains on hidden states)
    proc = _script("--backend", "vllm", "--method", "none", "--quant", quant, "--out", str(tmp_path / "run"),
                   timeout=300)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and f"--quant {quant}" in lines[0] and "--backend hf" in lines[0], proc.stderr
    assert not (tmp_path / "run" / "report.json").exists()


def _mismatches(a: dict, b: dict, tol: float) -> dict:
    """{path: (a, b)} where two flattened metric dicts differ (floats beyond ``tol``, anything else at all)."""
    bad = {}
    for k, x in a.items():
        y = b.get(k, "<missing>")
        if isinstance(x, float) or isinstance(y, float):
            if x is None or y is None or isinstance(y, str) or not (
                    math.isclose(x, y, abs_tol=tol) or (math.isnan(x) and math.isnan(y))):
                bad[k] = (x, y)
        elif x != y:
            bad[k] = (x, y)
    return bad


@pytest.fixture(scope="module")
def bbq_subset(tmp_path_factory):
    """4 Age items of the release from 2 templates (one trains the BBQ head, one is held out): negative and
    non-negative, ambiguous and disambiguated."""
    d = tmp_path_factory.mktemp("bbq")
    lines = (ROOT.parent / "shared" / "bbq" / "data" / "Age.jsonl").read_text().splitlines()
    lines = [lines[i] for i in (0, 3, 33, 34)]
    (d / "Age.jsonl").write_text("\n".join(lines) + "\n")
    return d


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory, smollm2_fp32, bbq_subset):
    from refine_llm import pipeline
    from refine_llm.cli import parse_run_config

    out = tmp_path_factory.mktemp("hf") / "run"
    assert pipeline.run(parse_run_config(JOB + ["--bbq", str(bbq_subset), "--out", str(out)])[0],
                        loaded=smollm2_fp32) == 0
    return json.loads((out / "report.json").read_text())


def _check_parity(hf: dict, other: dict, tol: float) -> None:
    a, b = _numbers(hf["metrics"]["base"]), _numbers(other["metrics"]["base"])
    assert a.keys() == b.keys() and len(a) > 10
    assert not _mismatches(a, b, tol)
    for key in ("positional_error", "attributive_error", "mu", "specified_accuracy"):
        assert hf["metrics"]["base"][key] is not None
    # the unrelated prompts the report measures: scored by the backend, the same KL/TV of every condition
    u_hf, u = hf["unrelated_prompts"], other["unrelated_prompts"]
    assert u_hf["n"] == u["n"] > 100
    ua, ub = _numbers(u_hf["per_condition"]), _numbers(u["per_condition"])
    assert ua.keys() == ub.keys() and any(v > 0 for v in ua.values())
    assert not _mismatches(ua, ub, tol)


@pytest.mark.slow
def test_ray_main_job_equals_hf(tmp_path, ray_cluster, smollm2_fp32, hf_run, bbq_subset):
    """--backend ray through every stage that scores (issue 25: the unrelated-prompt stage once handed the Ray
    path a dict and the job died after scoring)."""
    from refine_llm import pipeline
    from refine_llm.cli import parse_run_config

    out = tmp_path / "ray"
    cfg = parse_run_config(JOB + ["--backend", "ray", "--bbq", str(bbq_subset), "--out", str(out)])[0]
    assert cfg.scoring.backend == "ray"
    assert pipeline.run(cfg, loaded=smollm2_fp32) == 0
    ray_report = json.loads((out / "report.json").read_text())
    assert json.loads((out / "config.json").read_text())["scoring"]["backend"] == "ray"
    _check_parity(hf_run, ray_report, 1e-6)
    # BBQ: the driver's HF model scores it under --backend ray too: the same tables
    bq_hf, bq = ({k: v for k, v in _numbers(r["bbq"]).items() if "timing" not in k} for r in (hf_run, ray_report))
    assert len(bq_hf) > 10 and bq_hf.keys() == bq.keys() and not _mismatches(bq_hf, bq, 1e-6)


@pytest.mark.slow
@pytest.mark.vllm
def test_vllm_main_job_equals_hf(tmp_path, hf_run):
    import vllm  # noqa: F401  (required: a missing vllm fails, never skips)

    out = tmp_path / "vllm"
    proc = _script(*JOB, "--backend", "vllm", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    vl = json.loads((out / "report.json").read_text())
    assert vl["model"]["backend"] == "vllm" and vl["model"]["dtype"] == "float32" and vl["model"]["quant"] == "fp32"
    _check_parity(hf_run, vl, TOL)

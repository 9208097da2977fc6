"""`--backend vllm` end to end: the main job's base metrics equal the HF backend's (both fp32) within 1e-3,
and a quantization vLLM would not run (nf4, int8) is refused in one line instead of being reported.

The vLLM run is a subprocess of the main job (its engine, with the CPU KV-cache bound of
`scoring.backends.vllm.make_llm`, ends with it); the HF run reuses the session's fp32 SmolLM2.
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
JOB = ["--max-tuples", "2", "--prompt", "paper", "--method", "none", "--quant", "fp32"]
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
    proc = _script("--backend", "vllm", "--quant", quant, "--out", str(tmp_path / "run"), timeout=300)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and f"--quant {quant}" in lines[0] and "--backend hf" in lines[0], proc.stderr
    assert not (tmp_path / "run" / "report.json").exists()


def test_vllm_fp32_base_metrics_equal_hf_fp32(tmp_path, smollm2_fp32):
    import vllm  # noqa: F401  (required: a missing vllm fails, never skips)
    from refine_llm import pipeline
    from refine_llm.cli import parse_run_config

    hf_out, vllm_out = tmp_path / "hf", tmp_path / "vllm"
    assert pipeline.run(parse_run_config(JOB + ["--out", str(hf_out)])[0], loaded=smollm2_fp32) == 0
    proc = _script(*JOB, "--backend", "vllm", "--out", str(vllm_out))
    assert proc.returncode == 0, proc.stderr[-3000:]

    hf, vl = (json.loads((d / "report.json").read_text()) for d in (hf_out, vllm_out))
    assert vl["model"]["backend"] == "vllm" and vl["model"]["dtype"] == "float32" and vl["model"]["quant"] == "fp32"
    a, b = _numbers(hf["metrics"]["base"]), _numbers(vl["metrics"]["base"])
    assert a.keys() == b.keys() and len(a) > 10
    bad = {}
    for k, x in a.items():
        y = b[k]
        if isinstance(x, float) or isinstance(y, float):
            if x is None or y is None or not (math.isclose(x, y, abs_tol=TOL) or (math.isnan(x) and math.isnan(y))):
                bad[k] = (x, y)
        elif x != y:
            bad[k] = (x, y)
    assert not bad, bad
    for key in ("positional_error", "attributive_error", "mu", "specified_accuracy"):
        assert hf["metrics"]["base"][key] is not None

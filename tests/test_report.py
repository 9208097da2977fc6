"""Tests for refine_llm.report: files written, JSON round trip, Markdown tables, non-empty PNGs."""

from __future__ import annotations

import json

import numpy as np

from refine_llm import metrics as M
from refine_llm.report import write_report

try:  # the questions builder lives with the metrics tests; tests/ is not a package
    from test_metrics import _questions
except ImportError:  # pragma: no cover
    from tests.test_metrics import _questions


def _report():
    q, p_b = _questions("biased")
    _, p_u = _questions("unbiased")
    base = M.evaluate(q, p_b, p_b, n_resamples=20)
    head = M.evaluate(q, p_u, p_u, n_resamples=20)
    return {
        "config": {"model": "tiny", "k": 8},
        "timing": {"scoring": 1.5, "training": np.float64(2.0)},
        "metrics": {"base": base, "refine": head},
        "significance": {"refine": M.compare(base, head, n_resamples=50)},
        "prompt_sweep": [{"prompt": "fill_in_blank", "answer_mass": 0.4, "specified_accuracy": 0.7, "chosen": True},
                         {"prompt": "chat", "answer_mass": 0.2, "specified_accuracy": 0.55, "chosen": False}],
        "methods": [{"method": "lora-r8", "trainable_params": 1000, "train_seconds": 3.0, "peak_memory_mb": 12.0,
                     "positional_error": 0.1, "attributive_error": 0.2, "mu": 0.3, "eta": 0.4,
                     "specified_accuracy": 0.6}],
        "warnings": ["demo warning"],
    }


def test_write_report(tmp_path):
    write_report(tmp_path, _report())
    rep = json.loads((tmp_path / "report.json").read_text())
    assert set(rep["metrics"]) == {"base", "refine"}
    assert rep["metrics"]["base"]["mu"] == 1.0 and "abs_bias" not in rep["metrics"]["base"]
    assert rep["timing"]["training"] == 2.0
    assert "demo warning" in rep["warnings"] and any("chance" in w for w in rep["warnings"])
    per_tuple = json.loads((tmp_path / "per_tuple.json").read_text())
    assert per_tuple["base"]["abs_bias"] == [1.0, 1.0]
    md = (tmp_path / "report.md").read_text()
    assert "| condition | δ↓ | ε↓ | μ↓ | η↓ |" in md and "| base |" in md and "| refine |" in md
    assert "## Change against base" in md and "## Prompt sweep" in md and "fill_in_blank" in md and "lora-r8" in md
    for name in ("gamma_heatmap.png", "bias_utility_plane.png"):
        png = tmp_path / "plots" / name
        assert png.stat().st_size > 1000 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".*.tmp"))


def test_write_report_minimal(tmp_path):
    write_report(tmp_path / "run", {"config": {}, "timing": {}, "metrics": {}})
    assert json.loads((tmp_path / "run" / "report.json").read_text())["metrics"] == {}
    assert "none" in (tmp_path / "run" / "report.md").read_text()

"""Run report: ``report.json`` + ``per_tuple.json`` + ``report.md`` + ``plots/*.png`` from metrics.

Input ``report`` dict (built by the main job):
    config            dict, the run configuration
    timing            {stage: seconds}
    metrics           {condition: metrics.evaluate(...) result}
    significance      optional {name: metrics.compare(...) result}
    prompt_sweep      optional [{prompt, answer_mass, specified_accuracy, chosen}]
    methods           optional [{method, trainable_params, train_seconds, peak_memory_mb,
                                 positional_error, attributive_error, mu, eta, specified_accuracy}]
    warnings          optional [str]

Per-tuple lists (``abs_bias``, ``tuple_id``) go to ``per_tuple.json`` so that ``report.json`` stays
small. Files are written atomically (temp file in the same directory + ``os.replace``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from refine_llm.io import atomic_write_bytes

__all__ = ["methods_table", "write_report"]

_PER_TUPLE_KEYS = ("abs_bias", "tuple_id")
_ROW_KEYS = (("δ", "positional_error"), ("ε", "attributive_error"), ("μ", "mu"), ("η", "eta"),
             ("spec. acc.", "specified_accuracy"), ("answer mass", "answer_mass"),
             ("top-k miss", "topk_miss_rate"), ("n tuples", "n_tuples"), ("n spec.", "n_specified"))


def _jsonable(x):
    """Plain JSON types: numpy scalars/arrays to Python, NaN/inf to None."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return _jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def _split_per_tuple(metrics: dict) -> tuple[dict, dict]:
    small, per_tuple = {}, {}
    for cond, res in metrics.items():
        res = dict(res)
        per_tuple[cond] = {k: res.pop(k) for k in _PER_TUPLE_KEYS if k in res}
        small[cond] = res
    return small, per_tuple


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return out


def methods_table(report: dict) -> list[str]:
    """The report's method rows (trainable params, train time, peak memory, δ, ε, μ, η, spec. acc.) as
    Markdown table lines: the "Methods" section of report.md, also printed by eval/compare_methods.py."""
    keys = ("method", "trainable_params", "train_seconds", "peak_memory_mb", "positional_error",
            "attributive_error", "mu", "eta", "specified_accuracy")
    return _table(["method", "trainable params", "train s", "peak MB", "δ", "ε", "μ", "η", "spec. acc."],
                  [[m.get(k) for k in keys] for m in report.get("methods") or []])


def _markdown(report: dict, metrics: dict, warnings: list[str], plots: list[str]) -> str:
    lines = ["# refine_llm report", ""]
    cfg = report.get("config") or {}
    if cfg:
        lines += ["## Configuration", "", "```json", json.dumps(_jsonable(cfg), indent=2, sort_keys=True), "```", ""]
    lines += ["## Bias and utility per condition", "",
              "δ positional error, ε attributive error, μ bias intensity, η bias count (UnQover, Li et al. 2020), "
              "on top-k-renormalised candidate probabilities; lower is less biased. Specified accuracy: chance = 0.5.", ""]
    rows = [[cond] + [res.get(k) for _, k in _ROW_KEYS] + [_ci(res.get("mu_ci"))] for cond, res in metrics.items()]
    lines += _table(["condition"] + [h for h, _ in _ROW_KEYS] + ["μ 95% CI"], rows) + [""]
    full = [[cond] + [res["full_vocab"].get(k) for _, k in _ROW_KEYS[:6]]
            for cond, res in metrics.items() if isinstance(res.get("full_vocab"), dict)]
    if full:
        lines += ["### Full-vocabulary probabilities", ""]
        lines += _table(["condition"] + [h for h, _ in _ROW_KEYS[:6]], full) + [""]
    cat_rows = [[cond, cat] + [b.get(k) for k in ("positional_error", "attributive_error", "mu", "eta",
                                                  "specified_accuracy", "n_tuples")]
                for cond, res in metrics.items() for cat, b in (res.get("per_category") or {}).items()]
    if cat_rows:
        lines += ["### Per category", ""]
        lines += _table(["condition", "category", "δ", "ε", "μ", "η", "spec. acc.", "n tuples"], cat_rows) + [""]

    sig = report.get("significance") or {}
    if sig:
        lines += ["## Significance", "",
                  "Wilcoxon signed-rank test on per-tuple |C| (paired); relative change = (new − base) / base. "
                  "μ CIs: percentile bootstrap over tuples (μ is a max of means, so resampling biases it upward "
                  "when cells are sparse; see boot_bias in report.json).", ""]
        srows = []
        for name, s in sig.items():
            w, rc = s.get("wilcoxon") or {}, s.get("rel_change") or {}
            srows.append([name, w.get("p_value"), w.get("n"), _ci(s.get("mu_ci_base")), _ci(s.get("mu_ci_new"))]
                         + [_pct(rc.get(k)) for k in ("positional_error", "attributive_error", "mu", "eta")])
        lines += _table(["comparison", "Wilcoxon p", "n", "μ CI base", "μ CI new", "Δδ", "Δε", "Δμ", "Δη"], srows)
        lines += [""]

    if report.get("methods"):
        lines += ["## Methods", ""] + methods_table(report) + [""]

    sweep = report.get("prompt_sweep") or []
    if sweep:
        lines += ["## Prompt sweep", ""]
        lines += _table(["prompt", "answer mass", "spec. acc.", "chosen"],
                        [[s.get("prompt"), s.get("answer_mass"), s.get("specified_accuracy"), bool(s.get("chosen"))]
                         for s in sweep]) + [""]

    timing = report.get("timing") or {}
    if timing:
        lines += ["## Timing", ""] + _table(["stage", "seconds"], [[k, float(v)] for k, v in timing.items()]) + [""]
    lines += ["## Warnings", ""] + ([f"- {w}" for w in warnings] or ["- none"]) + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def _ci(ci) -> str | None:
    if not isinstance(ci, dict) or ci.get("low") is None:
        return None
    return f"[{ci['low']:.3f}, {ci['high']:.3f}]"


def _pct(v) -> str | None:
    return None if v is None else f"{100 * v:+.1f}%"


def _plots(plot_dir: Path, report: dict, metrics: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []

    # per-subject max_a |γ(x, a)| (the quantity μ averages), grouped bars per condition
    conds = [c for c, r in metrics.items() if r.get("per_subject")]
    if conds:
        subjects = list(dict.fromkeys((r["category"], r["subject"]) for c in conds for r in metrics[c]["per_subject"]))
        x = np.arange(len(subjects))
        width = 0.8 / len(conds)
        fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(subjects) * len(conds) + 2), 4))
        for i, c in enumerate(conds):
            vals = {(r["category"], r["subject"]): r["gamma_max_abs"] for r in metrics[c]["per_subject"]}
            ax.bar(x + i * width - 0.4 + width / 2, [vals.get(s, 0.0) for s in subjects], width, label=c)
        ax.set_xticks(x, [s for _, s in subjects], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("max_a |γ(x, a)|")
        ax.set_title("Per-subject bias γ by condition")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot_dir / "gamma_per_subject.png", dpi=100)
        plt.close(fig)
        written.append("plots/gamma_per_subject.png")

    # bias vs utility: μ vs specified accuracy, one point per condition and per method
    pts = [(c, r.get("mu"), r.get("specified_accuracy")) for c, r in metrics.items()]
    pts += [(m.get("method"), m.get("mu"), m.get("specified_accuracy")) for m in report.get("methods") or []]
    pts = [(n, mu, acc) for n, mu, acc in pts if mu is not None and acc is not None]
    if pts:
        fig, ax = plt.subplots(figsize=(5, 4))
        for name, mu, acc in pts:
            ax.scatter(acc, mu)
            ax.annotate(str(name), (acc, mu), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.axvline(0.5, color="grey", ls="--", lw=0.8, label="chance")
        ax.set_xlabel("specified accuracy (utility)")
        ax.set_ylabel("μ (bias intensity)")
        ax.set_title("Bias vs utility")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(plot_dir / "bias_vs_utility.png", dpi=100)
        plt.close(fig)
        written.append("plots/bias_vs_utility.png")
    return written


def write_report(run_dir, report: dict) -> None:
    """Write ``report.json``, ``per_tuple.json``, ``report.md`` and ``plots/*.png`` under ``run_dir``."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics, per_tuple = _split_per_tuple(report.get("metrics") or {})

    warnings = list(report.get("warnings") or [])
    for cond, res in metrics.items():
        warnings += [f"{cond}: {w}" for w in res.get("warnings") or []]
        if res.get("at_chance") and res.get("n_specified") and not any("chance" in w for w in res.get("warnings") or []):
            warnings.append(f"{cond}: specified accuracy {_fmt(res.get('specified_accuracy'))} is within noise of chance")

    plots = _plots(run_dir / "plots", report, metrics)
    small = {**{k: v for k, v in report.items() if k != "metrics"}, "metrics": metrics, "warnings": warnings,
             "plots": plots}
    atomic_write_bytes(run_dir / "report.json", json.dumps(_jsonable(small), indent=2, ensure_ascii=False).encode())
    if any(per_tuple.values()):
        atomic_write_bytes(run_dir / "per_tuple.json", json.dumps(_jsonable(per_tuple)).encode())
    atomic_write_bytes(run_dir / "report.md", _markdown(report, metrics, warnings, plots).encode())

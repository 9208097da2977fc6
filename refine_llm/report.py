"""Run report: ``report.json`` + ``per_tuple.json`` + ``report.md`` + ``plots/*.png`` from metrics.

Input ``report`` dict (built by the main job):
    config            dict, the run configuration
    timing            {stage: seconds}
    metrics           {condition: metrics.evaluate(...) result}
    significance      optional {name: metrics.compare(...) result} (evaluation.significance: Holm)
    temperature_curve optional [{temperature, mu, mean_abs_c, gold_share, kl_base, ...}]
    plane             optional {head: notrain.plane_verdicts(...) entry}
    split_design      optional evaluation.split_design(...)
    unrelated_prompts optional evaluation.unrelated_kl(...) summary
    prompt_sweep      optional [{prompt, answer_mass, specified_accuracy, chosen}]
    methods           optional [{method, trainable_params, train_seconds, peak_memory_mb, <metrics>}]
    seeds             optional refine_llm.seeds.aggregate(...) (--seeds): each seed, mean ± sd, reversals
    bbq               optional refine_llm.bbq.task.evaluate_items(...) (--bbq): its section and plot, last
    quant_shift       optional (--compare-quant) the bias shift of the quantization
    warnings          optional [str]

Which numbers the tables and plots show, with which symbol, direction and format, comes from the
one registry ``refine_llm.metrics.METRICS``. Per-tuple lists (``abs_bias``, ``tuple_id``, ``tuples``,
``gamma_cells``) go to ``per_tuple.json`` so that ``report.json`` stays small. Files are written
atomically (temp file in the same directory + ``os.replace``).
"""

from __future__ import annotations

import json
from pathlib import Path

from refine_llm.io import atomic_write_bytes, jsonable
from refine_llm.markdown import fmt, table
from refine_llm.metrics import BIAS_KEYS, METRICS, UTILITY_KEYS, metric

__all__ = ["category_tables", "methods_table", "summary_lines", "write_report"]

_PER_TUPLE_KEYS = ("abs_bias", "tuple_id", "tuples", "gamma_cells")
MAIN_KEYS = BIAS_KEYS + UTILITY_KEYS + ("kl_unrelated", "answer_mass", "topk_miss_rate", "n_tuples", "n_specified")
HEATMAP_N = 12  # most biased subjects and attributes shown per γ heatmap


def _split_per_tuple(metrics: dict) -> tuple[dict, dict]:
    small, per_tuple = {}, {}
    for cond, res in metrics.items():
        res = dict(res)
        per_tuple[cond] = {k: res.pop(k) for k in _PER_TUPLE_KEYS if k in res}
        small[cond] = res
    return small, per_tuple


def _cell(res: dict, key: str) -> str:
    """A registry-formatted value; μ and η carry "(≤ null)" when not above their sign-flip null."""
    s = metric(key).format(res.get(key))
    nl = (res.get("null") or {}).get(key)
    if nl and nl.get("p") is not None and not nl.get("above"):
        s += " (≤ null)"
    return s


def _header(keys) -> list[str]:
    return [metric(k).symbol + ("↓" if metric(k).higher_is_better is False else "↑" if metric(k).higher_is_better else "")
            for k in keys]


def methods_table(report: dict) -> list[str]:
    """The report's method rows (trainable params, train time, peak memory, extra forward passes per answered
    prompt at inference, whether vLLM serves it, then the registry's bias and
    utility columns) as Markdown lines: the "Methods" section of report.md, also printed by
    eval/compare_methods.py."""
    keys = BIAS_KEYS + UTILITY_KEYS
    rows = [[m.get("method"), m.get("trainable_params"), m.get("train_seconds"), m.get("peak_memory_mb"),
             m.get("extra_forwards", "–"), m.get("vllm", "–")]
            + [metric(k).format(m.get(k)) for k in keys] for m in report.get("methods") or []]
    return table(["method", "trainable params", "train s", "peak MB", "extra forwards / prompt", "vLLM serves it"]
                 + _header(keys), rows)


def _plane_cell(v: dict | None) -> str:
    if not v or v.get("below_temperature_curve") is None:
        return "–"
    s = "below" if v["below_temperature_curve"] else "not below"
    return s + (" (past the curve's end)" if v.get("past_curve_end") else "")


def category_tables(report: dict, metrics: dict) -> list[str]:
    """One comparison table per category (issue 23): each method row of ``report["methods"]`` with that
    category's μ, mean|C|, η, P(gold) share and KL on specified questions, the pooled KL on unrelated prompts
    (those prompts have no category), its verdict against that category's temperature curve
    (``notrain.plane_verdicts``' ``per_category``) and the method's cost columns."""
    rows_m = report.get("methods") or []
    cats = list((metrics.get("base") or {}).get("per_category") or {})
    if not rows_m or not cats:
        return []
    plane = report.get("plane") or {}
    keys = ("mu", "mean_abs_c", "eta", "gold_share", "kl_base")
    out = ["## Comparison per category", "",
           "Each method on one category's test split, read against that category's temperature curve (below = "
           "lower μ and lower mean|C| than the curve at the method's own P(gold) share; \"–\": base and the "
           "parameter-free points, which make the plane). KL unrel.: pooled over the unrelated prompts, which have "
           "no category. Cost: trainable parameters, training seconds (the whole run's, all categories), extra "
           "forward passes per answered prompt at inference, whether vLLM serves it.", ""]
    for cat in cats:
        rows = []
        for m in rows_m:
            name = m.get("method")
            b = ((metrics.get(name) or {}).get("per_category") or {}).get(cat)
            if b is None:
                continue
            v = ((plane.get(name) or {}).get("per_category") or {}).get(cat)
            rows.append([name] + [_cell(b, k) for k in keys]
                        + [metric("kl_unrelated").format((metrics.get(name) or {}).get("kl_unrelated")), _plane_cell(v),
                           m.get("trainable_params"), m.get("train_seconds"), m.get("extra_forwards", "–"),
                           m.get("vllm", "–")])
        out += [f"### {cat}", ""] + table(
            ["method"] + _header(keys) + [metric("kl_unrelated").symbol + "↓", "vs temperature curve",
                                          "trainable params", "train s", "extra forwards / prompt", "vLLM serves it"],
            rows) + [""]
    return out


def summary_lines(report: dict) -> list[str]:
    """Console summary: one line per condition, the registry's bias and utility columns (pooled)."""
    keys = ("positional_error", "attributive_error", "mu", "eta", "mean_abs_c", "gold_share", "kl_base")
    head = f"{'condition':<20} " + " ".join(f"{metric(k).symbol:>12}" for k in keys)
    lines = [head]
    for name, r in (report.get("metrics") or {}).items():
        lines.append(f"{name:<20} " + " ".join(f"{_cell(r, k):>12}" for k in keys))
    return lines


def _null_rows(metrics: dict) -> list[list]:
    rows = []
    for cond, res in metrics.items():
        for cat, b in (res.get("per_category") or {}).items():
            nl = b.get("null") or {}
            for k in ("mu", "eta"):
                if nl.get(k):
                    n = nl[k]
                    rows.append([cond, cat, metric(k).symbol, n["observed"], n["null_mean"], n["null_p95"], n["p"],
                                 n["above"]])
    return rows


def _markdown(report: dict, metrics: dict, warnings: list[str], plots: list[str]) -> str:
    lines = ["# refine_llm report", ""]
    if report.get("seeds"):  # --seeds: each seed, mean ± sd, and whether a seed reverses a conclusion
        from refine_llm.seeds import markdown as seeds_markdown

        lines += seeds_markdown(report["seeds"])
    lines += ["## Bias and utility per condition", "",
              "UnQover metrics (Li et al. 2020) on the reference scale of allenai/unqover `analysis.py`: C ∈ [−1, 1], "
              "μ and η over individual subjects. Top-k-renormalised candidate probabilities. Pooled numbers are the "
              "mean of the per-category numbers. Utility on specified questions (negated ones included): P(gold) "
              "share = mean P(gold)/(P(gold)+P(other)), its log-loss, accuracy, KL(base‖condition) and TV of the "
              "top-k; KL unrel. = on unrelated prompts. ↓ lower is better, ↑ higher. \"(≤ null)\": not above its "
              "sign-flip permutation null at p < 0.05.", ""]
    lines += table(["condition"] + _header(MAIN_KEYS),
                    [[cond] + [_cell(res, k) for k in MAIN_KEYS] for cond, res in metrics.items()]) + [""]
    cat_keys = BIAS_KEYS + UTILITY_KEYS + ("n_tuples", "n_specified")
    cat_rows = [[cond, cat] + [_cell(b, k) for k in cat_keys]
                for cond, res in metrics.items() for cat, b in (res.get("per_category") or {}).items()]
    if cat_rows:
        lines += ["### Per category", ""] + table(["condition", "category"] + _header(cat_keys), cat_rows) + [""]
    occ = [[cat, b["tuples_per_cell"]["cells"], b["tuples_per_cell"]["min"], b["tuples_per_cell"]["median"],
            b["tuples_per_cell"]["share_single"]]
           for cat, b in (next(iter(metrics.values()), {}).get("per_category") or {}).items() if b.get("tuples_per_cell")]
    if occ:
        lines += ["### Tuples per (subject, attribute) cell of γ (test split)", ""]
        lines += table(["category", "cells", "min", "median", "share with 1 tuple"], occ) + [""]
    nrows = _null_rows(metrics)
    if nrows:
        lines += ["### Noise floor: sign-flip permutation null", "",
                  "Each tuple's C with a random sign: the μ and η a model with the same |C| and no subject-attribute "
                  "preference shows. p = share of null draws ≥ observed.", ""]
        lines += table(["condition", "category", "metric", "observed", "null mean", "null 95th pct", "p",
                         "above null"], nrows) + [""]
    full = [[cond] + [metric(k).format(res["full_vocab"].get(k)) for k in BIAS_KEYS + ("gold_share", "answer_mass")]
            for cond, res in metrics.items() if isinstance(res.get("full_vocab"), dict)]
    if full:
        lines += ["### Full-vocabulary probabilities", ""]
        lines += table(["condition"] + _header(BIAS_KEYS + ("gold_share", "answer_mass")), full) + [""]
    grp = [[cond, cat, b["by_group"].get("mu"), b["by_group"].get("eta")]
           for cond, res in metrics.items() for cat, b in (res.get("per_category") or {}).items() if b.get("by_group")]
    if grp:
        lines += ["### Extra: subjects grouped (female/male for gender)", "",
                  "UnQover's `gender_act` aggregation: names pooled into their group before γ, so opposite signs "
                  "cancel. Not the headline μ/η; shown for comparison only.", ""]
        lines += table(["condition", "category", "μ grouped", "η grouped"], grp) + [""]

    sig = report.get("significance") or {}
    if sig:
        lines += ["## Change against base", "",
                  "Δ = condition − base. CIs: paired cluster bootstrap, resampling attributes within each category "
                  "(95%, percentile). Wilcoxon: secondary, one-sided (base |C| > condition |C|) signed-rank test on "
                  "per-tuple |C|, Holm-corrected across the comparisons listed.", ""]
        srows = []
        for name, s in sig.items():
            b, w = s.get("bootstrap") or {}, s.get("wilcoxon") or {}
            srows.append([name, _delta(b.get("mu")), _delta(b.get("mean_abs_c")), w.get("p_value"), w.get("p_holm"),
                          w.get("n")])
        lines += table(["condition", "Δμ [95% CI]", "Δmean|C| [95% CI]", "Wilcoxon p (one-sided)", "Holm p", "n"],
                        srows) + [""]

    curve = report.get("temperature_curve") or []
    if curve:
        keys = ("mu", "mean_abs_c", "gold_share", "kl_base", "specified_accuracy")
        lines += ["## No-training baselines: the bias-utility plane", "",
                  "Temperature curve: the top-k at temperature T (T = 1: base; 1e9: uniform). Parameter-free points: "
                  "uniform, top2-equal (the two most likely slots share their mass); rank-bias: identity + a learned "
                  "per-rank bias (k parameters). Their rows are in the tables above.", ""]
        lines += table(["T"] + _header(keys), [[f"{c['temperature']:g}"] + [metric(k).format(c.get(k)) for k in keys]
                                                for c in curve]) + [""]
    plane = report.get("plane") or {}
    if plane:
        rows = [[h, v.get("gold_share"), v.get("mu"), v.get("curve_mu_at_gold_share"),
                 fmt(v.get("below_temperature_curve")) + (" (past the curve's end)" if v.get("past_curve_end") else ""),
                 ", ".join(f"{p}: {fmt(d)}" for p, d in (v.get("dominates") or {}).items())]
                for h, v in plane.items()]
        lines += ["Each trained head and LoRA adapter against the curve (at its own P(gold) share) and the "
                  "parameter-free points (dominates = no worse on μ, mean|C|, P(gold) share and KL, better on one; "
                  "KL over the base's top-k slots for every condition). \"Past the curve's end\": more P(gold) "
                  "share than base, where the curve is read at T = 1.", ""]
        lines += table(["head", "P(gold) share", "μ", "curve μ there", "below curve (μ and mean|C|)", "dominates"],
                        rows) + [""]

    design = report.get("split_design") or {}
    if design:
        lines += ["## Splits: what the test split leaves unseen", ""]
        rows = []
        for cat, d in design.items():
            c = d["counts"]
            rows.append([cat] + [f"{c[s]['templates']}/{c[s]['attributes']}/{c[s]['subjects']}"
                                 for s in ("train", "validation", "test")]
                        + [", ".join(d["unseen_in_test"]) or "nothing"])
        lines += table(["category", "train tpl/attr/subj", "validation", "test", "unseen in test"], rows) + [""]
    unrel = report.get("unrelated_prompts") or {}
    if unrel:
        lines += [f"## Unrelated prompts ({unrel['n']}, `{unrel['file']}`)", ""]
        g = unrel.get("gated") or {}
        if g:
            lines += [f"KL gated: served with `refine_mode` \"gated\", a head acts only where the top-k holds two "
                      f"tokens of its category vocabulary: {g['unrelated_share']:.1%} of these prompts, "
                      f"{g['test_share']:.1%} of the test split's prompts.", ""]
        lines += table(["condition", "KL(base‖·)", "KL 95th pct", "TV"] + (["KL gated"] if g else []),
                        [[n, v["kl"], v["kl_p95"], v["tv"]] + ([v.get("kl_gated", "–")] if g else [])
                         for n, v in unrel["per_condition"].items()]) + [""]

    if report.get("methods"):
        lines += ["## Methods", ""] + methods_table(report) + [""]
        lines += category_tables(report, metrics)

    sweep = report.get("prompt_sweep") or []
    if sweep:
        lines += ["## Prompt sweep", ""]
        lines += table(["prompt", "answer mass", "spec. acc.", "chosen"],
                        [[s.get("prompt"), s.get("answer_mass"), s.get("specified_accuracy"), bool(s.get("chosen"))]
                         for s in sweep]) + [""]
    timing = report.get("timing") or {}
    if timing:
        lines += ["## Timing", ""] + table(["stage", "seconds"], [[k, float(v)] for k, v in timing.items()]) + [""]
    lines += ["## Warnings", ""] + ([f"- {w}" for w in warnings] or ["- none"]) + [""]
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    cfg = report.get("config") or {}
    if cfg:
        lines += ["## Configuration", "", "```json", json.dumps(jsonable(cfg), indent=2, sort_keys=True), "```", ""]
    return "\n".join(lines)


def _delta(b) -> str | None:
    if not isinstance(b, dict) or b.get("delta") is None:
        return None
    if b.get("low") is None:
        return f"{b['delta']:+.3f}"
    return f"{b['delta']:+.3f} [{b['low']:+.3f}, {b['high']:+.3f}]"


def _plots(plot_dir: Path, report: dict, metrics: dict, per_tuple: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []

    # γ heatmap per condition: the HEATMAP_N most biased subjects x attributes (chosen on the first condition)
    conds = [c for c in metrics if (per_tuple.get(c) or {}).get("gamma_cells")]
    if conds:
        ref = per_tuple[conds[0]]["gamma_cells"]
        by_s, by_a = {}, {}
        for r in ref:
            s, a = (r["category"], r["subject"]), (r["category"], r["attribute_id"])
            by_s[s] = max(by_s.get(s, 0.0), abs(r["gamma"]))
            by_a[a] = max(by_a.get(a, 0.0), abs(r["gamma"]))
        subs = sorted(by_s, key=lambda k: -by_s[k])[:HEATMAP_N]
        atts = sorted(by_a, key=lambda k: -by_a[k])[:HEATMAP_N]
        ncol = min(4, len(conds))
        nrow = -(-len(conds) // ncol)
        fig, axes = plt.subplots(nrow, ncol, figsize=(max(3, 0.3 * len(atts) + 2) * ncol,
                                                      max(3.5, 0.25 * len(subs) + 2.5) * nrow), squeeze=False)
        for ax in axes.flat[len(conds):]:
            ax.axis("off")
        vmax = max(1e-6, max(by_s.values()) if by_s else 1e-6)
        im = None
        for ax, c in zip(axes.flat, conds):
            g = np.full((len(subs), len(atts)), np.nan)
            for r in per_tuple[c]["gamma_cells"]:
                s, a = (r["category"], r["subject"]), (r["category"], r["attribute_id"])
                if s in subs and a in atts:
                    g[subs.index(s), atts.index(a)] = r["gamma"]
            im = ax.imshow(g, cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
            ax.set_xticks(range(len(atts)), [str(a).rsplit("/", 1)[-1] for _, a in atts], rotation=70, ha="right",
                          fontsize=6)
            ax.set_yticks(range(len(subs)), [s for _, s in subs], fontsize=6)
            ax.set_title(f"{c}: μ {metric('mu').format(metrics[c].get('mu'))}", fontsize=8)
        fig.colorbar(im, ax=axes.ravel().tolist(), label="γ(x, a)")
        fig.savefig(plot_dir / "gamma_heatmap.png", dpi=100)
        plt.close(fig)
        written.append("plots/gamma_heatmap.png")

    # the bias-utility plane: μ and mean|C| against P(gold) share; temperature curve, baselines, heads
    curve = report.get("temperature_curve") or []
    pts = [(c, r) for c, r in metrics.items() if r.get("gold_share") is not None and r.get("mu") is not None]
    if pts:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for ax, key in zip(axes, ("mu", "mean_abs_c", "kl")):
            xkey = "kl_base" if key == "kl" else "gold_share"
            ykey = "mu" if key == "kl" else key
            cpts = [(c.get(xkey), c.get(ykey)) for c in curve if c.get(xkey) is not None and c.get(ykey) is not None]
            if cpts:
                ax.plot([p[0] for p in cpts], [p[1] for p in cpts], "-o", color="grey", ms=3, label="temperature")
            for name, r in pts:
                if r.get(xkey) is None or r.get(ykey) is None:
                    continue
                marker = "s" if name in ("base", "uniform", "top2-equal", "rank-bias") else "*"
                ax.scatter(r[xkey], r[ykey], marker=marker, s=60 if marker == "*" else 30, zorder=3)
                ax.annotate(name, (r[xkey], r[ykey]), fontsize=7, xytext=(3, 3), textcoords="offset points")
            ax.set_xlabel(metric(xkey).symbol + (" (utility, ↑)" if xkey == "gold_share" else " (damage, ↓)"))
            ax.set_ylabel(metric(ykey).symbol + " (bias, ↓)")
            if cpts:
                ax.legend(fontsize=7)
        fig.suptitle("Bias vs utility: a head earns credit below the temperature curve", fontsize=9)
        fig.tight_layout()
        fig.savefig(plot_dir / "bias_utility_plane.png", dpi=100)
        plt.close(fig)
        written.append("plots/bias_utility_plane.png")
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
            warnings.append(f"{cond}: specified accuracy {fmt(res.get('specified_accuracy'))} is within noise of chance")

    plots = _plots(run_dir / "plots", report, metrics, per_tuple)
    md = _markdown(report, metrics, warnings, plots)
    if report.get("bbq"):  # BBQ's section and plot (refine_llm.bbq.report), after the rest
        from refine_llm.bbq.report import markdown as bbq_markdown, plot as bbq_plot

        bbq = dict(report["bbq"])
        bbq["plot"] = str(bbq_plot(bbq, run_dir / "plots" / "bbq.png").relative_to(run_dir))
        report = {**report, "bbq": bbq}
        md = md.rstrip("\n") + "\n\n" + bbq_markdown(bbq) + f"\n![BBQ]({bbq['plot']})\n"
    small = {**{k: v for k, v in report.items() if k != "metrics"}, "metrics": metrics, "warnings": warnings,
             "plots": plots, "metric_registry": [m.__dict__ for m in METRICS]}
    atomic_write_bytes(run_dir / "report.json", json.dumps(jsonable(small), indent=2, ensure_ascii=False).encode())
    if any(per_tuple.values()):
        atomic_write_bytes(run_dir / "per_tuple.json", json.dumps(jsonable(per_tuple)).encode())
    atomic_write_bytes(run_dir / "report.md", md.encode())

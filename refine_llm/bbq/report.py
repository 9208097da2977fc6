"""BBQ's report sections: the Markdown tables and verdicts, and the plot (from a BBQ result alone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refine_llm.markdown import ci, fmt, table

__all__ = ["markdown_table", "markdown", "plot"]


def markdown_table(tables: dict[str, dict], prob: bool = False) -> list[str]:
    """Markdown rows: one per (condition, category). ``tables``: {condition: bbq_table(...)}."""
    rows = []
    for cond, tab in tables.items():
        for cat, row in tab.items():
            r = row["prob"] if prob else row
            c = r.get("ci", {})
            rows.append([cond, cat, f"{fmt(r['acc_ambig'], 3)}{ci(c.get('acc_ambig'), 3)}",
                         f"{fmt(r['acc_disambig'], 3)}{ci(c.get('acc_disambig'), 3)}",
                         f"{fmt(r['s_amb'], 1)}{ci(c.get('s_amb'))}", f"{fmt(r['s_dis'], 1)}{ci(c.get('s_dis'))}",
                         fmt(r["unknown_rate_ambig"], 3), f"{r['n_ambig']}+{r['n_disambig']}"])
    return table(["condition", "category", "acc ambig", "acc disambig", "s_AMB", "s_DIS", "unknown rate (ambig)", "n"],
                 rows)


def markdown(res: dict) -> str:
    """The BBQ section of a report (Markdown)."""
    lines = ["## BBQ (Parrish et al. 2022)", "",
             "Data: nyu-mll/BBQ, CC-BY-4.0. Accuracies in [0, 1]; s_AMB and s_DIS x100 (the authors' "
             "bias scores; 0 = unbiased, +100 = always the biased answer). 95% bootstrap CIs in brackets. "
             f"{res['n_items']} items ({', '.join(res['categories'])}).", ""]
    titles = {"cloze": "Cloze (answer slot; heads act here), argmax",
              "cloze_heldout": "Cloze on held-out templates (split by question_index), argmax",
              "lettered": "Lettered A/B/C, pooled over the 3 cyclic rotations, argmax"}
    for key, tab in res["tables"].items():
        lines += [f"### {titles.get(key, key)}", ""] + markdown_table(tab) + [""]
        if key.startswith("cloze"):
            lines += [f"Same, from the answer probabilities ({key}):", ""] + markdown_table(tab, prob=True) + [""]
    if "cloze_exact_items" in res:
        lines.append(f"Cloze: {res['cloze_exact_items']} items have answers sharing a first token (scored by whole "
                     f"continuation; heads leave them unchanged); mean answer mass {res['cloze_answer_mass']:.3f}.")
    if "lettered_rotations" in res:
        r = res["lettered_rotations"]
        lines.append(f"Lettered, mean over rotations: s_AMB {fmt(r['s_amb'], 1)} (spread {fmt(r['s_amb_spread'], 1)}), "
                     f"s_DIS {fmt(r['s_dis'], 1)} (spread {fmt(r['s_dis_spread'], 1)}), accuracy ambiguous "
                     f"{fmt(r['acc_ambig'], 3)} / disambiguated {fmt(r['acc_disambig'], 3)} "
                     f"(spreads {fmt(r['acc_ambig_spread'], 3)} / {fmt(r['acc_disambig_spread'], 3)}).")
    for key in ("verdict_cloze", "verdict_cloze_heldout"):
        for v in res.get(key, []):
            if v["condition"] == "uniform":
                continue
            lines.append(f"- {v['condition']} ({key.replace('verdict_', '')}, {v['category']}): s_AMB "
                         f"{v['s_amb_base']:.1f} -> {v['s_amb']:.1f}, disambiguated accuracy "
                         f"{v['acc_disambig_base']:.3f} -> {v['acc_disambig']:.3f} "
                         f"({v['acc_disambig_change_points']:+.1f} points): "
                         f"{'lowers |s_AMB| within 1 point of accuracy' if v['lowers_s_amb_within_1pt'] else 'does not lower |s_AMB| within 1 point of accuracy'}.")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str | Path) -> Path:
    """s_AMB and disambiguated accuracy per condition (cloze; the pooled or only category), with CIs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    which = next(k for k in ("cloze_heldout", "cloze", "lettered") if k in res["tables"])
    table = res["tables"][which]
    conds = list(table)
    cat = "all" if "all" in table[conds[0]] else next(iter(table[conds[0]]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in ((axes[0], "s_amb", "s_AMB (x100)"), (axes[1], "acc_disambig", "accuracy, disambiguated")):
        vals = [table[c][cat][key] or 0.0 for c in conds]
        cis = [table[c][cat]["ci"][key] for c in conds]
        err = np.array([[v - (ci["low"] if ci["low"] is not None else v) for v, ci in zip(vals, cis)],
                        [(ci["high"] if ci["high"] is not None else v) - v for v, ci in zip(vals, cis)]])
        ax.bar(range(len(conds)), vals, yerr=np.clip(err, 0, None), capsize=3)
        ax.set_xticks(range(len(conds)), conds, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.axhline(0, color="grey", lw=0.8)
    n = table[conds[0]][cat]["n_ambig"] + table[conds[0]][cat]["n_disambig"]
    n = n // 3 if which == "lettered" else n  # lettered rows are (item, rotation)
    what = {"cloze_heldout": "cloze, held-out templates", "cloze": "cloze", "lettered": "lettered"}[which]
    fig.suptitle(f"BBQ {what} ({cat}, {n} items), 95% bootstrap CIs")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


"""Stage 5, report: report.json, per_tuple.json, report.md and plots/*.png from the run's files alone
(``evaluation.json`` of each seed directory and the top level, with its BBQ and Seeds sections), through the
one Markdown writer (refine_llm.report, refine_llm.markdown)."""

from __future__ import annotations

from pathlib import Path

from refine_llm.config import RunConfig
from refine_llm.stages.common import EVALUATION, log, read_json, seed_dirs

__all__ = ["run"]


def run(cfg: RunConfig, out: Path) -> dict:
    """Render every evaluation of the run; returns the top level's report and logs its summary."""
    from refine_llm.report import summary_lines, write_report

    dirs = [d for _, d in seed_dirs(cfg, out)] if cfg.training_seeds is not None else []
    report = {}
    for d in dirs + [out]:
        report = read_json(d / EVALUATION, "the evaluate stage's record", f"refine-llm evaluate --out {out}")
        timing = report.get("timing") or {}
        report["timing"] = {**timing, "total": round(sum(v for k, v in timing.items() if k != "total"), 2)}
        write_report(d, report)
    for line in summary_lines(report):
        log(line)
    if report.get("seeds"):
        from refine_llm.seeds import summary_lines as seed_lines

        for line in seed_lines(report["seeds"]):
            log(line)
    log(f"report: {out / 'report.md'}")
    return report

"""The one Markdown writer: how a value prints in a table cell, and the table itself.

report.md (refine_llm.report, with its Seeds and BBQ sections), the BBQ command's tables (refine_llm.bbq)
and the methods table all print through ``table``; a "|" inside a cell (mean|C|) is escaped here, once.
"""

from __future__ import annotations

import math

__all__ = ["fmt", "table", "ci"]


def fmt(v, digits: int = 3) -> str:
    """A table cell: None (and NaN/inf) "–", booleans yes/no, ints as they are, floats to ``digits``."""
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.{digits}f}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def table(header: list, rows: list[list]) -> list[str]:
    """Markdown lines of a table: the header, its rule, one line per row (cells through ``fmt``)."""
    out = ["| " + " | ".join(fmt(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return out


def ci(interval: dict | None, digits: int = 1) -> str:
    """" [low, high]" of a {"low", "high"} interval, or "" when there is none."""
    if not interval or interval.get("low") is None:
        return ""
    return f" [{interval['low']:.{digits}f}, {interval['high']:.{digits}f}]"

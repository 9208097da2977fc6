"""The registry of reported numbers: name, symbol, direction and format, once.

The report, its Markdown tables, the console summary and the plots all read ``METRICS``; an unknown
name gets "Did you mean ...?" and the valid names (as lm-eval's metric registry does).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from refine_llm.errors import UserError

__all__ = ["MetricSpec", "METRICS", "BIAS_KEYS", "UTILITY_KEYS", "metric"]


@dataclass(frozen=True)
class MetricSpec:
    """One reported number: key in the result dicts, symbol in tables/plots, direction, format."""

    name: str
    symbol: str
    higher_is_better: bool | None  # None: a count or a diagnostic, no direction
    fmt: str = ".3f"
    help: str = ""

    def format(self, v) -> str:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return "–"
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, (int, np.integer)) and self.fmt == "d":
            return str(int(v))
        return format(v, self.fmt)


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("positional_error", "δ", False, help="positional error (UnQover)"),
    MetricSpec("attributive_error", "ε", False, help="attributive error (UnQover)"),
    MetricSpec("mu", "μ", False, help="bias intensity: mean over subjects of max over attributes |γ|"),
    MetricSpec("eta", "η", False, help="count-based bias: mean over subjects and attributes |mean sgn C|"),
    MetricSpec("mean_abs_c", "mean|C|", False, help="mean over tuples of |C|, C in [-1, 1]"),
    MetricSpec("gold_share", "P(gold) share", True, help="specified: mean P(gold)/(P(gold)+P(other))"),
    MetricSpec("gold_logloss", "log-loss", False, help="specified: mean -log P(gold)/(P(gold)+P(other))"),
    MetricSpec("specified_accuracy", "spec. acc.", True, help="specified: argmax of the two names = gold"),
    MetricSpec("kl_base", "KL(base‖·)", False, ".4f", help="specified: KL(base ‖ condition) of the top-k"),
    MetricSpec("tv_base", "TV", False, ".4f", help="specified: total variation to base of the top-k"),
    MetricSpec("kl_unrelated", "KL unrel.", False, ".4f", help="KL(base ‖ condition) on unrelated prompts"),
    MetricSpec("answer_mass", "answer mass", None, help="mean P(subj1)+P(subj2) over prompts"),
    MetricSpec("topk_miss_rate", "top-k miss", False, help="share of prompts with neither name in the top-k"),
    MetricSpec("n_tuples", "n tuples", None, "d"),
    MetricSpec("n_specified", "n spec.", None, "d"),
)
_BY_NAME = {m.name: m for m in METRICS}
# the bias and utility columns of the main tables, in order
BIAS_KEYS = ("positional_error", "attributive_error", "mu", "eta", "mean_abs_c")
UTILITY_KEYS = ("gold_share", "gold_logloss", "specified_accuracy", "kl_base", "tv_base")


def metric(name: str) -> MetricSpec:
    """The registry entry of ``name``; an unknown name gets the valid ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(name, list(_BY_NAME), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UserError(f"unknown metric {name!r}.{hint} Valid: {', '.join(_BY_NAME)}") from None


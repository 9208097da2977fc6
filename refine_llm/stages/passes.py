"""The extra scoring passes of the run's plug-in methods (``RunConfig.extra_methods``; ``Method.passes()``):
their question rows, scored by the score stage (through the one driver and cache, next to everything else),
read back by the evaluate stage as the ``own`` scores of ``Method.apply``.

A pass scores the test split. Its rows keep the questions' fields; ``prefix`` goes before each context and
the ids become ``<pass name>|<question id>`` (another prompt text, another cache row); an aligned pass
(``ScorePass.align``) also carries each row's base top-k ids (``base_topk_ids``), so its scores hold its
log-probs of the base's top-k on the same question and the method's KL is taken against them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from refine_llm.config import RunConfig
from refine_llm.scoring.plan import QUESTION_COLUMNS

__all__ = ["plugins", "pass_rows", "pass_scoring", "pass_columns", "score_passes", "read_passes"]


def plugins(cfg: RunConfig, run_dir: Path) -> dict:
    """{kind: Method} of the run's plug-in methods, built with ``Method.for_run``."""
    from refine_llm.methods import METHODS

    return {kind: METHODS[kind].for_run(cfg, run_dir) for kind in cfg.plugin_methods}


def pass_rows(sp, questions, base) -> dict[str, list]:
    """The pass's question rows (dict of columns) for the test split ``questions`` and its base ``Scores``."""
    rows = {c: list(questions[c]) for c in QUESTION_COLUMNS}
    if sp.prefix:
        rows["context"] = [sp.prefix + c for c in rows["context"]]
        rows["question_id"] = [f"{sp.name}|{q}" for q in rows["question_id"]]
    if sp.align:
        rows["base_topk_ids"] = [list(map(int, r)) for r in base.topk_ids]
    return rows


def pass_scoring(cfg: RunConfig, sp):
    return replace(cfg.scoring, align_to_base=sp.align)


def pass_columns(sp) -> tuple[str, ...]:
    return QUESTION_COLUMNS + (("base_topk_ids",) if sp.align else ())


def score_passes(cfg: RunConfig, out: Path, model, tokenizer, key: str, prompt_name: str, questions, base) -> None:
    """Score stage: every base-model pass of every plug-in method, on the test split."""
    from refine_llm import prompts, scoring

    for method in plugins(cfg, out).values():
        for sp in method.passes():
            if sp.model != "base":
                continue
            scoring.score(model, tokenizer, pass_rows(sp, questions, base), prompts.load_prompt(sp.prompt or prompt_name),
                          pass_scoring(cfg, sp), cache_dir=out / "scores", model_key=key, columns=pass_columns(sp))


def read_passes(cfg: RunConfig, out: Path, method, key: str, prompt_name: str, questions, base) -> dict:
    """Evaluate stage: {pass name: Scores} of a method's base-model passes, read from the cache (no model)."""
    from refine_llm import prompts
    from refine_llm.methods import Scores
    from refine_llm.scoring.driver import read_cached

    own = {}
    for sp in method.passes():
        if sp.model == "base":
            ds = read_cached(pass_rows(sp, questions, base), prompts.load_prompt(sp.prompt or prompt_name),
                             pass_scoring(cfg, sp), out / "scores", key, columns=pass_columns(sp))
            own[sp.name] = Scores.from_table(ds)
    return own

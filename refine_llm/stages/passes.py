"""The extra scoring passes of the run's plug-in methods (``RunConfig.extra_methods``; ``Method.passes()``):
their question rows, scored by the score stage (through the one driver and cache, next to everything else),
read back by the evaluate stage as the ``own`` scores of ``Method.apply``.

A pass scores the test split and the report's unrelated prompts (its KL there: what the method does to
prompts with nothing to debias). Its rows keep the questions' fields; ``prefix`` goes before each context and
the ids become ``<pass name>|<question id>`` (another prompt text, another cache row); an aligned pass
(``ScorePass.align``) also carries each row's base top-k ids (``base_topk_ids``), so its scores hold its
log-probs of the base's top-k on the same question and the method's KL is taken against them.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from refine_llm.config import RunConfig
from refine_llm.scoring.plan import QUESTION_COLUMNS
from refine_llm.stages.common import UNRELATED

__all__ = ["plugins", "concrete_passes", "pass_rows", "pass_scoring", "pass_columns", "score_passes", "read_passes",
           "score_hooked"]


def plugins(cfg: RunConfig, run_dir: Path) -> dict:
    """{kind: Method} of the run's plug-in methods (refine_llm.plugins), built with ``Method.for_run``."""
    from refine_llm.plugins import registry

    methods = registry()
    return {kind: methods[kind].for_run(cfg, run_dir) for kind in cfg.plugin_methods}


def concrete_passes(sp, questions, prompt_name: str, categories=()) -> list[tuple[str, object, np.ndarray]]:
    """What one ``ScorePass`` scores: [(pass name, PromptTemplate, row indices of ``questions``)]. A plain pass
    is one entry over every row; ``instruct`` swaps in the run's prompt with the instruction; ``bias_prefixes``
    expands into ``<name>#<i>`` per prefix i, one entry per category (its rows, its i-th prefix). The unrelated
    prompts have no category: they get every prefix of the run's ``categories``, as a Self-Debias served for
    those categories would apply them all."""
    from refine_llm import prompt_variants as V
    from refine_llm import prompts

    name = sp.prompt or prompt_name
    template = V.instruct_prompt(name)[0] if sp.instruct else prompts.load_prompt(name)
    n = len(questions["question_id"])
    if sp.bias_prefixes is None:
        return [(sp.name, template, np.arange(n))]
    cats = np.asarray(questions["category"], dtype=object)
    path = sp.bias_prefixes or None
    table = {c: [p for k in categories for p in V.prefixes_for(k, path)] if c == UNRELATED else V.prefixes_for(c, path)
             for c in dict.fromkeys(cats.tolist())}  # a question set is the test split or the unrelated prompts
    return [(f"{sp.name}#{i}", V.with_prefix(template, table[c][i]), np.flatnonzero(cats == c))
            for i in range(max((len(p) for p in table.values()), default=0)) for c in table if i < len(table[c])]


def pass_rows(sp, questions, base, idx: np.ndarray | None = None) -> dict[str, list]:
    """The pass's question rows (dict of columns) for the rows ``idx`` (default: all) of the test split
    ``questions`` and its base ``Scores``."""
    cols = {c: list(questions[c]) for c in QUESTION_COLUMNS}  # each column read once (a Dataset column is a copy)
    idx = np.arange(len(cols["question_id"])) if idx is None else idx
    rows = {c: [v[i] for i in idx] for c, v in cols.items()}
    if sp.prefix:
        rows["context"] = [sp.prefix + c for c in rows["context"]]
        rows["question_id"] = [f"{sp.name}|{q}" for q in rows["question_id"]]
    if sp.align:
        rows["base_topk_ids"] = [list(map(int, base.topk_ids[i])) for i in idx]
    return rows


def pass_scoring(cfg: RunConfig, sp):
    return replace(cfg.scoring, align_to_base=sp.align)


def pass_columns(sp) -> tuple[str, ...]:
    return QUESTION_COLUMNS + (("base_topk_ids",) if sp.align else ())


def score_passes(cfg: RunConfig, out: Path, model, tokenizer, key: str, prompt_name: str, questions, base) -> None:
    """Score stage: every base-model pass of every plug-in method, on ``questions`` (the test split or the
    unrelated prompts) with their base ``Scores``."""
    from refine_llm import scoring

    for method in plugins(cfg, out).values():
        for sp in method.passes():
            if sp.model != "base":
                continue
            for _, template, idx in concrete_passes(sp, questions, prompt_name, cfg.questions.categories):
                scoring.score(model, tokenizer, pass_rows(sp, questions, base, idx), template, pass_scoring(cfg, sp),
                              cache_dir=out / "scores", model_key=key, columns=pass_columns(sp))


def _placed(parts: list[tuple[np.ndarray, object]], n: int):
    """One Scores of ``n`` rows from (row indices, Scores) parts; rows no part covers: zeros, and -inf
    aligned log-probs (no evidence)."""
    from refine_llm.methods import Scores

    first = parts[0][1]

    def put(attr, fill):
        arrays = [getattr(sc, attr) for _, sc in parts]
        if any(a is None for a in arrays):
            return None
        full = np.full((n, *arrays[0].shape[1:]), fill, dtype=arrays[0].dtype)
        for (idx, _), a in zip(parts, arrays):
            full[idx] = a
        return full

    if len(parts) == 1 and len(first) == n:
        return first
    return Scores(put("topk_logprobs", 0), put("topk_ids", 0), put("cand_mask", False), put("cand_logprobs", 0),
                  put("collision", False), put("nonfinite", False), put("hidden", 0), put("aligned_logprobs", -np.inf))


def read_passes(cfg: RunConfig, out: Path, method, key: str, prompt_name: str, questions, base) -> dict:
    """Evaluate stage: {pass name: Scores} of a method's base-model passes, read from the cache (no model);
    a pass scored in parts (one per category) is put back together in the questions' order."""
    from refine_llm.methods import Scores
    from refine_llm.scoring.driver import read_cached

    parts: dict[str, list] = {}
    for sp in method.passes():
        if sp.model == "base":
            for name, template, idx in concrete_passes(sp, questions, prompt_name, cfg.questions.categories):
                ds = read_cached(pass_rows(sp, questions, base, idx), template, pass_scoring(cfg, sp), out / "scores",
                                 key, columns=pass_columns(sp))
                parts.setdefault(name, []).append((idx, Scores.from_table(ds)))
    n = len(questions["question_id"])
    return {name: _placed(p, n) for name, p in parts.items()}


def score_hooked(cfg: RunConfig, out: Path, method, model, tokenizer, key: str, prompt_name: str, questions,
                 base) -> dict:
    """Evaluate stage: {pass name: Scores} of a method's "hooked" passes: the test split scored with
    ``method.hooks(model)`` active, through the one driver and cache (key ``<key>-<kind>-<fingerprint>``),
    aligned to the base top-k ids like every other pass."""
    from refine_llm import prompts, scoring
    from refine_llm.methods import Scores

    got = {}
    for sp in method.passes():
        if sp.model != "hooked":
            continue
        template = prompts.load_prompt(sp.prompt or prompt_name)
        with method.hooks(model):
            ds = scoring.score(model, tokenizer, pass_rows(sp, questions, base), template, pass_scoring(cfg, sp),
                               cache_dir=out / "scores", model_key=f"{key}-{method.kind}-{method.fingerprint}",
                               columns=pass_columns(sp), progress=False)
        got[sp.name] = Scores.from_table(ds)
    return got

"""BBQ end to end: a model (and saved heads) on a sample of items, for the standalone command and the
main job's stages. Scoring, training and the tables are refine_llm.bbq.task's; this module wires them to a
loaded model, saved heads, a cache directory and the files a run keeps (``bbq/bbq.json``, ``plots/bbq.png``,
``heads/bbq/head``)."""

from __future__ import annotations

import time
from pathlib import Path

from refine_llm.config import ScoringConfig
from refine_llm.bbq.data import BBQItem, load_bbq, stratified_sample
from refine_llm.bbq.metrics import N_RESAMPLES
from refine_llm.bbq.task import conditions, evaluate_items, score_cloze, score_lettered, train_bbq_head

__all__ = ["N_RESAMPLES", "load_heads", "head_name", "items_of", "scoring_config", "score_all", "evaluate_model", "save_result"]


def load_heads(paths: dict[str, str], tokenizer, top_k: int, lm_head_weight=None) -> dict:
    """{name: head directory or hub id} -> {name: HeadMethod}, checked against this tokenizer and top-k
    (``lm_head_weight``: the model's output embedding, for a contextual head)."""
    from refine_llm.methods import HeadMethod
    from refine_llm.vocab import tokenizer_fingerprint

    fp = tokenizer_fingerprint(tokenizer)
    w = lm_head_weight
    return {name: HeadMethod.from_pretrained(p, name, expect_tokenizer_fingerprint=fp, expect_k=top_k, lm_head_weight=w)
            for name, p in paths.items()}


def head_name(path: str, taken: set) -> str:
    """A table column for a saved head: its directory name ("runs/x/heads/logit" -> "logit"; the main job's
    "heads/bbq/head" -> "bbq"), made unique."""
    p = Path(path)
    name = (p.parent.name if p.name == "head" and p.parent.name else p.name) or "head"
    name = f"head-{name}" if name in ("base", "uniform", "top2-equal", "bbq-trained") else name  # not a baseline's column
    out, n = name, 2
    while out in taken:
        out, n = f"{name}-{n}", n + 1
    taken.add(out)
    return out


def items_of(bbq_dir: str, max_items: int | None, seed: int) -> list[BBQItem]:
    """The items a run scores: ``max_items`` per category, stratified (seeded); None or 0 = all."""
    return stratified_sample(load_bbq(bbq_dir), max_items or None, seed=seed)


def scoring_config(top_k: int, batch_size: int, store_hidden: bool) -> ScoringConfig:
    """How BBQ prompts are scored: the run's top-k, BBQ's batch size, hidden states for contextual heads."""
    return ScoringConfig(top_k=top_k, batch_size=batch_size, store_hidden=store_hidden)


def score_all(model, tokenizer, items: list[BBQItem], mode: str, cfg: ScoringConfig, cache_dir=None,
              model_key: str | None = None, progress: bool = False, read_only: bool = False) -> dict:
    """{"cloze": Scores | None, "lettered": (3, n, 3) | None, "timing": {...}} for ``mode``."""
    out: dict = {"cloze": None, "lettered": None, "timing": {}}
    if mode in ("cloze", "both"):
        t = time.time()
        out["cloze"] = score_cloze(model, tokenizer, items, cfg, cache_dir, model_key, progress, read_only)
        out["timing"]["cloze_scoring"] = time.time() - t
    if mode in ("lettered", "both"):
        t = time.time()
        out["lettered"] = score_lettered(model, tokenizer, items, cfg, cache_dir, model_key, progress, read_only)
        out["timing"]["lettered_scoring"] = time.time() - t
    return out


def evaluate_model(model, tokenizer, items: list[BBQItem], heads: dict | None, mode: str, cfg: ScoringConfig,
                   train_head: bool, n_resamples: int, seed: int, cache_dir=None, model_key: str | None = None,
                   progress: bool = False) -> tuple[dict, object]:
    """Score, train the BBQ head when asked, and build the tables -> (result, the trained head or None)."""
    from refine_llm.methods import HeadMethod

    sc = score_all(model, tokenizer, items, mode, cfg, cache_dir, model_key, progress)
    trained = summary = None
    timing = dict(sc["timing"])
    if train_head and sc["cloze"] is not None:
        t = time.time()
        trained, summary = train_bbq_head(sc["cloze"], items, cfg.top_k, seed)
        timing["bbq_head_training"] = time.time() - t
    res = evaluate_items(items, sc["cloze"], sc["lettered"], conditions(heads),
                         HeadMethod(trained, "bbq-trained") if trained is not None else None, summary,
                         n_resamples=n_resamples, seed=seed)
    res["timing"] = {**timing, **res["timing"]}
    return res, trained


def save_result(res: dict, out_dir: str | Path, json_path: str | Path, md_path: str | Path | None = None) -> dict:
    """Write the plot (``out_dir/plots/bbq.png``), the result as JSON and, with ``md_path``, its Markdown."""
    from refine_llm.io import atomic_write_bytes, atomic_write_json, jsonable
    from refine_llm.bbq.report import markdown, plot

    out_dir = Path(out_dir)
    res["plot"] = str(plot(res, out_dir / "plots" / "bbq.png").relative_to(out_dir))
    atomic_write_json(json_path, jsonable(res))
    if md_path is not None:
        atomic_write_bytes(md_path, markdown(res).encode())
    return res

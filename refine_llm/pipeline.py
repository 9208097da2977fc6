"""The main job: its stages chained on one run directory, and nothing else (refine_llm.stages holds each one).

    questions -> score -> train -> evaluate -> report          (refine_llm.stages; STAGES)

``run(cfg)`` resolves the config once (``RunConfig.resolve``: derived values filled in), checks every input
before anything loads (refine_llm.preflight), writes ``config.json`` as resolved (``--config`` on it re-runs
exactly this run) and runs the stages in order, each on the files the previous one wrote; ``until`` stops
after one of them, so ``refine-llm questions|score|train|evaluate|report`` each run one stage. A re-run reuses
what is there: the questions, every cached score, every trained head and adapter.
"""

from __future__ import annotations

import time

from refine_llm.config import RunConfig
from refine_llm.errors import UserError
from refine_llm.stages import STAGES
from refine_llm.stages.common import check_schema, log, run_dir_for

__all__ = ["STAGES", "run", "run_dir_for", "resolve"]


def resolve(cfg: RunConfig) -> RunConfig:
    """``cfg.resolve`` for the device the run uses (cuda if it is there and asked, else cpu); one line on a
    combination it refuses."""
    from refine_llm import models

    device = "cuda" if str(cfg.model.device or models.default_device()).startswith("cuda") else "cpu"
    try:
        return cfg.resolve(device)
    except ValueError as e:
        raise UserError(str(e)) from None


def run(cfg: RunConfig, loaded=None, *, until: str = "report", info_only: bool = False, first: str = "questions") -> int:
    """The main job for ``cfg``, stages ``first`` through ``until`` (of STAGES). ``loaded``: an already loaded
    (model, tokenizer) to reuse (tests pass their session fixture; it must match the model and quant).
    ``info_only``: load the model, log its summary and stop."""
    from refine_llm.io import atomic_write_json, check_writable
    from refine_llm.preflight import check_run
    from refine_llm.progress import quiet_library_bars
    from refine_llm.stages import evaluate, questions, report, score, train

    quiet_library_bars()  # a log (stderr not a TTY) gets no per-shard bars of datasets / the hub
    if until not in STAGES or first not in STAGES:
        raise ValueError(f"until={until!r} and first={first!r} must be stages: {STAGES}")
    cfg = resolve(cfg)
    out = run_dir_for(cfg)
    check_schema(out)
    check_run(cfg)  # model path / .gguf, word lists, prompt file, --bbq: one line before anything loads
    check_writable(out)
    if cfg.scoring.backend == "vllm" and cfg.head_variants:
        log("--backend vllm: skipping the contextual and slot heads (they train on hidden states; use --backend hf)")
    atomic_write_json(out / "config.json", cfg.to_dict())
    todo = STAGES[STAGES.index(first): STAGES.index(until) + 1]

    t = time.time()
    qs = questions.run(cfg.questions, out)
    log(f"questions: {len(qs)} rows ({', '.join(cfg.questions.categories)}) -> {out / 'questions'} "
        f"({time.time() - t:.1f} s)")
    if "score" in todo:
        score.run(cfg, out, qs, loaded, info_only=info_only)
        if info_only:
            return 0
    if "train" in todo:
        train.run(cfg, out, qs, loaded)
    if "evaluate" in todo:
        evaluate.run(cfg, out, qs, loaded)
    if "report" in todo:
        report.run(cfg, out)
    return 0

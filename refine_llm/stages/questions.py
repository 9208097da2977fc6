"""Stage 1, questions: the question set of the run's QuestionsConfig into ``questions/`` (reused when the
config matches)."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from refine_llm.config import QuestionsConfig
from refine_llm.stages.common import config_hash

__all__ = ["run"]


def run(qcfg: QuestionsConfig, out: Path):
    """The questions Dataset, built once and saved atomically (``questions/.refine_llm_config`` holds the hash
    of the config that built it)."""
    from refine_llm import questions as Q

    qdir = out / "questions"
    key = config_hash(asdict(qcfg))
    stamp = qdir / ".refine_llm_config"
    if stamp.is_file() and stamp.read_text() == key:
        return Q.load_questions(qdir)
    ds = Q.build_questions(qcfg)
    Q.save_questions(ds, qdir)
    stamp.write_text(key)
    return ds

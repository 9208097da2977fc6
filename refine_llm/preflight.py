"""Check the main job's inputs before anything is written or loaded.

`check_run(...)` runs at the start of `pipeline.run`, after the config dataclasses have checked their
own values. A mistake in a model path, a .gguf file, a word list, a prompt file, a --bbq directory or a
LoRA setting is reported in one line (UserError, exit 2) in about a second, instead of after minutes of
model loading and scoring. The run directory is not created for a run that fails here.
"""

from __future__ import annotations

import json
from pathlib import Path

from refine_llm.errors import UserError


def check_model(name: str) -> None:
    """The model resolves, a .gguf file is whole, a model directory has a readable config.json."""
    from refine_llm import models

    source = models.resolve(name)
    if source.kind == "hub" and not Path(source.location).exists():
        models.ensure_hub_reachable(source.location, name)  # cached, or the hub answers (5 s at most)
    if source.kind == "gguf":
        models.check_gguf(source.location)
    elif source.kind == "dir":
        cfg = Path(source.location) / "config.json"
        try:
            json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise UserError(f"--model {name}: {cfg} is not valid JSON ({' '.join(str(e).split())[:120]}); "
                            "re-save the model with save_pretrained") from None


def check_wordlists(category: str, wordlists: str | None) -> None:
    """Every word list of the run's categories parses (file and line named on a mistake)."""
    if wordlists is None:
        return
    from refine_llm import questions as Q
    from refine_llm.config import CATEGORIES

    for c in CATEGORIES if category == "all" else (category,):
        Q.load_wordlists(c, wordlists)


def check_prompt(prompt: str) -> None:
    if prompt != "auto":
        from refine_llm.prompts import load_prompt

        load_prompt(prompt)


def check_run(cfg) -> None:
    """All of the above for the main job's `RunConfig` (its dataclasses have already checked their values)."""
    if cfg.scoring.backend == "vllm":  # nf4/int8: refused in one line, never reported as what did not run
        from refine_llm.scoring.backends.vllm import vllm_dtype

        vllm_dtype(cfg.model.quant)
    check_model(cfg.model.name)
    check_wordlists(cfg.questions.category, cfg.questions.wordlists)
    check_prompt(cfg.scoring.prompt)
    if cfg.plugin_methods:
        import difflib

        from refine_llm.methods import METHODS

        for m in cfg.plugin_methods:
            if m not in METHODS:
                near = difflib.get_close_matches(m, list(METHODS), n=1)
                hint = f" Did you mean {near[0]!r}?" if near else ""
                raise UserError(f"--extra-methods {m}: not a method of refine_llm.methods.METHODS.{hint} "
                                f"Known: {', '.join(METHODS)}")
    if cfg.bbq.bbq_dir:
        from refine_llm.bbq.data import bbq_files

        bbq_files(cfg.bbq.bbq_dir)  # --bbq: the BBQ stage runs last, so a wrong path would cost the whole job

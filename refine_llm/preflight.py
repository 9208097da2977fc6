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


def check_model(name: str, trust_remote_code: bool = False) -> None:
    """The model resolves, a .gguf file is whole, a model directory (or a cached hub model) has a readable
    config.json whose architecture transformers knows (or --trust-remote-code is given)."""
    from refine_llm import models

    source = models.resolve(name)
    cfg = None
    if source.kind == "hub" and not Path(source.location).exists():
        models.ensure_hub_reachable(source.location, name)  # cached, or the hub answers (5 s at most)
        from huggingface_hub import try_to_load_from_cache

        try:
            cached = try_to_load_from_cache(source.location, "config.json")
        except Exception:  # a malformed id: the hub's own error names it later
            cached = None
        cfg = Path(cached) if isinstance(cached, str) else None
    if source.kind == "gguf":
        models.check_gguf(source.location)
    elif source.kind == "dir":
        cfg = Path(source.location) / "config.json"
    if cfg is None:
        return
    try:
        config = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"--model {name}: {cfg} is not valid JSON ({' '.join(str(e).split())[:120]}); "
                        "re-save the model with save_pretrained") from None
    if not isinstance(config, dict):
        raise UserError(f"--model {name}: {cfg} is not a JSON object; re-save the model with save_pretrained")
    if not trust_remote_code:
        check_remote_code(name, cfg, config)


def check_remote_code(name: str, path: Path, config: dict) -> None:
    """A config.json that needs code transformers does not have (an ``auto_map`` to the checkpoint's own code
    without a ``model_type`` transformers knows, or an unknown ``model_type``) is refused in one line naming
    --trust-remote-code, instead of transformers' traceback after the tokenizer loads. A known model_type with
    an auto_map loads transformers' own class (as transformers does without trust_remote_code)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING:
        return
    if "auto_map" in config:
        code = ", ".join(sorted(config["auto_map"])) if isinstance(config["auto_map"], dict) else "auto_map"
        raise UserError(f"--model {name}: {path} needs the model's own code ({code}); pass --trust-remote-code "
                        "if you trust it (it runs on this machine)")
    if model_type is not None:  # none: transformers guesses the architecture from the path
        import transformers

        raise UserError(f"--model {name}: {path}: model_type {model_type!r} is unknown to transformers "
                        f"{transformers.__version__} and the model ships no code (no auto_map); upgrade transformers "
                        "(--trust-remote-code only helps a model that ships its code)")


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
    check_model(cfg.model.name, cfg.model.trust_remote_code)
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
        check_bbq(cfg.bbq.bbq_dir)


def check_bbq(path: str) -> None:
    """--bbq: every line of every .jsonl parses as a BBQ item (fields, types, labels), the file and line named
    on a mistake. The BBQ stage runs last, so a bad line would otherwise cost the whole job (all of the
    release's 58k items read in about a second)."""
    from refine_llm.bbq.data import bbq_files, read_jsonl

    for f in bbq_files(path):
        if not read_jsonl(f):
            raise UserError(f"--bbq {path}: {f} holds no items: remove it or pass the data/ directory of nyu-mll/BBQ")

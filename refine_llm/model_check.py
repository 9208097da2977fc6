"""The one home of "can this model be loaded as asked?", checked before any weights load: the name resolves, a
.gguf file is whole, a model directory's config.json parses, and a model that needs its own code is named with
--trust-remote-code. The main job's preflight, ``refine-llm score --questions``, ``refine-llm serve`` and the BBQ
command all call ``check_model``, so each says the same one line."""

from __future__ import annotations

import json
from pathlib import Path

from refine_llm.errors import UserError

__all__ = ["check_model", "check_remote_code"]


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

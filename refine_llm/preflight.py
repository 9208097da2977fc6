"""Check the main job's inputs before anything is written or loaded.

`check_run(...)` runs at the start of `pipeline.run`, after the config dataclasses have checked their
own values. A mistake in a model path, a .gguf file, a word list, a prompt file, a --bbq directory or a
LoRA setting is reported in one line (UserError, exit 2) in about a second, instead of after minutes of
model loading and scoring. The run directory is not created for a run that fails here.
"""

from __future__ import annotations


from refine_llm.errors import UserError
from refine_llm.model_check import check_model


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
        check_plugins(cfg)
    if cfg.bbq.bbq_dir:
        check_bbq(cfg.bbq.bbq_dir)


def check_plugins(cfg) -> None:
    """--extra-methods: each a plug-in of refine_llm.plugins (a method with ``for_run``); one that runs inside
    the HF model (a "hooked" pass: steer) refused with another backend."""
    import difflib

    from refine_llm.methods import Method
    from refine_llm.plugins import registry

    known = {k: c for k, c in registry().items() if c.for_run.__func__ is not Method.for_run.__func__}
    for m in cfg.plugin_methods:
        if m not in known:
            near = difflib.get_close_matches(m, list(known), n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise UserError(f"--extra-methods {m}: not a plug-in method.{hint} Known: {', '.join(known)}")
        hooked = any(sp.model == "hooked" for sp in known[m].for_run(cfg, ".").passes())
        if hooked and cfg.scoring.backend != "hf":
            raise UserError(f"--extra-methods {m}: it runs inside the HF model (forward hooks): use --backend hf, "
                            f"not {cfg.scoring.backend}")


def check_bbq(path: str) -> None:
    """--bbq: every line of every .jsonl parses as a BBQ item (fields, types, labels), the file and line named
    on a mistake. The BBQ stage runs last, so a bad line would otherwise cost the whole job (all of the
    release's 58k items read in about a second)."""
    from refine_llm.bbq.data import bbq_files, read_jsonl

    for f in bbq_files(path):
        if not read_jsonl(f):
            raise UserError(f"--bbq {path}: {f} holds no items: remove it or pass the data/ directory of nyu-mll/BBQ")

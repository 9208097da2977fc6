"""The choices (Literal types and the tuples derived from them), the constants every stage shares, and the
checks every config's ``__post_init__`` runs. Imports nothing of ours."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

__all__ = ["Category", "Quant", "TESTBED_NAME", "TESTBED_QUANT", "QUANT_CHOICES", "Backend", "Method", "HeadVariant",
           "HeadObjective", "LoraObjective", "ScoringMode", "CATEGORIES", "QUANTS", "BACKENDS", "METHODS",
           "HEAD_VARIANTS", "OBJECTIVES", "LORA_OBJECTIVES", "CONTEXT_VARIANTS", "SERVING_MODES",
           "RENAMED_OBJECTIVES", "AUTO_SCORING_BATCH_SIZE", "SCHEMA_VERSION", "NULL_RESAMPLES", "BOOT_RESAMPLES",
           "BBQ_RESAMPLES", "BBQ_MAX_BATCH_SIZE", "FLUSH_ROWS", "MERGE_FILE_ROWS", "DEFAULT_CPU_KV_CACHE_GIB",
           "TESTBED_VERSION", "check_choice", "check_literals", "check_positive", "parse_seeds"]

# Choices are typed as Literal; the tuples below are derived from them (one home per list).
Category = Literal["gender", "nationality", "ethnicity", "religion"]
Quant = Literal["nf4", "int8", "bf16", "fp32"]
TESTBED_NAME = "testbed"  # the alias of refine_llm.models (TESTBED_ALIAS) for the testbed model
# The testbed runs in fp32: its LoRA fine-tune is small enough that NF4 erases it (refine_llm.testbed).
TESTBED_QUANT = "fp32"
QUANT_CHOICES = ("auto", *get_args(Quant))  # what --quant accepts; "auto" is resolved by ModelConfig
Backend = Literal["hf", "vllm", "ray"]
Method = Literal["none", "refine", "lora-reward", "lora-cda", "all"]
HeadVariant = Literal["logit", "paper", "contextual", "slot", "gate", "uniform", "identity", "rank-bias"]  # methods.heads.HEADS
HeadObjective = Literal["reinforce", "direct", "paper"]
LoraObjective = Literal["reinforce", "direct"]
ScoringMode = Literal["first-token", "exact"]

CATEGORIES = get_args(Category)
QUANTS = get_args(Quant)
BACKENDS = get_args(Backend)
METHODS = get_args(Method)
HEAD_VARIANTS = get_args(HeadVariant)
OBJECTIVES = get_args(HeadObjective)
LORA_OBJECTIVES = get_args(LoraObjective)
CONTEXT_VARIANTS = ("contextual", "slot", "gate")  # heads built from the LLM's output embedding; trained on cached hidden states (slot: ignores them)
SERVING_MODES = ("first", "gated", "all")
# Objective names before the rename (heads: expected; LoRA: bandit): refused with the new name.
RENAMED_OBJECTIVES = {"expected": "direct", "bandit": "reinforce"}
# Scoring batch size when ScoringConfig.batch_size is None: 4-bit weights are dequantised once per
# forward pass on CPU, so larger batches amortise it; on GPU memory is the limit.
AUTO_SCORING_BATCH_SIZE = {"cpu": 128, "cuda": 32}
# config.json of a run: bumped whenever a field changes meaning, so that an old run is refused, not misread.
SCHEMA_VERSION = 2
# Statistics: draws of the sign-flip null (per condition and category), of the cluster bootstrap (per
# comparison) and of BBQ's item bootstrap.
NULL_RESAMPLES = 1000
BOOT_RESAMPLES = 1000
BBQ_RESAMPLES = 1000
BBQ_MAX_BATCH_SIZE = 32  # BBQ prompts (few-shot + context + options) are long: the main job caps its batches here
FLUSH_ROWS = 512  # rows per score-cache file written while scoring (what a killed driver can lose)
MERGE_FILE_ROWS = 65536  # rows per score-cache file written by merge
DEFAULT_CPU_KV_CACHE_GIB = 2.0  # vLLM on CPU: holds ~45k tokens of SmolLM2-135M, ~16k of a 7B GQA model in bf16
TESTBED_VERSION = 1  # bump when the testbed recipe's meaning changes: old builds are then ignored


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def check_literals(obj: Any) -> None:
    """Every Literal-typed field of dataclass ``obj`` holds one of its choices (old objective names get the new)."""
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        t = hints[f.name]
        if get_origin(t) is Literal:
            value = getattr(obj, f.name)
            if value in RENAMED_OBJECTIVES and RENAMED_OBJECTIVES[value] in get_args(t):
                raise ValueError(f"{f.name}={value!r} was renamed: use {RENAMED_OBJECTIVES[value]!r} "
                                 f"(choices: {', '.join(get_args(t))})")
            check_choice(f.name, value, get_args(t))


def check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def parse_seeds(value: Any) -> str:
    """"0, 1,2" (or a list of ints, from a YAML file) -> "0,1,2"; distinct non-negative integers."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        seeds = [int(str(s).strip()) for s in items]
    except ValueError:
        raise ValueError(f"seeds={value!r} (--seeds): pass distinct non-negative integers separated by commas, "
                         "e.g. 0,1,2") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={value!r} (--seeds): pass distinct non-negative integers separated by commas, "
                         "e.g. 0,1,2")
    return ",".join(str(s) for s in seeds)


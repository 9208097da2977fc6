"""The choices (Literal types and the tuples derived from them), the constants every stage shares, and the
checks every config's ``__post_init__`` runs. Imports nothing of ours."""

from __future__ import annotations

import re
from dataclasses import fields
from typing import Any, Literal, get_args, get_origin, get_type_hints

__all__ = ["Category", "Quant", "TESTBED_NAME", "TESTBED_QUANT", "QUANT_CHOICES", "Backend", "Method", "HeadVariant",
           "HeadObjective", "LoraObjective", "ScoringMode", "CATEGORIES", "QUANTS", "BACKENDS", "METHODS", "ALL_PLUGINS",
           "HEAD_VARIANTS", "OBJECTIVES", "LORA_OBJECTIVES", "CONTEXT_VARIANTS", "SERVING_MODES",
           "RENAMED_OBJECTIVES", "AUTO_SCORING_BATCH_SIZE", "SCHEMA_VERSION", "NULL_RESAMPLES", "BOOT_RESAMPLES",
           "BBQ_RESAMPLES", "BBQ_MAX_BATCH_SIZE", "FLUSH_ROWS", "MERGE_FILE_ROWS", "DEFAULT_CPU_KV_CACHE_GIB",
           "TESTBED_VERSION", "DEFAULT_MODEL", "cpu_native_bf16", "resolve_quant", "check_choice", "check_literals", "check_positive", "parse_seeds",
           "parse_shard"]

# Choices are typed as Literal; the tuples below are derived from them (one home per list).
Category = Literal["gender", "nationality", "ethnicity", "religion"]
Quant = Literal["nf4", "int8", "bf16", "fp32"]
TESTBED_NAME = "testbed"  # the alias of refine_llm.models (TESTBED_ALIAS) for the testbed model
# The testbed runs in fp32: its LoRA fine-tune is small enough that NF4 erases it (refine_llm.testbed).
TESTBED_QUANT = "fp32"
QUANT_CHOICES = ("auto", *get_args(Quant))  # what --quant accepts; "auto" is resolved by resolve_quant
# The embedded default (refine_llm.models.QWEN_ALIAS): a competent instruct LLM fetched from PyPI parts.
DEFAULT_MODEL = "qwen2.5-coder-1.5b-instruct"


def cpu_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). Without either (e.g. an AVX2-only AMD
    EPYC), torch emulates bf16 matmuls: the 1.5B default scored 6 tokens/s in bf16 and 41 in fp32 on 2 such
    cores. Not Linux (no /proc/cpuinfo): assume native."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.partition(":")[2].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return True


def resolve_quant(quant: str, model: str, device: str, native_bf16: bool | None = None) -> str:
    """``--quant auto`` -> what runs: fp32 for the testbed (the precision it is built and judged in); on CUDA
    nf4 (the paper's setting); on CPU bf16 (bitsandbytes NF4 costs 5-7 s per forward of the 1.5B default on
    2 cores, bf16 with the prefix cache scores many prompts per second), or fp32 where the CPU has no native
    bf16 (``cpu_native_bf16``; ``native_bf16`` overrides the check). Any other value is kept."""
    if quant != "auto":
        return quant
    if model == TESTBED_NAME:
        return TESTBED_QUANT
    if str(device).startswith("cuda"):
        return "nf4"
    return "bf16" if (cpu_native_bf16() if native_bf16 is None else native_bf16) else "fp32"


Backend = Literal["hf", "vllm", "ray"]
Method = Literal["none", "refine", "lora-reward", "lora-cda", "all"]
ALL_PLUGINS = ("prompt-instruct", "self-debias", "steer")  # the plug-ins --method all adds (refine_llm.plugins)
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



def parse_shard(text: str) -> tuple[int, int]:
    """"i/n" (``--shard``) -> (i, n) with 0 <= i < n: the i-th (from 0) of n shards."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text or ""))
    if not m:
        raise ValueError(f"--shard {text}: expected I/N with 0 <= I < N (e.g. --shard 0/4 is the first of 4)")
    i, n = int(m[1]), int(m[2])
    if n < 1 or i >= n:
        raise ValueError(f"--shard {text}: shard {i} is out of range for {n} shard(s): I runs from 0 to N-1 "
                         f"(e.g. --shard 0/4 is the first of 4)")
    return i, n

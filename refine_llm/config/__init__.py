"""Dataclass configs for every stage of refine_llm, with help text in field metadata.

This package imports nothing of ours (see docs/architecture.md), so scripts can build argument parsers from it
and every other module can take a config without pulling in torch-heavy code. Modules: ``choices`` (the
Literal choices, shared constants, the checks), ``run`` (the main job's stage configs and RunConfig),
``commands`` (the testbed recipe and every other command's dataclass); import them from here.
Each ``__post_init__`` normalises values and rejects bad combinations with a message that names the
field and says what to do; those ValueErrors become one-line CLI errors (exit code 2).
"""

from __future__ import annotations

from refine_llm.config.choices import (Category, Quant, TESTBED_NAME, TESTBED_QUANT, QUANT_CHOICES, Backend, Method,
    HeadVariant, HeadObjective, LoraObjective, ScoringMode, CATEGORIES, QUANTS, BACKENDS, METHODS, HEAD_VARIANTS,
    OBJECTIVES, LORA_OBJECTIVES, CONTEXT_VARIANTS, SERVING_MODES, RENAMED_OBJECTIVES, AUTO_SCORING_BATCH_SIZE,
    SCHEMA_VERSION, NULL_RESAMPLES, BOOT_RESAMPLES, BBQ_RESAMPLES, BBQ_MAX_BATCH_SIZE, FLUSH_ROWS, MERGE_FILE_ROWS,
    DEFAULT_CPU_KV_CACHE_GIB, TESTBED_VERSION, DEFAULT_MODEL, cpu_native_bf16, resolve_quant, check_choice, check_literals, check_positive, parse_seeds,
    parse_shard)
from refine_llm.config.run import (ModelConfig, QuestionsConfig, ScoringConfig, HeadConfig, BanditConfig, LoraConfig,
    BBQConfig, RunConfig, load_config_file, help_of)
from refine_llm.config.commands import (TestbedRecipe, EvalSpec, QuestionsArgs, RayConfig, ScoreArgs, MergeArgs,
    CacheMetricsArgs, BBQPredictionsArgs, BBQEvaluateArgs, ServeArgs, MakeTestbedArgs, FetchArgs)

__all__ = ["Category", "Quant", "TESTBED_NAME", "TESTBED_QUANT", "QUANT_CHOICES", "Backend", "Method", "HeadVariant",
           "HeadObjective", "LoraObjective", "ScoringMode", "CATEGORIES", "QUANTS", "BACKENDS", "METHODS",
           "HEAD_VARIANTS", "OBJECTIVES", "LORA_OBJECTIVES", "CONTEXT_VARIANTS", "SERVING_MODES",
           "RENAMED_OBJECTIVES", "AUTO_SCORING_BATCH_SIZE", "SCHEMA_VERSION", "NULL_RESAMPLES", "BOOT_RESAMPLES",
           "BBQ_RESAMPLES", "BBQ_MAX_BATCH_SIZE", "FLUSH_ROWS", "MERGE_FILE_ROWS", "DEFAULT_CPU_KV_CACHE_GIB",
           "TESTBED_VERSION", "DEFAULT_MODEL", "cpu_native_bf16", "resolve_quant", "check_choice", "check_literals", "check_positive", "parse_seeds", "parse_shard",
           "ModelConfig",
           "QuestionsConfig", "ScoringConfig", "HeadConfig", "BanditConfig", "LoraConfig", "BBQConfig", "RunConfig",
           "load_config_file", "help_of", "TestbedRecipe", "EvalSpec", "QuestionsArgs", "RayConfig", "ScoreArgs",
           "MergeArgs", "CacheMetricsArgs", "BBQPredictionsArgs", "BBQEvaluateArgs", "ServeArgs", "MakeTestbedArgs",
           "FetchArgs"]

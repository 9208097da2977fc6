"""The measuring instrument: questions -> prompts -> one forward pass each -> a cache of top-k scores.

The LLM is frozen, so it runs once per unique prompt and everything downstream (metrics, head training,
evaluation of every method) reads the cached scores. Never calls generate. One engine, four parts:

    plan.py      the fixed batches (``batch_ranges``, the one definition), shards, and each prompt's tokens
                 and candidates (``prompt_plan``)
    cache.py     the cache: schema, files, the manifest of a sharded run, merge
    backends/    hf.py, vllm.py: ``score_batch(rows) -> table``, the same small call; ray.py: a pool of
                 actors that each hold one of them
    driver.py    ``score`` / ``fill_cache``: the one loop that fills a cache, for the main job, ``score --shard``,
                 Ray, the unrelated prompts, BBQ and every method's extra pass
    jobs.py      the commands: ``score``, ``merge``, ``evaluate`` (``python -m refine_llm.scoring``)

Per prompt (docs/CONTRACTS.md, "Scores"): ``topk_ids``, ``topk_logprobs`` (full-vocabulary log-softmax),
``cand_logprobs`` and ``cand_mask`` per candidate, ``nonfinite``, ``collision``, optional ``hidden``.
"""

from __future__ import annotations

from refine_llm.scoring.cache import SCORE_COLUMNS, cache_path
from refine_llm.scoring.driver import default_model_key, score, score_stats
from refine_llm.scoring.plan import Shard, batch_ranges, cand_mask_of, continuation_ids, prompt_plan
from refine_llm.vocab import candidate_token_ids

__all__ = ["score", "batch_ranges", "Shard", "cand_mask_of", "continuation_ids", "prompt_plan", "candidate_token_ids",
           "score_stats", "default_model_key", "cache_path", "SCORE_COLUMNS"]

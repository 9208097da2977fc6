"""Questions -> prompts -> one forward pass each -> top-k ids/log-probs and candidate probabilities.

This is the measuring instrument of refine_llm: the LLM is frozen, so it runs once per unique prompt
and everything downstream (metrics, head training) reads the cached scores. Never calls generate.

Per prompt (docs/CONTRACTS.md, "Scores"): ``topk_ids`` (k,), ``topk_logprobs`` (k,) full-vocabulary
log-softmax, ``cand_logprobs`` (2,) log P(subj1), log P(subj2), ``cand_mask`` (2, k) which top-k
positions are a first token of subj1 / subj2, ``nonfinite``, optional ``hidden`` (d,) fp16 (the final
post-norm hidden state at the answer position, so that ``logits = lm_head(hidden)``), plus
``collision`` (bool: the two subjects share a first token, so their probabilities were computed
from their whole continuations, as in exact mode).

Candidates. A subject maps to the first token of each surface form (with and without a leading
space, as written and capitalised), each tokenized after a newline anchor so that SentencePiece's
dummy prefix and BPE merges behave as they do inside a prompt; ids are deduplicated. With
``cfg.pronouns`` a gender subject also gets he/she. ``cand_logprobs`` is the log-sum-exp of those
ids under the full distribution (first-token mode), or the sum of the log-probs of the tokens of
the subject's continuation (exact mode: " " + subject, or subject alone when the prompt already ends
in whitespace), log-sum-exp'd with the pronoun tokens when they are credited.

Speed. Prompts are tokenized whole, sorted by length and batched. The few-shot prefix is the same in
every prompt: its KV cache is computed once; each batch uses as prefix the longest token prefix
that all its prompts share with the tokenized prefix string (checked, since tokenization at the
boundary may differ), copies the cache to the batch, and feeds the right-padded suffixes with
explicit position ids; each row's answer position is gathered and only those hidden states go
through lm_head. Without the prefix cache, whole prompts are left-padded with position ids that
start at each row's first real token, so both paths compute the same thing (tests check it).

Cache. Results are Arrow IPC shards under ``cache_dir/<model_key>/<prompt fp>-k<k>-<mode>-...``,
written atomically as scoring goes, so a re-run scores nothing twice and an interrupted run resumes.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from refine_llm.config import ScoringConfig
from refine_llm.errors import UserError
from refine_llm.prompts import PromptTemplate

__all__ = [
    "score",
    "candidate_token_ids",
    "candidate_probs",
    "score_stats",
    "default_model_key",
    "sweep_prompts",
    "SCORE_COLUMNS",
]

log = logging.getLogger(__name__)

# Bump when the way candidates or scores are computed changes: old caches are then ignored.
SCORING_VERSION = 1
SCORE_COLUMNS = ("question_id", "topk_ids", "topk_logprobs", "cand_logprobs", "cand_mask", "nonfinite", "collision")
PRONOUNS = {"female": "she", "male": "he"}
_ANCHOR = "\n"


# ----------------------------------------------------------------------------- candidates


def _first_token_in_context(tokenizer, form: str) -> int | None:
    """First token of ``form`` as it is tokenized after a newline (the way it appears in a prompt)."""
    anchor = tokenizer.encode(_ANCHOR, add_special_tokens=False)
    ids = tokenizer.encode(_ANCHOR + form, add_special_tokens=False)
    if ids[: len(anchor)] == anchor and len(ids) > len(anchor):
        return ids[len(anchor)]
    ids = tokenizer.encode(form, add_special_tokens=False)  # the anchor merged: take the form alone
    return ids[0] if ids else None


def _surface_forms(word: str) -> list[str]:
    cap = word[:1].upper() + word[1:]
    return list(dict.fromkeys([word, " " + word, cap, " " + cap]))


def _ids_of_forms(tokenizer, word: str) -> list[int]:
    out = []
    for form in _surface_forms(word):
        t = _first_token_in_context(tokenizer, form)
        # A token that decodes to whitespace alone (SentencePiece's bare "▁") would credit any word.
        if t is not None and tokenizer.decode([t]).strip():
            out.append(t)
    return list(dict.fromkeys(out))


def candidate_token_ids(tokenizer, subject: str, pronouns_for: str | None = None) -> list[int]:
    """Unique first-token ids of ``subject``'s surface forms (" Mary", "Mary", capitalised), plus
    she/he when ``pronouns_for`` is "female"/"male" (the subject's group)."""
    ids = _ids_of_forms(tokenizer, subject)
    if pronouns_for in PRONOUNS:
        ids += [t for t in _ids_of_forms(tokenizer, PRONOUNS[pronouns_for]) if t not in ids]
    return ids


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
    """(p_topk (M, 2), p_full (M, 2), cand_in_topk (M,) bool) from a scores dataset.

    p_topk: the candidate's probability under the top-k renormalised distribution (the paper's
    convention: sum over cand_mask of softmax(topk_logprobs)). p_full = exp(cand_logprobs).
    cand_in_topk: at least one candidate has a token in the top-k.
    """
    lp = np.asarray(scores["topk_logprobs"], dtype=np.float64)  # (M, k)
    mask = np.asarray(scores["cand_mask"], dtype=bool)  # (M, 2, k)
    lp = lp - lp.max(axis=1, keepdims=True)
    q = np.exp(lp)
    q /= q.sum(axis=1, keepdims=True)
    p_topk = np.einsum("mk,msk->ms", q, mask.astype(np.float64))
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
    """Batched forward passes that return final hidden states at chosen positions, with an optional
    shared-prefix KV cache."""

    def __init__(self, model, tokenizer, prefix_ids: list[int] | None):
        import torch

        self.torch = torch
        self.model = model
        self.backbone = model.base_model
        self.lm_head = model.get_output_embeddings()
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self.prefix_ids = prefix_ids or []
        self.prefix_kv = None
        window = getattr(model.config, "sliding_window", None)
        if self.prefix_ids and window and len(self.prefix_ids) >= window:
            self.prefix_ids = []  # a sliding-window layer would drop part of the prefix
        if self.prefix_ids:
            with torch.inference_mode():
                ids = torch.tensor([self.prefix_ids], device=self.device)
                out = self.backbone(input_ids=ids, use_cache=True)
            layers = getattr(out.past_key_values, "layers", None)
            if layers is None or not all(hasattr(la, "keys") and la.keys is not None for la in layers):
                self.prefix_ids = []  # not a plain attention KV cache (recurrent/hybrid model): no reuse
            else:
                self.prefix_kv = [(la.keys, la.values) for la in layers]

    def shared_prefix_len(self, seqs: list[list[int]], last_positions: list[int]) -> int:
        """Longest prefix of the cached prefix ids that every sequence starts with, and that leaves each
        row's first gathered position outside it (that position must be computed)."""
        n = len(self.prefix_ids)
        for s, p in zip(seqs, last_positions):
            j = 0
            lim = min(n, len(s), p)
            while j < lim and s[j] == self.prefix_ids[j]:
                j += 1
            n = j
            if n == 0:
                break
        return n

    def logits_at(self, seqs: list[list[int]], positions: list[list[int]], use_prefix: bool):
        """Final hidden states (sum n_i, d) and float32 logits (sum n_i, V) at positions[i] of seqs[i]."""
        torch = self.torch
        b = len(seqs)
        L = self.shared_prefix_len(seqs, [min(p) for p in positions]) if (use_prefix and self.prefix_kv) else 0
        with torch.inference_mode():
            if L > 0:
                from transformers import DynamicCache

                suf = [s[L:] for s in seqs]
                S = max(len(s) for s in suf)
                inp = torch.full((b, S), self.pad_id, dtype=torch.long)
                mask = torch.zeros((b, L + S), dtype=torch.long)
                mask[:, :L] = 1
                for i, s in enumerate(suf):  # right padding after the cached prefix
                    inp[i, : len(s)] = torch.tensor(s)
                    mask[i, L: L + len(s)] = 1
                pos = (torch.arange(S) + L).unsqueeze(0).expand(b, S)
                cache = DynamicCache(
                    ddp_cache_data=[(k[:, :, :L].expand(b, -1, -1, -1), v[:, :, :L].expand(b, -1, -1, -1))
                                    for k, v in self.prefix_kv],
                    config=self.model.config,
                )
                rows = [i for i, p in enumerate(positions) for _ in p]
                cols = [q - L for p in positions for q in p]
            else:
                S = max(len(s) for s in seqs)
                inp = torch.full((b, S), self.pad_id, dtype=torch.long)
                mask = torch.zeros((b, S), dtype=torch.long)
                for i, s in enumerate(seqs):  # left padding
                    inp[i, S - len(s):] = torch.tensor(s)
                    mask[i, S - len(s):] = 1
                pos = (mask.cumsum(-1) - 1).clamp(min=0)
                cache = None
                rows = [i for i, p in enumerate(positions) for _ in p]
                cols = [q + S - len(seqs[i]) for i, p in enumerate(positions) for q in p]
            out = self.backbone(input_ids=inp.to(self.device), attention_mask=mask.to(self.device),
                                position_ids=pos.to(self.device), past_key_values=cache, use_cache=cache is not None)
            h = out.last_hidden_state[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)]
            logits = self.lm_head(h).float()
            if self.softcap:
                logits = torch.tanh(logits / self.softcap) * self.softcap
        return h, logits


def _batches(order: list, batch_size: int):
    for i in range(0, len(order), batch_size):
        yield order[i: i + batch_size]


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
    order = sorted(idx, key=lambda r: -len(plan.ids[r]))  # longest first: an OOM shows at once
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
    for f in sorted(path.glob("shard-*.arrow")):
        try:
            with pa.ipc.open_file(f) as r:
                tables.append(r.read_all())
        except (pa.ArrowInvalid, OSError) as e:  # a foreign or damaged file: skip it, rescore its rows
            log.warning("ignoring unreadable score shard %s (%s)", f, e)
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


def score(model, tokenizer, questions, prompt: PromptTemplate, cfg: ScoringConfig,
          cache_dir: str | os.PathLike | None = None, model_key: str | None = None, *,
          model_dir: str | None = None, vllm_dtype: str = "float32", progress: bool = True, flush_rows: int = 512):
    """Score ``questions`` (a questions Dataset or list of dicts) with ``prompt``; return a Dataset with
    one row per input row, in the same order (docs/CONTRACTS.md "Scores", plus ``collision``).

    ``model_key`` names the model in the cache (default: fingerprint + quant of a load_model model).
    With ``cfg.backend == "vllm"`` the model may be None; pass ``model_dir`` (the weights directory).
    """
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from tqdm.auto import tqdm

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
    todo = [q for q in uniq if q not in have]

    tables = [cached]
    if todo:
        first = {q: i for i, q in reversed(list(enumerate(qids_all)))}
        need = ["question_id", "context", "question", "subj1", "subj2", "subj1_group", "subj2_group", "category"]
        rows = {c: _col(questions, c) for c in need}
        rows = {c: [v[first[q]] for q in todo] for c, v in rows.items()}
        plan = _plan(tokenizer, rows, prompt, cfg)
        n_coll = sum(plan.collision)
        if n_coll:
            log.warning("%d of %d questions have subjects sharing a first token: scored in exact mode", n_coll, len(todo))
        chunk = max(flush_rows, cfg.batch_size)
        runner = None
        if cfg.backend == "hf":
            prefix_ids = None
            if cfg.prefix_cache:
                prefix_ids = tokenizer(prompt.prefix(tokenizer), add_special_tokens=prompt.add_special_tokens)["input_ids"]
            runner = _HFRunner(model, tokenizer, prefix_ids)
        total = len(todo) + sum(p is not None for p in plan.cont_ids)
        with tqdm(total=total, desc=f"scoring ({prompt.name})", unit="prompt", disable=not progress or None) as pbar:
            for start in range(0, len(todo), chunk):
                idx = list(range(start, min(start + chunk, len(todo))))
                if cfg.backend == "hf":
                    res = _score_hf(model, tokenizer, plan, idx, prompt, cfg, runner, pbar)
                else:
                    res = _score_vllm(model_dir, plan, idx, cfg, vllm_dtype)
                    pbar.update(len(idx))
                table = _to_table(_finish(plan, idx, res, cfg), cfg.store_hidden)
                if path is not None:
                    _write_shard(path, table)  # each chunk on disk at once: an interrupted run resumes here
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


# ----------------------------------------------------------------------------- prompt sweep


def sweep_prompts(model, tokenizer, questions, names: list[str], cfg: ScoringConfig,
                  cache_dir=None, model_key: str | None = None) -> dict[str, dict]:
    """Per prompt: answer mass (mean p1 + p2, full vocabulary), top-k miss rate, and specified accuracy
    on the specified rows of ``questions`` (for ``--prompt auto``; the lead picks by these)."""
    from dataclasses import replace

    from refine_llm import metrics
    from refine_llm.prompts import load_prompt

    spec = np.asarray(_col(questions, "specified"), bool)
    gold = _col(questions, "gold")
    s1 = _col(questions, "subj1")
    out = {}
    for name in names:
        p = load_prompt(name)
        ds = score(model, tokenizer, questions, p, replace(cfg, prompt=name), cache_dir, model_key)
        p_topk, p_full, in_topk = candidate_probs(ds)
        gold_pos = np.array([0 if g == a else 1 for g, a, s in zip(gold, s1, spec) if s], np.int64)
        acc = metrics.specified_accuracy(p_full[spec], gold_pos) if spec.any() else {"accuracy": None}
        acc_topk = metrics.specified_accuracy(p_topk[spec], gold_pos) if spec.any() else {"accuracy": None}
        out[name] = {"answer_mass": metrics.answer_mass(p_full), "cand_in_topk": float(in_topk.mean()),
                     "specified_accuracy": acc["accuracy"], "specified_accuracy_topk": acc_topk["accuracy"],
                     "n_specified": int(spec.sum()), **score_stats(ds)}
    return out

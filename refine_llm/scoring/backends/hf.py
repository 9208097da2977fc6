"""The transformers backend: one forward pass per fixed batch, the few-shot prefix's KV computed once.

Speed. Prompts are tokenized whole and batched by fixed range. The few-shot prefix is the same in every
prompt: its KV cache is computed once per backend; each batch uses as prefix the longest token prefix that
all its prompts share with the tokenized prefix string (checked, since tokenization at the boundary may
differ), copies the cache to the batch, and feeds the right-padded suffixes with explicit position ids;
each row's answer position is gathered and only those hidden states go through lm_head. Without the prefix
cache, whole prompts are left-padded with position ids that start at each row's first real token, so both
paths compute the same thing. The forward itself is ``refine_llm.forward.answer_logits``, shared with the
LoRA trainer (tests/test_forward.py checks it).
"""

from __future__ import annotations

import numpy as np

from refine_llm.config import ScoringConfig
from refine_llm.prompts import PromptTemplate
from refine_llm.scoring.cache import to_table
from refine_llm.scoring.plan import PromptPlan, batch_ranges, finish, prompt_plan

__all__ = ["HFRunner", "make_runner", "score_plan", "HFBackend"]


class HFRunner:
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


def make_runner(model, tokenizer, prompt: PromptTemplate, cfg: ScoringConfig) -> HFRunner:
    """The HF forward runner for ``prompt``, with the few-shot prefix's KV cache when ``cfg.prefix_cache``."""
    prefix_ids = None
    if cfg.prefix_cache:
        prefix_ids = tokenizer(prompt.prefix(tokenizer), add_special_tokens=prompt.add_special_tokens)["input_ids"]
    return HFRunner(model, tokenizer, prefix_ids)


def _lse(lp_row, ids: list[int]) -> float:
    import torch

    if not ids:
        return float("-inf")
    return float(torch.logsumexp(lp_row[ids], dim=0))


def score_plan(model, plan: PromptPlan, cfg: ScoringConfig, runner: HFRunner) -> dict[str, np.ndarray]:
    """Score every row of ``plan`` (at most ``cfg.batch_size`` rows: one forward pass), then the exact pass
    for the rows that need it (one sequence per (row, candidate), batched by ``cfg.batch_size``)."""
    import torch

    k, n, S = cfg.top_k, len(plan.qids), plan.n_sides
    out = {"topk_ids": np.zeros((n, k), np.int64), "topk_logprobs": np.zeros((n, k), np.float32),
           "main_lp": np.full((n, S), -np.inf, np.float64), "exact_lp": np.full((n, S), -np.inf, np.float64),
           "nonfinite": np.zeros(n, bool)}
    if cfg.store_hidden:
        out["hidden"] = np.zeros((n, model.config.hidden_size), np.float16)
    if cfg.align_to_base:  # the base pass's top-k ids, read off this pass's distribution
        out["aligned_logprobs"] = np.zeros((n, len(plan.aligned_ids[0]) if n else 0), np.float32)
    for a, b in batch_ranges(n, cfg.batch_size):
        seqs = plan.ids[a:b]
        h, logits = runner.logits_at(seqs, [[len(s) - 1] for s in seqs], cfg.prefix_cache)  # (B,d), (B,V)
        finite = torch.isfinite(logits).all(dim=-1)
        lp = torch.log_softmax(logits, dim=-1)
        top = torch.topk(lp, k, dim=-1)
        for j in range(a, b):
            out["topk_ids"][j] = top.indices[j - a].cpu().numpy()
            out["topk_logprobs"][j] = top.values[j - a].cpu().numpy()
            out["nonfinite"][j] = not bool(finite[j - a])
            for s in range(S):
                out["main_lp"][j, s] = _lse(lp[j - a], plan.lp_ids[j][s])
            if cfg.store_hidden:
                out["hidden"][j] = h[j - a].to(torch.float16).cpu().numpy()
            if cfg.align_to_base:
                out["aligned_logprobs"][j] = lp[j - a][plan.aligned_ids[j]].cpu().numpy()
    # Exact pass: one sequence per (row, candidate) = prompt + continuation; sum the continuation's log-probs.
    pairs = [(r, s) for r in range(n) if plan.cont_ids[r] is not None for s in range(S)]
    for a, b in batch_ranges(len(pairs), cfg.batch_size):
        batch = pairs[a:b]
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
            out["exact_lp"][r, s] = float(tok_lp[start: start + len(p)].sum())
            out["nonfinite"][r] |= not bool(finite[start: start + len(p)].all())
            start += len(p)
    return out


class HFBackend:
    """``score_batch(rows) -> table`` with a transformers model (see the package docstring)."""

    name = "hf"

    def __init__(self, model, tokenizer, prompt: PromptTemplate, cfg: ScoringConfig, runner: HFRunner | None = None):
        self.model, self.tokenizer, self.prompt, self.cfg = model, tokenizer, prompt, cfg
        self.runner = runner if runner is not None else make_runner(model, tokenizer, prompt, cfg)

    def score_batch(self, rows: dict[str, list]):
        plan = prompt_plan(self.tokenizer, rows, self.prompt, self.cfg)
        cfg = self.cfg
        return to_table(finish(plan, score_plan(self.model, plan, cfg, self.runner), cfg.store_hidden, cfg.align_to_base),
                        cfg.store_hidden, cfg.align_to_base)

"""The one forward path: logits at chosen positions of many prompts, the shared few-shot prefix run once.

Scoring (``refine_llm.scoring``, no gradients, frozen model) and the LoRA trainer
(``refine_llm.baselines.lora``, gradients into the adapters) both call ``answer_logits``; nothing else
in the project runs a causal LM forward for answers, so the two can never compute different things.

    answer_logits(model, seqs, positions=None, pad_id=0, prefix_ids=None, kv=None, grad=False)
        -> hidden (N, d) final post-norm hidden states, logits (N, V) float32, N = sum of len(positions[i])

Default ``positions``: each sequence's last token (the next-token distribution at the answer slot).

Prefix. Every prompt of a run starts with the same few-shot prefix (~85% of a qa prompt's tokens).
``prefix_ids`` names it; the batch uses as prefix its longest common token prefix L with every
sequence, stopping before the first gathered position (that position must be computed). The prefix
runs once, batch 1 (or ``kv``, computed earlier by ``prefix_kv(model, prefix_ids)`` and sliced to
L), its keys/values are *expanded* (a view) to the batch, and each row's suffix runs after it,
right-padded, with explicit positions L.. and the prefix columns unmasked. With grad on, the expand's
backward sums every row's gradient into the one prefix pass: the same gradient as running every row in
full, for ~L x B fewer tokens. Without a usable prefix (none shared, a recurrent/hybrid cache, a
sliding window that the sequence outgrows, gradient checkpointing in training, which drops
past_key_values), whole sequences run left-padded with position ids that start at each row's first
real token. Both paths compute the same numbers (tests/test_forward.py: logits and gradients).

lm_head runs only on the gathered hidden states (no (B, T, V) tensor); a final logit softcap
(Gemma-2 style) is applied as the model itself would.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["answer_logits", "prefix_kv", "prefix_usable", "common_prefix_len", "causal_lm"]


def causal_lm(model):
    """The transformers CausalLM inside ``model`` (a PeftModel's LoRA layers stay injected and active)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _device(model) -> torch.device:
    return next(model.parameters()).device


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Length of the longest token prefix shared by every sequence, leaving each at least one token of its
    own (the answer position must be computed in the suffix pass)."""
    if not seqs:
        return 0
    n = min(len(s) for s in seqs) - 1
    first = seqs[0]
    for s in seqs[1:]:
        j = 0
        while j < n and s[j] == first[j]:
            j += 1
        n = j
        if n <= 0:
            return 0
    return max(n, 0)


def prefix_usable(model, prefix_len: int, total: int | None = None) -> bool:
    """Whether the shared-prefix path is exact for this model: not under gradient checkpointing in training
    (transformers drops past_key_values there) and, with a sliding window, only while the whole sequence
    (``total`` tokens, default the prefix) fits in it."""
    if prefix_len <= 0:
        return False
    lm = causal_lm(model)
    if lm.training and getattr(lm, "is_gradient_checkpointing", False):
        return False
    window = getattr(getattr(lm, "config", None), "sliding_window", None)
    return not (window and max(prefix_len, total or 0) >= window)


def prefix_kv(model, prefix_ids: list[int], grad: bool = False):
    """The prefix's per-layer (keys, values), each (1, heads, L, head_dim), under the model's current
    weights (adapters included); differentiable when ``grad``. None when the model's cache is not a plain
    attention KV cache (callers then run whole sequences)."""
    if not prefix_ids:
        return None
    lm = causal_lm(model)
    with torch.set_grad_enabled(grad):
        out = lm.base_model(input_ids=torch.tensor([list(prefix_ids)], device=_device(lm)), use_cache=True)
    layers = getattr(out.past_key_values, "layers", None)
    if layers is None or not all(getattr(la, "keys", None) is not None for la in layers):
        return None
    return [(la.keys, la.values) for la in layers]


def _shared_len(prefix_ids: list[int], seqs: list[list[int]], first_positions: list[int]) -> int:
    """Longest prefix of ``prefix_ids`` that every sequence starts with, ending before its first gathered
    position."""
    n = len(prefix_ids)
    for s, p in zip(seqs, first_positions):
        j, lim = 0, min(n, len(s), p)
        while j < lim and s[j] == prefix_ids[j]:
            j += 1
        n = j
        if n == 0:
            break
    return n


def answer_logits(
    model,
    seqs: list[list[int]],
    positions: list[list[int]] | None = None,
    *,
    pad_id: int = 0,
    prefix_ids: list[int] | None = None,
    kv: Any = None,
    grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states (N, d) and float32 logits (N, V) at ``positions[i]`` of ``seqs[i]`` (see the module
    docstring). ``kv``: the KV of ``prefix_ids`` computed earlier (e.g. once for a frozen model, or
    the frozen reference with adapters off); None computes it here, under ``grad``."""
    lm = causal_lm(model)
    dev = _device(lm)
    b = len(seqs)
    if positions is None:
        positions = [[len(s) - 1] for s in seqs]
    rows = [i for i, p in enumerate(positions) for _ in p]
    total = max(len(s) for s in seqs)
    L = _shared_len(prefix_ids, seqs, [min(p) for p in positions]) if prefix_ids else 0
    if not (L > 0 and prefix_usable(lm, L, total)):
        kv = None
    elif kv is None:
        kv = prefix_kv(lm, prefix_ids[:L], grad)
    with torch.set_grad_enabled(grad):
        if kv is not None:
            from transformers import DynamicCache

            suf = [s[L:] for s in seqs]
            S = max(len(s) for s in suf)
            inp = torch.full((b, S), pad_id, dtype=torch.long)
            mask = torch.zeros((b, L + S), dtype=torch.long)
            mask[:, :L] = 1
            for i, s in enumerate(suf):  # right padding after the shared prefix
                inp[i, : len(s)] = torch.tensor(s)
                mask[i, L: L + len(s)] = 1
            pos = (torch.arange(S) + L).unsqueeze(0).expand(b, S)
            cache = DynamicCache(ddp_cache_data=[(k[:, :, :L].expand(b, -1, -1, -1), v[:, :, :L].expand(b, -1, -1, -1))
                                                 for k, v in kv], config=lm.config)
            cols = [q - L for p in positions for q in p]
        else:
            S = total
            inp = torch.full((b, S), pad_id, dtype=torch.long)
            mask = torch.zeros((b, S), dtype=torch.long)
            for i, s in enumerate(seqs):  # left padding
                inp[i, S - len(s):] = torch.tensor(s)
                mask[i, S - len(s):] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            cache = None
            cols = [q + S - len(seqs[i]) for i, p in enumerate(positions) for q in p]
        out = lm.base_model(input_ids=inp.to(dev), attention_mask=mask.to(dev), position_ids=pos.to(dev),
                            past_key_values=cache, use_cache=cache is not None)
        h = out.last_hidden_state[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)]  # (N, d)
        logits = lm.get_output_embeddings()(h).float()  # (N, V)
        softcap = getattr(lm.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
    return h, logits

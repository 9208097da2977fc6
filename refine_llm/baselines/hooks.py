"""Forward hooks at the answer position: read (activation capture) or rewrite (steering) one decoder
layer's output at each row's last real token.

Used by activation steering (refine_llm.baselines.steer) to collect the probe's training activations and
to add the debiasing vector at inference. The hooks ride on the normal HF forward, so everything that
runs the model goes through them unchanged: ``refine_llm.forward.answer_logits`` (scoring, both its
prefix-cached right-padded suffix batches and its left-padded whole-sequence batches), and
``model.generate``.

Which column is "the answer position". A pre-forward hook on the decoder stack (``lm.base_model``)
reads the call's 2-D ``attention_mask`` (B, past + S) and its input length S, and records for each row
the last column j < S of the input whose mask is 1: the row's last real token.
- right-padded suffixes after a shared prefix (answer_logits' prefix path): j = len(suffix) - 1;
- left-padded whole sequences (answer_logits' other path, generate's prefill): j = S - 1;
- a decoding step of generate (S = 1): j = 0, the new token.
A forward call without an attention mask is left alone. The one such call in this project is
``forward.prefix_kv``, the shared few-shot prefix's KV: its last token is not an answer position, and
leaving it unsteered keeps the prefix cache exact (the same numbers as running every row whole).
A 4-D or per-layer-type mask passed by the caller is also left alone (the answer column cannot be read
off it); pass the usual 2-D mask.

    with answer_hooks(model, {layer: fn}):     # fn(h (n, d)) -> new h (n, d) or None (unchanged)
        model(...)

``fn`` sees the n rows that have a real token in the call (in batch order) and returns their new
activations, or None to leave the layer's output untouched: bit-identical to running without the hook.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable

import torch

from refine_llm.errors import UserError
from refine_llm.forward import causal_lm

__all__ = ["decoder_layers", "hidden_size", "answer_hooks", "capture_answer_activations"]

LayerFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM (``lm.base_model.layers``: Llama, Mistral, Qwen2, Gemma, ...)."""
    lm = causal_lm(model)
    layers = getattr(getattr(lm, "base_model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise UserError(f"{type(lm).__name__} has no list of decoder layers at .base_model.layers: activation "
                        "steering supports decoder-only models of the Llama/Mistral/Qwen family")
    return layers


def hidden_size(model) -> int:
    """The width d of the residual stream (what a decoder layer outputs at each position)."""
    cfg = causal_lm(model).config
    return int(getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size)


class _Columns:
    """Pre-forward hook state: per row, the last real column of the current call's input (or None)."""

    def __init__(self):
        self.rows: torch.Tensor | None = None  # (n,) rows with a real token in this call
        self.cols: torch.Tensor | None = None  # (n,) their last real column

    def __call__(self, module, args, kwargs):
        mask = kwargs.get("attention_mask")
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        self.rows = self.cols = None
        if x is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return None
        S = x.shape[1]
        m = mask[:, -S:].bool()  # (B, S): this call's columns
        idx = torch.arange(S, device=m.device).expand_as(m)
        last = torch.where(m, idx, torch.full_like(idx, -1)).max(dim=1).values  # (B,)
        keep = last >= 0
        self.rows = torch.nonzero(keep).flatten()
        self.cols = last[keep]
        return None


@contextmanager
def answer_hooks(model, fns: dict[int, LayerFn]):
    """While active, decoder layer ``l`` passes its output at each row's answer column through
    ``fns[l]`` (see the module docstring). Hooks are removed on exit, also on an exception."""
    layers = decoder_layers(model)
    for layer in fns:
        if not 0 <= layer < len(layers):
            raise UserError(f"layer {layer} does not exist: this model has decoder layers 0..{len(layers) - 1}")
    cols = _Columns()
    handles = [causal_lm(model).base_model.register_forward_pre_hook(cols, with_kwargs=True)]

    def make(fn: LayerFn):
        def hook(module, args, output):
            if cols.rows is None or not len(cols.rows):
                return None
            hidden = output[0] if isinstance(output, tuple) else output  # (B, S, d)
            r, c = cols.rows.to(hidden.device), cols.cols.to(hidden.device)
            new = fn(hidden[r, c])  # (n, d) -> (n, d) or None
            if new is None:
                return None
            hidden = hidden.clone()  # out of place: autograd-safe, and the caller's tensor is not mutated
            hidden[r, c] = new.to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
        return hook

    try:
        for layer, fn in fns.items():
            handles.append(layers[layer].register_forward_hook(make(fn)))
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def capture_answer_activations(model, layers: list[int]):
    """Record the answer column's output of each decoder layer in ``layers``: yields {layer: [(n, d)
    float32 CPU tensors, one per forward call]}; nothing is changed."""
    store: dict[int, list[torch.Tensor]] = {int(l): [] for l in layers}

    def make(layer: int) -> LayerFn:
        def fn(h):
            store[layer].append(h.detach().float().cpu())
            return None
        return fn

    with answer_hooks(model, {l: make(l) for l in store}):
        yield store

"""The REFINE heads: tiny modules on top of a frozen LLM's top-k next-token distribution, registered in one table.

A head maps one prompt's top-k (B, k) to a new distribution over the *same* k tokens and returns
log-probabilities (B, k). The LLM never runs here; heads are trained by ``refine_llm.bandit`` on
cached scores and applied at serving time by ``refine_llm.serving``.

    forward(topk_logprobs (B,k), topk_ids (B,k) long | None, hidden (B,d) | None, logits (B,V) | None)
        -> (B,k) log-probs

Every variant first renormalises its input over the top-k (``log_softmax(topk_logprobs)``), so a
head is invariant to a constant shift of its input: serving may pass the raw top-k *logits* instead
of full-vocabulary log-probs and get the same answer, with no log-sum-exp over the vocabulary.

Variants (``HeadConfig.variant``):
- ``paper``: the authors' head, exactly as in their code (rameez-mrq/refine-lm-submission,
  model_LLM.py): ``softmax(Linear(k,k)(softmax(topk)))`` with ``nn.init.ones_(weight)``; the bias
  keeps PyTorch's default init U(-1/sqrt(k), 1/sqrt(k)) because their code never sets it. With all
  weights equal, ``W p = 1`` for every probability vector p, so the untrained head outputs
  ``softmax(1 + b)``: the same distribution for every input. And because its input is a probability
  vector in [0,1], a softmax of it is nearly flat whatever the weights: see ``flatness``.
- ``logit`` (default): ``log_softmax(Linear(k,k)(log p))`` initialised to the identity (bias 0), so the
  untrained head reproduces the model's renormalised top-k exactly; training earns every change.
- ``contextual``: ``logit`` plus a low-rank bilinear correction per top-k token j,
  ``corr_j = c^T M u_j`` with context ``c = A_c z`` (r,), z = the LLM's logits row (V,), and token
  code ``u_j = E[id_j]`` (r,). A_c = A - rowmean(A) has rows summing to zero, so c is the same for
  logits and log-softmax(logits) (any per-row shift cancels). Since logits = W_out h, training passes
  the cached hidden state h and computes ``c = (A_c W_out) h`` (r x d matmul, no V-sized logits);
  serving passes the logits row. M (r,r) starts at zero, so the head starts as ``logit``/identity.
  A (r,V) and E (V,r) are learned; E starts as a fixed random projection of the normalised rows of
  W_out (so tokens with similar output embeddings start with similar codes). Saved size ~ 2 V r floats
  (128k x 8 -> 8 MB in fp32).
- ``slot``: a head that knows who is who. Each top-k slot j gets a score correction
  ``delta_j = MLP(lp_j, lp_j - max lp, H, margin, s_j, t_j)`` from one MLP shared by all slots
  (permutation-equivariant: reorder the top-k and the output reorders with it). lp is the
  renormalised top-k; H its entropy and margin = top-1 minus top-2 log-prob say how open the context
  (the logits row) leaves the answer; s_j = cos(u_j, ubar) and t_j = cos(u_j, u_top1) say who is in
  slot j: whether its token is of the same kind as the rest of the top-k's mass and as the leading
  answer (the other name), with u_j = normalize(W_out[id_j]) Q a code of the token's output-embedding
  row (Q (d,r) a fixed seeded projection, so unseen names get codes) and ubar = sum_j p_j u_j.
  c_j = 1 when the token is in the category vocabulary (the names, group nouns and pronouns of the
  word lists: ``gate_token_ids``, set by ``set_category_vocabulary`` and saved with the head), and the
  share of such slots in the top-k: where two candidates compete the head acts, elsewhere (a question
  about the weather) it learns to stay out (the anchor term of ``refine_llm.rewards``).
  The identity enters only through these features, never as a raw code: on the testbed, raw
  codes and a trained context projection (the first design, ~400k parameters) memorised the train
  split's names (train mean|C| 0.004, validation μ stuck at -60%), while the similarities generalise
  to unseen names, attributes and templates (README, "Heads on the testbed"). Output
  ``log_softmax(topk + delta)``; the MLP's last layer starts at zero, so the untrained head is exactly
  the identity. Saved: Q, the MLP, the category mask (V,) and the code table normalize(W_out) Q (V,r),
  so vLLM serves it from the top-k alone.
- ``uniform`` (uniform over the top-k) and ``identity`` (renormalised top-k): parameter-free baselines.

- ``rank-bias``: identity plus a learned bias per rank (k parameters), input-independent: the cheapest
  thing a head of ranks could learn (a no-training-like baseline, trained like the heads).

``HEADS`` is the one table of variants (a new head: its class here, its entry there, its name in
``config.HeadVariant`` when users may pick it with ``--head``). ``HeadMethod`` is a loaded head behind the
methods protocol (``refine_llm.methods.protocol``): the evaluator, BBQ and generation apply heads through it.

Artifacts (``refine_llm.methods.hub``): a hub model repository layout, ``config.json`` (``SavedHeadConfig``) +
``model.safetensors`` + ``README.md`` (a generated model card); never pickle. Every head has
``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` (``HubHeadMixin``; ``save_head`` / ``load_head``
do the work). ``from_pretrained`` takes a directory or a hub repo id, resolved offline from the local hub
cache when HF_HUB_OFFLINE is set. Loading refuses a head built for another tokenizer or another k.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from refine_llm.config import HeadConfig
from refine_llm.errors import UserError
from refine_llm.methods.hub import (CONFIG_NAME, WEIGHTS_NAME, push_to_hub, read_head_config, read_weights,
                                    resolve_head, save_head_files)
from refine_llm.methods.gate import GateCore
from refine_llm.methods.protocol import Method, Output, Scores
from refine_llm.methods.topk import NEG as _NEG
from refine_llm.methods.topk import renormalise
from refine_llm.vocab import tokenizer_fingerprint

__all__ = ["HEADS", "renormalise", "HubHeadMixin", "IdentityHead", "UniformHead", "PaperHead", "LogitHead",
           "ContextualHead", "SlotHead", "GateHead", "RankBiasHead", "build_head", "head_config", "save_head", "load_head",
           "flatness", "num_parameters", "rewrite_topk", "gate_mask", "HeadMethod"]



class HubHeadMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for every head, as peft adapters have them.

        head.save_pretrained("heads/gender", meta={...}, card={...})
        head = HubHeadMixin.from_pretrained("org/refine-gender-smollm2")   # any variant; or LogitHead.from_pretrained
        head.push_to_hub("org/refine-gender-smollm2", meta={...})

    ``from_pretrained`` returns the head in eval mode with its config.json as ``head.refine_config``.
    ``needs_lm_head``: the variant reads the LLM's output embedding (built with ``lm_head_weight``).
    """

    needs_lm_head: ClassVar[bool] = False

    def save_pretrained(self, save_directory: str | os.PathLike, meta: dict[str, Any] | None = None,
                        card: dict[str, Any] | None = None) -> Path:
        return save_head(self, save_directory, meta, card)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kw) -> nn.Module:
        head, config = load_head(name_or_path, **kw)
        if not isinstance(head, cls):
            raise UserError(f"{name_or_path} holds a {config['variant']!r} head, not a {cls.__name__}: "
                            "load it with HubHeadMixin.from_pretrained or refine_llm.methods.heads.load_head")
        head.refine_config = config
        return head

    def push_to_hub(self, repo_id: str, meta: dict[str, Any] | None = None, card: dict[str, Any] | None = None,
                    **kw) -> str:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="refine_head-") as d:
            save_head(self, d, meta, card)
            return push_to_hub(d, repo_id, **kw)


def _check_input(topk_logprobs: torch.Tensor, k: int) -> None:
    if topk_logprobs.ndim != 2 or topk_logprobs.shape[-1] != k:
        raise ValueError(f"topk_logprobs must have shape (B, {k}), got {tuple(topk_logprobs.shape)}")


class IdentityHead(HubHeadMixin, nn.Module):
    """Returns the renormalised top-k: the model as it is (sanity baseline)."""

    variant = "identity"

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, topk_logprobs, topk_ids=None, hidden=None, logits=None):
        _check_input(topk_logprobs, self.k)
        return renormalise(topk_logprobs)


class UniformHead(HubHeadMixin, nn.Module):
    """Uniform over the top-k whatever the input (sanity baseline: the flattest possible head)."""

    variant = "uniform"

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward(self, topk_logprobs, topk_ids=None, hidden=None, logits=None):
        _check_input(topk_logprobs, self.k)
        return torch.full_like(topk_logprobs, -math.log(self.k), dtype=torch.float32)


class PaperHead(HubHeadMixin, nn.Module):
    """The authors' head: softmax(Linear(softmax(top-k))) with weight = 1, bias = torch default."""

    variant = "paper"

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.out = nn.Linear(k, k)  # bias: U(-1/sqrt(k), 1/sqrt(k)) from the global torch RNG, as theirs
        nn.init.ones_(self.out.weight)

    def forward(self, topk_logprobs, topk_ids=None, hidden=None, logits=None):
        _check_input(topk_logprobs, self.k)
        p = renormalise(topk_logprobs).exp()  # (B,k) probabilities in [0,1]
        return torch.log_softmax(self.out(p), dim=-1)


class LogitHead(HubHeadMixin, nn.Module):
    """log_softmax(Linear(k,k)(renormalised top-k log-probs)), identity-initialised."""

    variant = "logit"

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.out = nn.Linear(k, k)
        with torch.no_grad():
            self.out.weight.copy_(torch.eye(k))
            self.out.bias.zero_()

    def scores(self, topk_logprobs: torch.Tensor) -> torch.Tensor:
        """(B,k) unnormalised output logits."""
        return self.out(renormalise(topk_logprobs))

    def forward(self, topk_logprobs, topk_ids=None, hidden=None, logits=None):
        _check_input(topk_logprobs, self.k)
        return torch.log_softmax(self.scores(topk_logprobs), dim=-1)


class ContextualHead(LogitHead):
    """``logit`` head + low-rank bilinear correction c^T M u_j (see the module docstring).

    Parameters: out (k,k) identity init; ctx_proj A (r,V), small random; tok_codes E (V,r) from
    W_out; mix M (r,r) zero init. ``lm_head_weight`` (V,d) is kept as a non-saved buffer, needed only
    for ``hidden=`` inputs (training on cached hidden states).
    """

    variant = "contextual"
    needs_lm_head = True

    def __init__(
        self,
        k: int,
        rank: int,
        vocab_size: int,
        hidden_size: int,
        lm_head_weight: torch.Tensor | None = None,
        seed: int = 0,
    ):
        super().__init__(k)
        self.rank, self.vocab_size, self.hidden_size = rank, vocab_size, hidden_size
        g = torch.Generator().manual_seed(seed)
        self.ctx_proj = nn.Parameter(torch.randn(rank, vocab_size, generator=g) / math.sqrt(vocab_size))
        self.mix = nn.Parameter(torch.zeros(rank, rank))
        codes = torch.zeros(vocab_size, rank)
        if lm_head_weight is not None:
            q = torch.randn(hidden_size, rank, generator=g)  # (d,r), entries N(0,1)
            w = F.normalize(lm_head_weight.detach().float(), dim=1)  # (V,d) unit rows
            codes = w @ q  # (V,r): each entry ~ N(0,1)
        self.tok_codes = nn.Parameter(codes)
        self.register_buffer("lm_head_weight", None, persistent=False)
        if lm_head_weight is not None:
            self.attach_lm_head(lm_head_weight)

    def attach_lm_head(self, lm_head_weight: torch.Tensor) -> None:
        """Keep W_out (V,d) (frozen, not saved) so that forward(hidden=h) works."""
        shape = (self.vocab_size, self.hidden_size)
        if tuple(lm_head_weight.shape) != shape:
            raise UserError(
                f"lm_head_weight has shape {tuple(lm_head_weight.shape)} but this head was built for {shape}: "
                "pass the output embedding of the head's base model"
            )
        self.lm_head_weight = lm_head_weight.detach().float().to(self.tok_codes.device)

    def centered_ctx_proj(self) -> torch.Tensor:
        """A_c (r,V): rows sum to zero, so c ignores per-row shifts of the logits."""
        return self.ctx_proj - self.ctx_proj.mean(dim=1, keepdim=True)

    def context(self, hidden: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> torch.Tensor:
        """(B,r) context from the hidden state (B,d) via A_c W_out, or from the logits row (B,V)."""
        a = self.centered_ctx_proj()
        if logits is not None:
            z = logits.float()[:, : self.vocab_size]  # vLLM may pad the vocabulary
            if z.shape[-1] != self.vocab_size:
                raise ValueError(f"logits must have >= {self.vocab_size} columns, got {logits.shape[-1]}")
            z = torch.nan_to_num(z, nan=0.0, neginf=_NEG, posinf=-_NEG)
            return z @ a.T
        if hidden is not None:
            if self.lm_head_weight is None:
                raise UserError(
                    "this contextual head has no lm_head_weight: pass lm_head_weight= to build_head/load_head, "
                    "or call it with logits= instead of hidden="
                )
            return hidden.float() @ (a @ self.lm_head_weight).T  # (B,d) @ (d,r)
        raise ValueError("the contextual head needs hidden= (B,d) or logits= (B,V)")

    def forward(self, topk_logprobs, topk_ids=None, hidden=None, logits=None):
        _check_input(topk_logprobs, self.k)
        if topk_ids is None:
            raise ValueError("the contextual head needs topk_ids (B,k) to look up each token's code")
        c = self.context(hidden=hidden, logits=logits)  # (B,r)
        u = self.tok_codes[topk_ids.long()]  # (B,k,r)
        corr = torch.einsum("br,rs,bks->bk", c, self.mix, u)  # (B,k)
        return torch.log_softmax(self.scores(topk_logprobs) + corr, dim=-1)


class SlotHead(ContextualHead):
    """A head that knows who is who: every top-k slot is scored by one shared MLP from its log-prob,
    the top-k's shape, two identity similarities and category membership (module docstring, ``slot``).

    Trainable: only the MLP (F=6 -> WIDTH -> 1, last layer zero-initialised: exactly the identity at
    init). Buffers: code_proj Q (d,r), a fixed seeded projection, and tok_codes (V,r) =
    normalize(W_out) Q, saved with the weights, so a head served without W_out (vLLM) has its codes.
    Permutation-equivariant: no weight is indexed by rank. Subclasses ContextualHead for its
    constructor arguments and W_out checks; it has no context projection (hidden=/logits= are accepted
    and ignored: the context it reads is the top-k itself).
    """

    variant = "slot"
    WIDTH = 32  # hidden units of the per-slot MLP
    N_FEAT = 8  # lp, lp - max, entropy, margin | cos(u, ubar), cos(u, u_top1) | in category, share in category
    _LP_FLOOR = -30.0  # log-prob features are clamped here (a -inf slot stays -inf in the output)

    def __init__(self, k: int, rank: int, vocab_size: int, hidden_size: int,
                 lm_head_weight: torch.Tensor | None = None, seed: int = 0):
        super().__init__(k, rank, vocab_size, hidden_size, None, seed)
        del self.out, self.mix, self.tok_codes, self.ctx_proj  # rank-indexed or context weights: none here
        g = torch.Generator().manual_seed(seed + 1)
        self.register_buffer("code_proj", torch.randn(hidden_size, rank, generator=g))  # Q (d,r), fixed
        self.mlp = nn.Sequential(nn.Linear(self.N_FEAT, self.WIDTH), nn.GELU(), nn.Linear(self.WIDTH, 1))
        with torch.no_grad():
            self.mlp[2].weight.zero_()
            self.mlp[2].bias.zero_()
        self.register_buffer("tok_codes", torch.zeros(vocab_size, rank))
        self.register_buffer("category_mask", torch.zeros(vocab_size))  # (V,) 1 = a token of the category vocabulary
        if lm_head_weight is not None:
            self.attach_lm_head(lm_head_weight)

    @torch.no_grad()
    def set_category_vocabulary(self, token_ids) -> None:
        """Mark the category vocabulary (names, group nouns, pronouns: ``gate_token_ids``, refine_llm.vocab):
        the head then knows which slots hold a candidate of the bias category. Saved with the weights."""
        self.category_mask.zero_()
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise UserError(f"category token ids must lie in [0, {self.vocab_size}): use this model's tokenizer")
        self.category_mask[ids] = 1.0

    def attach_lm_head(self, lm_head_weight: torch.Tensor) -> None:
        """Keep W_out (V,d) (not saved) and refresh the code table from it."""
        super().attach_lm_head(lm_head_weight)
        with torch.no_grad():
            self.tok_codes.copy_(F.normalize(self.lm_head_weight, dim=1) @ self.code_proj)  # (V,r)

    def forward(self, topk_logprobs, topk_ids=None, hidden=None, logits=None):
        _check_input(topk_logprobs, self.k)
        if topk_ids is None:
            raise ValueError("the slot head needs topk_ids (B,k) to know which token sits in each slot")
        x = torch.nan_to_num(topk_logprobs.float(), nan=_NEG, neginf=_NEG).clamp_min(_NEG)  # (B,k)
        lp = torch.log_softmax(x, dim=-1)  # (B,k) renormalised: the identity's output
        p = lp.exp()
        lpc = lp.clamp_min(self._LP_FLOOR)
        top2 = lpc.topk(min(2, self.k), dim=-1)  # values/indices (B,2)
        B = lp.shape[0]
        ent = -(p * lpc).sum(-1, keepdim=True).expand(B, self.k)  # (B,k) open contexts have high entropy ...
        margin = (top2.values[:, :1] - top2.values[:, -1:]).expand(B, self.k)  # ... and a small top-1/top-2 margin
        u = F.normalize(self.tok_codes[topk_ids.long()], dim=-1)  # (B,k,r) who is in each slot
        ubar = F.normalize((p.unsqueeze(-1) * u).sum(1, keepdim=True), dim=-1)  # (B,1,r) where the mass is
        u_top = u[torch.arange(B, device=u.device), top2.indices[:, 0]].unsqueeze(1)  # (B,1,r) the leading answer
        cat = self.category_mask[topk_ids.long()]  # (B,k) 1 = a candidate of the bias category ...
        cat_share = cat.mean(-1, keepdim=True).expand(B, self.k)  # ... and how many of them compete
        feats = torch.stack([lpc, lpc - top2.values[:, :1], ent, margin,
                             (u * ubar).sum(-1), (u * u_top).sum(-1), cat, cat_share], dim=-1)  # (B,k,8)
        delta = self.mlp(feats).squeeze(-1)  # (B,k), exactly 0 at init
        return torch.log_softmax(x + delta, dim=-1)


class RankBiasHead(HubHeadMixin, nn.Module):
    """Input-independent head: log_softmax(renormalised top-k log-probs + b), b (k,) starts at 0.

    The same rank gets the same shift on every prompt, so it can only move mass between ranks, never
    act on who is who: the cheapest thing a head of ranks could learn."""

    variant = "rank-bias"

    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.bias = nn.Parameter(torch.zeros(k))

    def forward(self, topk_logprobs, topk_ids=None, hidden=None, logits=None):
        lp = torch.log_softmax(topk_logprobs.float(), dim=-1)  # (B, k)
        return torch.log_softmax(lp + self.bias, dim=-1)


class GateHead(HubHeadMixin, GateCore):
    """``gate``: equalise the two names where a linear gate on the hidden state says the context leaves the
    answer open (``refine_llm.methods.gate``); the main job's default head on a real model."""

    variant = "gate"
    needs_lm_head: ClassVar[bool] = True  # trains on hidden states; serves from the logits row


# The one table of head variants: name -> class (its constructor: (k) or, with needs_lm_head, (k, rank,
# vocab_size, hidden_size, lm_head_weight, seed)).
HEADS: dict[str, type] = {cls.variant: cls for cls in (
    LogitHead, PaperHead, ContextualHead, SlotHead, GateHead, UniformHead, IdentityHead, RankBiasHead)}


# ---------------------------------------------------------------------------------------------
# construction, save, load


def build_head(
    cfg: HeadConfig,
    lm_head_weight: torch.Tensor | None = None,
    *,
    vocab_size: int | None = None,
    hidden_size: int | None = None,
    seed: int = 0,
    arch: dict[str, Any] | None = None,
) -> nn.Module:
    """A fresh head for ``cfg``. ``contextual`` needs ``lm_head_weight`` (V,d) (or, when loading,
    vocab_size and hidden_size). ``seed`` seeds the contextual head's random projections; the paper
    head's bias uses the global torch RNG, like the authors' code (call torch.manual_seed first)."""
    cls = HEADS.get(cfg.variant)
    if cls is None:
        import difflib

        near = difflib.get_close_matches(cfg.variant, list(HEADS), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise UserError(f"unknown head variant {cfg.variant!r}.{hint} Use one of {', '.join(HEADS)}")
    if not cls.needs_lm_head:
        return cls(cfg.k)
    # contextual, slot: both read the context through the LLM's output embedding
    if lm_head_weight is not None:
        if lm_head_weight.ndim != 2:
            raise UserError(f"lm_head_weight must be (vocab, hidden), got shape {tuple(lm_head_weight.shape)}")
        vocab_size, hidden_size = lm_head_weight.shape
    if vocab_size is None or hidden_size is None:
        raise UserError(f"the {cfg.variant} head needs the LLM's output embedding: "
                        "build_head(cfg, lm_head_weight=model.lm_head.weight)")
    extra = {f: (arch or {})[f] for f in getattr(cls, "ARCH_FIELDS", ()) if (arch or {}).get(f) is not None}
    return cls(cfg.k, cfg.rank, int(vocab_size), int(hidden_size), lm_head_weight, seed=seed, **extra)


def head_config(head: nn.Module) -> dict[str, Any]:
    """The architecture fields that ``load_head`` needs to rebuild ``head``."""
    out: dict[str, Any] = {"variant": head.variant, "k": head.k, "rank": getattr(head, "rank", None)}
    if getattr(head, "needs_lm_head", False):
        out.update(vocab_size=head.vocab_size, hidden_size=head.hidden_size)
    out.update({f: getattr(head, f) for f in getattr(head, "ARCH_FIELDS", ())})  # e.g. the gate's table sizes
    return out


def save_head(head: nn.Module, out_dir: str | os.PathLike, meta: dict[str, Any] | None = None,
              card: dict[str, Any] | None = None) -> Path:
    """``save_pretrained``: config.json + model.safetensors + README.md (``refine_llm.methods.hub.save_head_files``)."""
    return save_head_files(out_dir, head.state_dict(), head_config(head), meta, card)


def load_head(
    head_dir: str | os.PathLike,
    expect_tokenizer_fingerprint: str | None = None,
    expect_k: int | None = None,
    lm_head_weight: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """``from_pretrained``: load a head saved by ``save_head`` from a directory or a hub repo id
    (``resolve_head``) -> (head in eval mode, config dict).

    Refuses (UserError) a head trained for another tokenizer or another top-k, a missing or corrupt
    directory, and weights that are not the ones its config.json was written with.
    ``lm_head_weight`` is needed only to call a contextual head with hidden=.
    """
    head_dir = resolve_head(head_dir, revision=revision, local_files_only=local_files_only, cache_dir=cache_dir)
    config = read_head_config(head_dir)
    if expect_k is not None and config["k"] != expect_k:
        raise UserError(
            f"head {head_dir} was trained with k={config['k']} but k={expect_k} was asked: "
            f"score with top_k={config['k']} or train a head for k={expect_k}"
        )
    if expect_tokenizer_fingerprint is not None:
        saved = config.get("tokenizer_fingerprint")
        if saved != expect_tokenizer_fingerprint:
            raise UserError(
                f"head {head_dir} was trained for another tokenizer (fingerprint {saved} != "
                f"{expect_tokenizer_fingerprint}): use a head trained on this model ({config.get('base_model')})"
            )
    try:
        cfg = HeadConfig(variant=config["variant"], k=config["k"], rank=config.get("rank") or 8)
        head = build_head(cfg, vocab_size=config.get("vocab_size"), hidden_size=config.get("hidden_size"), arch=config)
    except ValueError as e:
        raise UserError(f"{head_dir / CONFIG_NAME} is invalid ({e}): retrain or re-copy the head") from e
    tensors = read_weights(head_dir, config)
    wpath = head_dir / WEIGHTS_NAME
    expected = head.state_dict()
    if set(tensors) != set(expected) or any(tensors[n].shape != expected[n].shape for n in expected):
        got = {n: tuple(t.shape) for n, t in tensors.items()}
        want = {n: tuple(t.shape) for n, t in expected.items()}
        raise UserError(f"{wpath} does not match its config.json (tensors {got}, expected {want}): retrain the head")
    head.load_state_dict(tensors, strict=True)
    if lm_head_weight is not None and head.needs_lm_head:
        head.attach_lm_head(lm_head_weight)
    if device is not None:
        head.to(device)
    head.eval()
    return head, config


@torch.no_grad()
def rewrite_topk(head: nn.Module, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A head on live rows of logits (or log-probs) (R,V) -> (ids (R,k) long, new top-k values (R,k), in the
    dtype of ``logits``): the rule every live use shares (the HF and vLLM processors, lm-eval).

        ids, v = topk(z, k);  m = logsumexp(v);  z[ids] = m + head(v, ids, logits=z)

    Tokens outside the top-k keep their values and the top-k's total mass is unchanged, so after a
    log-softmax the top-k holds the head's distribution times the original top-k mass. Top-k entries that
    are -inf (masked by a grammar or a bad-words list) stay -inf: a head never revives a removed token.
    Write back with ``logits.scatter_(1, ids, new)``."""
    z = logits.float()
    vals, ids = z.topk(head.k, dim=-1)  # (R,k)
    lse = torch.logsumexp(vals, dim=-1, keepdim=True)  # (R,1) log top-k mass (+ the vocab normaliser)
    ctx = z if head.needs_lm_head else None  # a contextual head reads the whole row
    out = head(vals, ids, None, ctx)  # (R,k) log-probs over the top-k
    new = torch.where(torch.isfinite(vals), lse + out, vals)
    return ids, new.to(logits.dtype)


def gate_mask(ids: torch.Tensor, gate_ids: torch.Tensor) -> torch.Tensor:
    """(R,k) top-k ids, (G,) gate vocabulary -> (R,) bool: the ``gated`` mode's rule (>= 2 gate tokens): the
    top-k holds at least two tokens of the head's category vocabulary (serving, the unrelated-prompts KL)."""
    return torch.isin(ids, gate_ids.to(ids.device)).sum(dim=-1) >= 2


# ---------------------------------------------------------------------------------------------
# diagnostics


@torch.no_grad()
def flatness(
    head: nn.Module,
    topk_logprobs: torch.Tensor,
    topk_ids: torch.Tensor | None = None,
    hidden: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
) -> dict[str, float]:
    """How much of a head's effect is only flattening, on a batch (means over rows).

    entropy_in/out: entropy (nats) of the renormalised top-k and of the head's output; max_entropy =
    log k. kl_uniform_in/out: KL(p || uniform) = log k - H(p) (0 = perfectly flat).
    flat_share: fraction of the input's distance to uniform the head removed
    (1 - kl_uniform_out / kl_uniform_in; 1 = output is uniform, 0 = as peaked as the input).
    kl_out_in: KL(out || in), how far the head moved the distribution at all.
    argmax_kept: fraction of rows whose top token is unchanged.
    """
    lp_in = renormalise(topk_logprobs)
    lp_out = head(topk_logprobs, topk_ids=topk_ids, hidden=hidden, logits=logits).float()
    k = lp_in.shape[-1]
    h_in = -(lp_in.exp() * lp_in).sum(-1)
    h_out = -(lp_out.exp() * lp_out).sum(-1)
    kl_in, kl_out = math.log(k) - h_in, math.log(k) - h_out
    kl_oi = (lp_out.exp() * (lp_out - lp_in)).sum(-1)
    return {
        "entropy_in": h_in.mean().item(),
        "entropy_out": h_out.mean().item(),
        "max_entropy": math.log(k),
        "kl_uniform_in": kl_in.mean().item(),
        "kl_uniform_out": kl_out.mean().item(),
        "flat_share": (1.0 - kl_out.mean() / kl_in.mean().clamp_min(1e-12)).item(),
        "kl_out_in": kl_oi.mean().item(),
        "argmax_kept": (lp_in.argmax(-1) == lp_out.argmax(-1)).float().mean().item(),
    }


def num_parameters(head: nn.Module) -> int:
    """Trainable parameter count."""
    return sum(p.numel() for p in head.parameters() if p.requires_grad)


class HeadMethod(Method):
    """A head behind the methods protocol: it redistributes the base's top-k mass over the same k slots."""

    kind: ClassVar[str] = "head"

    def __init__(self, head: nn.Module, name: str | None = None, config: dict[str, Any] | None = None):
        self.head, self.name = head, name or getattr(head, "variant", "head")
        self.config = dict(config or {})  # the saved head's config.json (training summary, gate vocabulary, ...)

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, name: str | None = None, **kw) -> "HeadMethod":
        """A saved head (directory or hub repo id; ``load_head``'s checks and keywords)."""
        head, config = load_head(name_or_path, **kw)
        return cls(head, name, config)

    def logprobs(self, base: Scores) -> torch.Tensor:
        """(M,k) the head's log-probs over the base's top-k slots."""
        hidden = None if base.hidden is None else torch.as_tensor(base.hidden)
        with torch.no_grad():
            return self.head(torch.as_tensor(base.topk_logprobs), topk_ids=torch.as_tensor(base.topk_ids),
                             hidden=hidden)

    def apply(self, base: Scores, own: dict[str, Scores] | None = None) -> Output:
        return Output.from_topk(self.logprobs(base), base)

    @property
    def trainable_params(self) -> int:
        return num_parameters(self.head)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "variant": getattr(self.head, "variant", None)}

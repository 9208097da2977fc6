"""The gate head: equalise the two names where the context leaves the answer open, and nowhere else.

Why this shape. On a real instruct model (Qwen2.5-Coder-1.5B) the bias is natural: it differs name by
name and attribute by attribute, and the model's answers to *specified* questions (the context says
who) are not near-certain, so a head that reads only the top-k's confidence cannot tell an open
question from a decided one (the landed ``logit``/``slot`` heads moved μ by -13% / -14% there). What
separates them is in the model's final hidden state h at the answer slot: a linear read-out of h tells
open from specified questions on unseen names, attributes and templates. And what removes the bias is
known exactly: make the two names equally likely. So the head is

    s    = w . (h - mean) / scale + b                  a linear gate on the standardised hidden state
    g    = sigmoid(s) * [two names in the top-k]       how open the model finds the question (B,)
    A, B = the top-k slots of the first and the second name (from the category vocabulary, below)
    p'_A = p_A + g (m - p_A),  p'_B = p_B + g (m - p_B),  m = (p_A + p_B) / 2

where p_A is the total top-k mass of the first name's slots: each slot of a name is scaled by the same
factor, the two names' total mass is unchanged, every other slot keeps its probability. g = 1 removes
the name preference (C = 0), g = 0 is the identity. Trainable: w (d,) and b, 1 + d parameters.

Who is who, at serving time. A logits processor sees the top-k ids but not which two subjects the
prompt names. The category vocabulary (the word lists' names, group nouns and pronouns,
``refine_llm.vocab.gate_vocabulary``) maps each token to the words it is a first token of ("Marg" ->
Margaret). The first name is the word set of the highest top-k slot that has one; the second is the
highest slot whose words are disjoint from the first's; a slot belongs to a name when its words meet
that name's words (and not the other's). So " Margaret" and "Marg" are one name, never equalised
against each other, and rows without two names in the top-k are left alone (g = 0 there): unrelated
prompts pass through untouched.

Training (``refine_llm.stages.train.train_gate``, ``fit_gate``): ``fit_probe`` fits w, b by L2-regularised
logistic regression of open (underspecified) vs decided (specified) train questions on standardised h, for
each ridge penalty of a small grid; validation μ picks the penalty, the gate is refit on train + validation
(more subjects) and sharpened. It is fitted, not bandit-trained: fine-tuning w, b with the bandit trainer
on the main job's objective (``refine_llm.rewards``) lowered validation μ but not test μ on the 1.5B default
(it fits the validation names), so the closed-form fit is the head. The ``probe`` baseline is the same
gate fit on the train split alone with one penalty, opened fully (hard) where it says open.

Serving from logits. vLLM's logits processors see the logits row z = W_out h (+ any constant shift),
not h. h is recovered exactly by least squares on [W_out, 1] (V >> d), so the gate is a linear function
of z: s = v . z + c with v = P^T w_eff (V,), P the first d rows of pinv([W_out, 1]). ``export_logit_gate``
computes v, c once (a (d+1)^2 Gram solve) and saves them, so a served head needs no W_out and no (V, d)
matrix; the shift column makes v orthogonal to constant shifts of z (raw logits or log-probs give the
same gate). tests/test_gate_head.py checks that hidden= and logits= give the same output.
"""

from __future__ import annotations

import torch
from torch import nn

from refine_llm.errors import UserError
from refine_llm.methods.topk import NEG as _NEG
from refine_llm.methods.topk import renormalise
from refine_llm.probes import fit_logistic

__all__ = ["GateCore", "LogitSpace", "name_groups", "equalise_groups", "fit_gate"]



def name_groups(topk_ids: torch.Tensor, order: torch.Tensor, lookup: torch.Tensor,
                membership: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The slots of the first and second name in each row's top-k.

    topk_ids (B,k) long; order (B,k) long: slot indices from most to least likely; lookup (V,) long:
    token id -> row of ``membership`` (0 = not a vocabulary token); membership (G+1, W) bool: which
    words each vocabulary token is a first token of (row 0 all False).
    Returns A, B (B,k) bool and ok (B,) bool (two names found)."""
    ids = topk_ids.long().clamp(0, lookup.shape[0] - 1)
    mem = membership[lookup[ids]]  # (B,k,W)
    mem = mem.gather(1, order.unsqueeze(-1).expand_as(mem))  # slots in order of probability
    has = mem.any(-1)  # (B,k)
    rows = torch.arange(len(ids), device=ids.device)
    first = has.float().argmax(-1)  # first slot (by probability) that names someone
    w1 = mem[rows, first] & has.any(-1, keepdim=True)  # (B,W)
    in1 = (mem & w1.unsqueeze(1)).any(-1)  # (B,k)
    cand2 = has & ~in1
    ok = cand2.any(-1)
    w2 = mem[rows, cand2.float().argmax(-1)] & ok.unsqueeze(-1)
    in2 = (mem & w2.unsqueeze(1)).any(-1)
    a_sorted, b_sorted = in1 & ~in2, in2 & ~in1
    # back to the original slot positions
    A = torch.zeros_like(a_sorted).scatter(1, order, a_sorted)
    B = torch.zeros_like(b_sorted).scatter(1, order, b_sorted)
    return A, B, ok


def equalise_groups(lp: torch.Tensor, A: torch.Tensor, B: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B,k) renormalised log-probs with the masses of slot groups A and B moved toward their mean by
    g (B,) in [0, 1]; differentiable in g. Each slot of a group is scaled by the same factor."""
    p = lp.exp()
    pa, pb = (p * A).sum(-1), (p * B).sum(-1)  # (B,)
    m = 0.5 * (pa + pb)
    la = torch.log(pa.clamp_min(1e-30))
    lb = torch.log(pb.clamp_min(1e-30))
    # log of the new group mass: p + g (m - p), computed in log space for the scale factor
    na = torch.log((pa + g * (m - pa)).clamp_min(1e-30))
    nb = torch.log((pb + g * (m - pb)).clamp_min(1e-30))
    shift = torch.where(A, (na - la).unsqueeze(-1), torch.where(B, (nb - lb).unsqueeze(-1), torch.zeros_like(lp)))
    shift = torch.where((A & (pa > 0).unsqueeze(-1)) | (B & (pb > 0).unsqueeze(-1)), shift, torch.zeros_like(lp))
    return lp + shift


class LogitSpace:
    """Least-squares recovery of the hidden state from a logits row: h = P z for z = W_out h + c 1.

    Holds the Cholesky factor of the Gram matrix of A = [W_out, 1] (V, d+1), computed once per model
    in float64 (a (d+1)^2 matrix; the (V, d+1) product is accumulated in chunks of rows), so that
    ``logit_weights(w)`` = A (A^T A)^-1 [w; 0] (V,) costs one triangular solve and one mat-vec."""

    def __init__(self, lm_head_weight: torch.Tensor, chunk: int = 16384):
        W = lm_head_weight.detach()
        V, d = W.shape
        G = torch.zeros(d + 1, d + 1, dtype=torch.float64)
        for a in range(0, V, chunk):
            Ac = torch.cat([W[a:a + chunk].double(), torch.ones(min(chunk, V - a), 1, dtype=torch.float64)], 1)
            G += Ac.T @ Ac
        self.W, self.V, self.d = W, V, d
        self.L = torch.linalg.cholesky(G)

    def logit_weights(self, w: torch.Tensor) -> torch.Tensor:
        """(d,) weights on h -> (V,) float32 weights v on the logits row with v . z = w . h."""
        rhs = torch.cat([w.detach().double().cpu(), torch.zeros(1, dtype=torch.float64)]).unsqueeze(-1)
        x = torch.cholesky_solve(rhs, self.L).squeeze(-1)  # (d+1,)
        return (self.W.double() @ x[: self.d] + x[self.d]).float()


class GateCore(nn.Module):
    """Equalise the two names by a linear gate on the hidden state (module docstring); registered, with
    save/load, as ``refine_llm.methods.heads.GateHead``.

    Parameters: w (d,), b (1,). Buffers (saved): mean, scale (d,) of the train split's hidden states;
    lookup (V,) int and membership (G+1, W) bool, the category vocabulary's token -> words table;
    logit_w (V,), logit_b (1,): the same gate as a function of the logits row (``export_logit_gate``).
    """

    ARCH_FIELDS = ("n_words", "n_tokens")  # config.json fields that size the vocabulary table's buffers

    def __init__(self, k: int, rank: int | None, vocab_size: int, hidden_size: int, lm_head_weight=None,
                 seed: int = 0, n_words: int = 1, n_tokens: int = 0):
        super().__init__()
        self.k, self.vocab_size, self.hidden_size = k, vocab_size, hidden_size
        self.rank = None
        self.w = nn.Parameter(torch.zeros(hidden_size))
        self.b = nn.Parameter(torch.zeros(1))
        self.register_buffer("mean", torch.zeros(hidden_size))
        self.register_buffer("scale", torch.ones(hidden_size))
        self.register_buffer("lookup", torch.zeros(vocab_size, dtype=torch.int32))
        self.register_buffer("membership", torch.zeros(n_tokens + 1, n_words, dtype=torch.bool))
        self.register_buffer("logit_w", torch.zeros(vocab_size))
        self.register_buffer("logit_b", torch.zeros(1))
        self.register_buffer("exported", torch.zeros((), dtype=torch.bool))
        # hard: g = 1[s > 0], equalise fully where the probe says open (the ``probe`` baseline's rule)
        self.register_buffer("hard", torch.zeros((), dtype=torch.bool))

    # ----------------------------------------------------------------------- setup

    def attach_lm_head(self, lm_head_weight: torch.Tensor) -> None:
        """Nothing to keep: the gate reads the hidden state (training) or the logits row (serving,
        ``export_logit_gate``), never W_out itself."""

    @property
    def n_words(self) -> int:
        return int(self.membership.shape[1])

    @property
    def n_tokens(self) -> int:
        return int(self.membership.shape[0]) - 1

    @torch.no_grad()
    def set_vocabulary(self, token_ids, membership) -> None:
        """The category vocabulary: ``token_ids`` (G,) and ``membership`` (G, W) bool, which words each
        token is a first token of (``refine_llm.vocab.gate_vocabulary``). Replaces the buffers' shapes."""
        ids = torch.as_tensor(list(token_ids), dtype=torch.long)
        mem = torch.as_tensor(membership, dtype=torch.bool)
        if mem.ndim != 2 or mem.shape[0] != len(ids):
            raise UserError(f"membership must be (G, W) for G={len(ids)} token ids, got {tuple(mem.shape)}")
        if len(ids) and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise UserError(f"category token ids must lie in [0, {self.vocab_size}): use this model's tokenizer")
        self.lookup = torch.zeros(self.vocab_size, dtype=torch.int32)
        self.lookup[ids] = torch.arange(1, len(ids) + 1, dtype=torch.int32)
        self.membership = torch.cat([torch.zeros(1, mem.shape[1], dtype=torch.bool), mem], 0)

    @torch.no_grad()
    def fit_probe(self, hidden: torch.Tensor, is_open: torch.Tensor, l2: float = 1.0, max_iter: int = 200) -> dict:
        """Logistic regression of ``is_open`` (N,) bool on standardised ``hidden`` (N,d)
        (``refine_llm.probes.fit_logistic``: a sum of log-losses + l2/2 |w|^2): sets mean, scale, w, b.
        Returns {train_accuracy, n, l2}."""
        probe = fit_logistic(hidden, is_open, l2=l2, max_iter=max_iter, min_scale=1e-4, what="the gate's probe")
        self.mean.copy_(probe.mean)
        self.scale.copy_(probe.scale)
        self.w.copy_(probe.w)
        self.b.fill_(probe.b)
        acc = float(((probe.score(hidden) > 0).float() == is_open.float()).float().mean())
        self.exported.fill_(False)
        return {"train_accuracy": acc, "n": int(len(is_open)), "l2": l2}

    @torch.no_grad()
    def export_logit_gate(self, space: LogitSpace) -> None:
        """Fold the standardisation into the gate and express it on the logits row (module docstring)."""
        if (space.V, space.d) != (self.vocab_size, self.hidden_size):
            raise UserError(f"the logit space is for a ({space.V}, {space.d}) output embedding, this head for "
                            f"({self.vocab_size}, {self.hidden_size}): pass this model's lm_head weight")
        w_eff = self.w / self.scale  # s = w_eff . h + b_eff
        b_eff = self.b - (w_eff * self.mean).sum()
        self.logit_w.copy_(space.logit_weights(w_eff))
        self.logit_b.copy_(b_eff)
        self.exported.fill_(True)

    # ----------------------------------------------------------------------- forward

    def gate(self, hidden: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> torch.Tensor:
        """(B,) sigmoid gate from the hidden state (B,d) (training) or the logits row (B,V) (serving)."""
        if hidden is not None:
            s = ((hidden.float() - self.mean) / self.scale) @ self.w + self.b
        elif logits is not None:
            if not bool(self.exported):
                raise UserError("this gate head was not exported for serving (export_logit_gate): retrain or "
                                "re-save it with the pipeline")
            z = logits.float()[:, : self.vocab_size]  # vLLM may pad the vocabulary
            if z.shape[-1] != self.vocab_size:
                raise ValueError(f"logits must have >= {self.vocab_size} columns, got {logits.shape[-1]}")
            z = torch.nan_to_num(z, nan=0.0, neginf=_NEG, posinf=-_NEG)
            s = z @ self.logit_w + self.logit_b
        else:
            raise ValueError("the gate head needs hidden= (B,d) or logits= (B,V)")
        return (s > 0).float() if bool(self.hard) else torch.sigmoid(s)

    @torch.no_grad()
    def sharpen(self, factor: float) -> None:
        """Multiply the gate's logit by ``factor`` (before ``export_logit_gate``): a sharper gate."""
        self.w.mul_(factor)
        self.b.mul_(factor)
        self.exported.fill_(False)

    def forward(self, topk_logprobs, topk_ids=None, hidden=None, logits=None):
        if topk_logprobs.ndim != 2 or topk_logprobs.shape[-1] != self.k:
            raise ValueError(f"topk_logprobs must have shape (B, {self.k}), got {tuple(topk_logprobs.shape)}")
        if topk_ids is None:
            raise ValueError("the gate head needs topk_ids (B,k) to find the two names")
        lp = renormalise(topk_logprobs)  # (B,k)
        order = lp.argsort(dim=-1, descending=True)
        A, B, ok = name_groups(topk_ids, order, self.lookup.long(), self.membership)
        g = self.gate(hidden=hidden, logits=logits) * ok.float()  # (B,)
        return equalise_groups(lp, A, B, g)


def fit_gate(head: GateCore, train: tuple[torch.Tensor, torch.Tensor], val_mu, l2_grid: list[float], *,
             refit: tuple[torch.Tensor, torch.Tensor] | None = None, sharpness: float = 1.0) -> dict:
    """The gate head's training (``refine_llm.stages.train``): fit the probe on ``train`` = (hidden (N,d),
    is_open (N,) bool) for each ridge penalty of ``l2_grid``, keep the one with the lowest ``val_mu(head)``
    (μ on validation, with ``sharpness`` applied), then, when ``refit`` = (hidden, is_open) of train +
    validation is given, fit again on it with that penalty; finally sharpen. Returns a JSON-able summary.

    Why refit: the probe must generalise to unseen subjects, and validation adds subjects that train lacks
    (religion's train split holds 7); validation has then only chosen the penalty (README, "Results on the
    embedded default")."""
    tried = []
    for l2 in l2_grid:
        info = head.fit_probe(*train, l2=l2)
        head.sharpen(sharpness)
        tried.append({"l2": l2, "train_accuracy": info["train_accuracy"], "val_mu": float(val_mu(head))})
    best = min(tried, key=lambda t: t["val_mu"])
    data = refit if refit is not None else train
    info = head.fit_probe(*data, l2=best["l2"])
    head.sharpen(sharpness)
    return {"l2_grid": tried, "l2": best["l2"], "refit_on_validation": refit is not None, "n": info["n"],
            "fit_accuracy": info["train_accuracy"], "sharpness": sharpness}

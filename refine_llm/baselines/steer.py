"""Activation steering in the manner of FairSteer (Li et al. 2025, arXiv 2504.14492), at the answer slot.

FairSteer has three steps: a linear probe on one middle layer's last-token activation detects a biased
answer (BAD); a debiasing steering vector (DSV) is the mean activation difference between unbiased and
biased answers; at inference the vector is added at that layer only where the probe fires (DAS).
Here, for UnQover questions:

Label (``bias_labels``). FairSteer labels BBQ's ambiguous items by whether the model picked the
"unknown" option. UnQover has no such option: the unbiased answer to "Mary got off the flight to visit
John. Who was a nurse?" is 50/50 between the names. So a row's *commitment* is
``|P(subj1) - P(subj2)| / (P(subj1) + P(subj2))`` (top-k renormalised, as the metrics read it), and
among underspecified rows the top third by commitment are "biased" (the model decides with no evidence)
and the bottom third "unbiased" (it stays near 50/50); the middle third is left out, so the two classes
are apart. Specified rows ("Mary, who was a nurse, ...") are negatives for the probe (it must not fire
where the context decides: a committed answer there is right) but stay out of the vector's means, which
compare underspecified rows only (so the vector is "decided -> undecided", not "specified -> not").
Per-row commitment also counts a positional habit (always the first name), which C cancels; firing there
costs nothing that is measured and is what a per-prompt probe can see. Thresholds come from the train
split and are applied unchanged to validation (stored in the artifact).

Vector (``steering_vector``). The direction is FairSteer's DSV: mean activation of unbiased rows minus
mean of biased rows, at the chosen layer. A constant vector cannot push "nurse" towards John and
"engineer" towards Mary at once; what it can carry is the shift from a committed state to an undecided
one, and the difference of class means is the least-squares shift between the two classes (it
outperforms the probe's weight direction as an intervention in the linear-representation literature,
e.g. Marks & Tegmark 2023). Its length is set to the layer's mean activation norm on the train rows, so
``strength`` is a fraction of the residual stream's size (the coefficient convention of ActAdd-style
steering), not a multiple of the class-mean gap: on Qwen2.5-Coder-1.5B (layer 11, gender) the gap is
0.22 against activations of norm 34, and moving by 1 to 64 gaps moved mean|C| by under 10% (KL on
underspecified rows <= 0.006; eval/methods_smoke.py); comparable strengths across layers and models need
the norm scale.

Positions. The vector is added at the layer's output at each row's answer position only (its last
prompt token; in generation, each new token's position), where the probe reads: (1) the probe was
trained on that position's activation; (2) the context's positions are how the model reads who did
what, and changing them would harm specified questions; (3) the shared few-shot prefix keeps the base
model's KV, so the prefix cache stays exact and steering costs no extra forward pass (the probe and
the add run inside the one forward). Mechanics: refine_llm.baselines.hooks.

Layer and strength (validation). The layer is the candidate whose probe has the highest balanced
accuracy on cached validation activations (``choose_layer``); the strength is the one with the lowest
mean|C| on a small validation subset among those with KL(base || steered) on specified rows <= max_kl
and a P(gold) share drop <= max_gold_drop (``choose_strength``; 0 when none qualifies).

Artifact (``Steering``): probe weight (d,), bias (1,) and vector (d,) in model.safetensors, the layer,
strength, threshold, label thresholds, hidden size, layer count and tokenizer fingerprint in config.json,
and a model card; ``from_pretrained`` refuses another tokenizer, hidden size or layer count.

vLLM. A logits processor sees only the final logits (B, V) after every layer has run: the probe needs
layer l's activation and the vector must change layer l's output before layers l+1.. run, which no
function of the logits reproduces. Serving it would take a model-side change: an out-of-tree model class
(vLLM's ModelRegistry plugin) whose decoder layer l applies probe + vector to each sequence's last
token of the step (the flattened batch's positions from the forward context's query_start_loc).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from refine_llm.errors import UserError
from refine_llm.io import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, write_artifact
from refine_llm.probes import fit_logistic

__all__ = ["SteerConfig", "Steering", "candidate_layers", "commitment", "bias_labels", "train_probe",
           "balanced_accuracy", "choose_layer", "mean_difference", "steering_vector", "choose_strength", "FORMAT"]

FORMAT = "refine_llm.steer"
FORMAT_VERSION = 1


@dataclass
class SteerConfig:
    """How the steering probe, vector, layer and strength are learned (train split) and chosen (validation)."""

    layers: tuple[int, ...] | None = field(
        default=None, metadata={"help": "Candidate decoder layers (0-based); None: up to max_candidate_layers "
                                        "spread over the middle half of the model."})
    max_candidate_layers: int = field(default=8, metadata={"help": "Candidates when layers is None."})
    label_quantile: float = field(
        default=1 / 3, metadata={"help": "Share of underspecified train rows labelled biased (most committed) "
                                         "and unbiased (least committed); the middle is left out."})
    probe_l2: float = field(default=1e-2, metadata={"help": "L2 penalty of the logistic probe (standardised "
                                                            "activations, class-balanced loss)."})
    probe_iters: int = field(default=100, metadata={"help": "L-BFGS iterations of the probe."})
    threshold: float = field(default=0.5, metadata={"help": "The probe fires where P(biased) > threshold."})
    strengths: tuple[float, ...] = field(
        default=(0.5, 1.0, 2.0), metadata={"help": "Strengths tried on validation, as fractions of the layer's mean "
                                                   "activation norm (0 is always a candidate)."})
    max_kl: float = field(default=0.02, metadata={"help": "Largest mean KL(base || steered) on specified "
                                                          "validation questions a strength may cost."})
    max_gold_drop: float = field(default=0.01, metadata={"help": "Largest drop of the P(gold) share on "
                                                                 "specified validation questions."})
    strength_tuples: int = field(default=8, metadata={"help": "Validation 4-tuples (with their specified "
                                                              "questions) the strength is chosen on."})
    max_specified: int | None = field(default=None, metadata={"help": "Specified rows per split fed to the "
                                                                      "probe (None: all)."})
    seed: int = field(default=0, metadata={"help": "Seed of the subsets."})

    def __post_init__(self) -> None:
        if not 0 < self.label_quantile <= 0.5:
            raise ValueError(f"label_quantile must be in (0, 0.5], got {self.label_quantile}")
        if not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if any(s < 0 for s in self.strengths):
            raise ValueError(f"strengths must be >= 0, got {self.strengths}")
        if self.layers is not None:
            self.layers = tuple(int(x) for x in self.layers)


# ----------------------------------------------------------------------------- labels


def candidate_layers(num_layers: int, max_layers: int = 8) -> list[int]:
    """Up to ``max_layers`` layers evenly spread over the middle half [L/4, 3L/4] (FairSteer: bias is
    most separable in the middle layers)."""
    lo, hi = num_layers // 4, max(num_layers // 4, (3 * num_layers) // 4)
    span = list(range(lo, hi + 1))
    stride = max(1, math.ceil(len(span) / max_layers))
    return span[::stride][:max_layers]


def commitment(p_topk) -> np.ndarray:
    """(M,) |P(subj1) - P(subj2)| / (P(subj1) + P(subj2)) from (M, 2) candidate probabilities; NaN
    where neither candidate has probability (the row says nothing)."""
    p = np.asarray(p_topk, dtype=np.float64)
    tot = p[:, 0] + p[:, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(tot > 0, np.abs(p[:, 0] - p[:, 1]) / np.where(tot > 0, tot, 1.0), np.nan)


def bias_labels(specified, p_topk, quantile: float = 1 / 3,
                thresholds: tuple[float, float] | None = None) -> dict[str, Any]:
    """Probe labels and vector groups of M rows (see the module docstring).

    Returns ``y`` (M,) int8: 1 biased (committed underspecified), 0 not (balanced underspecified, or any
    specified row), -1 unused; ``group`` (M,) int8: 1 committed / 0 balanced underspecified, -1 other
    (the vector's classes); ``thresholds`` (lo, hi) of commitment (computed here when not given)."""
    spec = np.asarray(specified, dtype=bool)
    c = commitment(p_topk)
    under = ~spec & np.isfinite(c)
    if thresholds is None:
        if under.sum() < 2:
            raise UserError(f"steering needs underspecified rows with a candidate in the top-k to label, got "
                            f"{int(under.sum())}: score more questions")
        lo, hi = (float(np.quantile(c[under], quantile)), float(np.quantile(c[under], 1 - quantile)))
        if not lo < hi:
            raise UserError(f"every underspecified answer is equally committed ({lo:.3f}): no biased/unbiased "
                            "rows to tell apart; the model may answer at chance (use another model or prompt)")
    else:
        lo, hi = thresholds
    group = np.full(len(c), -1, dtype=np.int8)
    group[under & (c >= hi)] = 1
    group[under & (c <= lo) & (group != 1)] = 0
    y = np.where(group >= 0, group, np.where(spec, 0, -1)).astype(np.int8)
    return {"y": y, "group": group, "thresholds": (lo, hi)}


# ----------------------------------------------------------------------------- probe and vector


def train_probe(x, y, l2: float = 1e-2, iters: int = 100) -> tuple[np.ndarray, float]:
    """P(biased | x) = sigmoid(w.x + b) on (N, d) activations and (N,) {0, 1} labels
    (``refine_llm.probes.fit_logistic``): standardised features, class-balanced loss (each class weighs
    1/2), L2 ``l2`` on w, full-batch L-BFGS (deterministic). Returns (w (d,) float32, b) for raw
    activations (standardisation folded in)."""
    probe = fit_logistic(np.asarray(x), np.asarray(y), l2=l2, max_iter=iters, balanced=True, min_scale=1e-6,
                         what="the steering probe")
    w_raw, b_raw = probe.raw()
    return w_raw.numpy().astype(np.float32), b_raw


def balanced_accuracy(y_true, y_pred) -> float:
    """Mean of the true-positive and true-negative rates (chance: 0.5 whatever the class balance)."""
    y, p = np.asarray(y_true, dtype=bool), np.asarray(y_pred, dtype=bool)
    if not y.any() or y.all():
        return float("nan")
    return float(0.5 * ((p[y]).mean() + (~p[~y]).mean()))


def _auc(y_true, score) -> float:
    from scipy.stats import rankdata

    y = np.asarray(y_true, dtype=bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if not n1 or not n0:
        return float("nan")
    r = rankdata(np.asarray(score, dtype=np.float64))
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def choose_layer(train_x, train_y, val_x, val_y, layers: list[int], val_specified=None, l2: float = 1e-2,
                 iters: int = 100, threshold: float = 0.5) -> tuple[int, list[dict], list[tuple[np.ndarray, float]]]:
    """Train one probe per candidate layer (train_x (N, L, d), labels (N,) {0, 1}) and pick the layer
    with the highest balanced accuracy on validation (val_x (Nv, L, d)); ties: higher AUC, then the
    earlier layer. Returns (index into ``layers``, one row per layer, the probes [(w, b)])."""
    cut = math.log(threshold / (1 - threshold)) if 0 < threshold < 1 else (-math.inf if threshold == 0 else math.inf)
    vs = np.asarray(val_specified, dtype=bool) if val_specified is not None else None
    table, probes = [], []
    for j, layer in enumerate(layers):
        w, b = train_probe(train_x[:, j], train_y, l2=l2, iters=iters)
        s_tr, s_va = train_x[:, j] @ w + b, val_x[:, j] @ w + b
        row = {"layer": int(layer), "train_balanced_accuracy": balanced_accuracy(train_y, s_tr > cut),
               "val_balanced_accuracy": balanced_accuracy(val_y, s_va > cut), "val_auc": _auc(val_y, s_va)}
        if vs is not None and vs.any():
            row["val_fire_rate_specified"] = float((s_va[vs] > cut).mean())
        table.append(row)
        probes.append((w, b))
    key = lambda j: (np.nan_to_num(table[j]["val_balanced_accuracy"], nan=-1.0),
                     np.nan_to_num(table[j]["val_auc"], nan=-1.0), -j)
    best = max(range(len(layers)), key=key)
    return best, table, probes


def mean_difference(x, group) -> np.ndarray:
    """FairSteer's DSV: mean of the unbiased rows (group 0) minus mean of the biased rows (group 1), (d,)."""
    x, g = np.asarray(x, dtype=np.float64), np.asarray(group)
    if not (g == 0).any() or not (g == 1).any():
        raise UserError(f"the steering vector needs balanced and committed underspecified rows, got "
                        f"{int((g == 0).sum())} and {int((g == 1).sum())}: score more train questions")
    return (x[g == 0].mean(0) - x[g == 1].mean(0)).astype(np.float32)


def steering_vector(x, group) -> tuple[np.ndarray, dict[str, float]]:
    """The vector added at strength 1: the DSV's direction (``mean_difference``) scaled to the mean
    activation norm of the rows ``x`` (N, d). Returns it and {dsv_norm, activation_norm}."""
    dsv = mean_difference(x, group)
    n_dsv = float(np.linalg.norm(dsv))
    scale = float(np.linalg.norm(np.asarray(x, dtype=np.float64), axis=1).mean())
    if not n_dsv > 0:
        raise UserError("the balanced and committed rows have the same mean activation: no steering direction")
    return (dsv / n_dsv * scale).astype(np.float32), {"dsv_norm": n_dsv, "activation_norm": scale}


def choose_strength(table: list[dict], max_kl: float, max_gold_drop: float) -> float:
    """The strength of ``table`` (rows: strength, mean_abs_c, kl_base, gold_share; the row of strength 0
    is the base) with the lowest mean|C| among those within the KL and P(gold) budgets; 0 when none
    beats the base within them."""
    base = next((r for r in table if r["strength"] == 0), None)
    if base is None:
        raise ValueError("choose_strength needs the strength-0 (base) row")
    ok = [r for r in table if r["strength"] == 0 or (
        r["kl_base"] is not None and r["kl_base"] <= max_kl
        and (base["gold_share"] is None or r["gold_share"] is None or base["gold_share"] - r["gold_share"] <= max_gold_drop)
        and r["mean_abs_c"] is not None and np.isfinite(r["mean_abs_c"]))]
    best = min(ok, key=lambda r: (r["mean_abs_c"], r["strength"]))
    return float(best["strength"])


# ----------------------------------------------------------------------------- the artifact


class Steering(nn.Module):
    """A learned probe + steering vector at one decoder layer (see the module docstring).

        steer = Steering.from_pretrained("runs/qwen/methods/steer", tokenizer=tok, model=model)
        with steer.apply(model):          # scoring.score / passes.score_at_ids / model.generate
            ...
    """

    variant = "steer"

    def __init__(self, hidden_size: int, layer: int, strength: float = 1.0, threshold: float = 0.5,
                 num_layers: int | None = None):
        super().__init__()
        self.hidden_size, self.layer, self.num_layers = int(hidden_size), int(layer), num_layers
        self.strength, self.threshold = float(strength), float(threshold)
        self.register_buffer("probe_weight", torch.zeros(hidden_size))
        self.register_buffer("probe_bias", torch.zeros(1))
        self.register_buffer("vector", torch.zeros(hidden_size))
        self.meta: dict[str, Any] = {}
        self.stats = {"rows": 0, "fired": 0}
        self.fired: list[torch.Tensor] = []  # per hooked forward call: (n,) bool, which rows the probe fired on

    @classmethod
    def from_arrays(cls, probe_weight, probe_bias: float, vector, layer: int, strength: float = 1.0,
                    threshold: float = 0.5, num_layers: int | None = None) -> "Steering":
        w = torch.as_tensor(np.asarray(probe_weight), dtype=torch.float32)
        s = cls(w.numel(), layer, strength, threshold, num_layers)
        s.probe_weight.copy_(w)
        s.probe_bias.fill_(float(probe_bias))
        s.vector.copy_(torch.as_tensor(np.asarray(vector), dtype=torch.float32))
        return s

    def probe_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(n, d) activations -> (n,) float32 logit of P(biased)."""
        return h.float() @ self.probe_weight.to(h.device) + self.probe_bias.to(h.device)

    def fires(self, h: torch.Tensor) -> torch.Tensor:
        """(n,) bool: P(biased) > threshold (threshold 0: always; 1: never)."""
        if self.threshold <= 0:
            return torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
        if self.threshold >= 1:
            return torch.zeros(h.shape[0], dtype=torch.bool, device=h.device)
        return self.probe_logits(h) > math.log(self.threshold / (1 - self.threshold))

    def steer(self, h: torch.Tensor) -> torch.Tensor | None:
        """The hook's function: (n, d) answer-position activations -> new ones, or None (untouched) when
        the strength is 0 or the probe fires on no row."""
        f = self.fires(h)  # (n,)
        n = int(f.sum())
        self.stats["rows"] += int(h.shape[0])
        self.stats["fired"] += n
        self.fired.append(f.cpu())
        if self.strength == 0 or not n:
            return None
        out = h.float()  # (n, d); rows that do not fire come back as they were (exact bf16 <-> fp32 round trip)
        out[f] = out[f] + self.strength * self.vector.to(out.device)
        return out

    @contextmanager
    def apply(self, model):
        """Steer every forward of ``model`` inside the block (scoring, score_at_ids, generate). ``stats``
        counts the answer positions seen and fired on (also at strength 0, which changes nothing), and
        ``fired`` holds each call's (n,) fire mask: for scoring passes, ``torch.cat(fired)`` lines up with
        the rows."""
        from refine_llm.baselines.hooks import answer_hooks, decoder_layers

        n = len(decoder_layers(model))
        if self.num_layers is not None and n != self.num_layers:
            raise UserError(f"this steering was learned on a model with {self.num_layers} layers, not {n}: "
                            "load it with the model it was trained on")
        self.stats, self.fired = {"rows": 0, "fired": 0}, []
        with answer_hooks(model, {self.layer: self.steer}):
            yield self

    def with_strength(self, strength: float) -> "Steering":
        """A copy at another strength (same probe and vector)."""
        s = Steering.from_arrays(self.probe_weight.numpy(), float(self.probe_bias[0]), self.vector.numpy(), self.layer,
                                 strength, self.threshold, self.num_layers)
        s.meta = dict(self.meta)
        return s

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {"probe_weight": self.probe_weight.detach().cpu().float().contiguous(),
                "probe_bias": self.probe_bias.detach().cpu().float().contiguous(),
                "vector": self.vector.detach().cpu().float().contiguous()}

    def arch(self) -> dict[str, Any]:
        return {"variant": self.variant, "hidden_size": self.hidden_size, "layer": self.layer,
                "num_layers": self.num_layers, "strength": self.strength, "threshold": self.threshold}

    @property
    def fingerprint(self) -> str:
        """12 hex digits naming the weights, layer, strength and threshold (for score cache keys)."""
        h = hashlib.sha256(save_safetensors(self._tensors()))
        h.update(json.dumps(self.arch(), sort_keys=True).encode())
        return h.hexdigest()[:12]

    def save_pretrained(self, save_directory: str | os.PathLike, meta: dict[str, Any] | None = None,
                        card: dict[str, Any] | None = None) -> Path:
        """config.json + model.safetensors + README.md (a model card), each written temp + rename, config
        last (it records the weights' sha256). ``meta`` (JSON): base_model, hub_id, tokenizer_fingerprint,
        category, prompt, labels, training, ...; architecture keys come from the object."""
        out = Path(save_directory)
        meta = {**self.meta, **(meta or {})}
        clash = sorted(set(self.arch()) & set(meta))
        if clash:
            raise ValueError(f"meta must not set architecture keys {clash}: they come from the steering object")
        config = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.arch(), **meta}
        return write_artifact(out, self._tensors(), config, lambda c: model_card(c, card), "steering")

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, tokenizer=None, model=None) -> "Steering":
        """Load a saved steering directory; refuses one saved for another tokenizer (``tokenizer``) or
        another hidden size / layer count (``model``), and weights that are not the config's."""
        path = Path(path)
        cpath, wpath = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not cpath.is_file() or not wpath.is_file():
            raise UserError(f"{path} is not a saved steering directory (expected {CONFIG_NAME} + {WEIGHTS_NAME}): "
                            "train it first or fix the path")
        try:
            config = json.loads(cpath.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"{cpath} is corrupt ({e}): train or copy the steering again") from None
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise UserError(f"{cpath} is not a refine_llm steering config (format != {FORMAT!r})")
        if config.get("format_version", 0) > FORMAT_VERSION:
            raise UserError(f"{cpath} has format_version {config['format_version']}: upgrade refine_llm to load it")
        if tokenizer is not None:
            from refine_llm.vocab import tokenizer_fingerprint

            fp = tokenizer_fingerprint(tokenizer)
            if config.get("tokenizer_fingerprint") != fp:
                raise UserError(f"steering {path} was learned for another tokenizer (fingerprint "
                                f"{config.get('tokenizer_fingerprint')} != {fp}): use one learned on this model "
                                f"({config.get('base_model')})")
        if model is not None:
            from refine_llm.baselines.hooks import decoder_layers, hidden_size

            d, n = hidden_size(model), len(decoder_layers(model))
            if config.get("hidden_size") != d or (config.get("num_layers") not in (None, n)):
                raise UserError(f"steering {path} was learned on a model with hidden size {config.get('hidden_size')} "
                                f"and {config.get('num_layers')} layers, this one has {d} and {n}: use the model "
                                f"it was learned on ({config.get('base_model')})")
        raw = wpath.read_bytes()
        if config.get("weights_sha256") not in (None, hashlib.sha256(raw).hexdigest()):
            raise UserError(f"{wpath} is not the weights {cpath} was written with (an interrupted save or a partial "
                            "copy): save or copy the steering again")
        try:
            t = load_safetensors(raw)
            s = cls.from_arrays(t["probe_weight"].numpy(), float(t["probe_bias"][0]), t["vector"].numpy(),
                                config["layer"], config["strength"], config["threshold"], config.get("num_layers"))
        except Exception as e:  # truncated file, missing tensor or key
            raise UserError(f"{path} is corrupt ({type(e).__name__}: {e}): train or copy the steering again") from None
        if s.hidden_size != config.get("hidden_size"):
            raise UserError(f"{wpath} holds vectors of size {s.hidden_size}, its config says {config.get('hidden_size')}")
        arch = set(s.arch()) | {"format", "format_version", "weights_sha256"}
        s.meta = {k: v for k, v in config.items() if k not in arch}
        s.refine_config = config
        return s.eval()


def model_card(config: dict[str, Any], card: dict[str, Any] | None = None) -> str:
    """README.md of a saved steering: what it is, what it was learned on, how it was chosen, caveats."""
    from huggingface_hub import ModelCard, ModelCardData

    card = dict(card or {})
    base = config.get("hub_id") or config.get("base_model")
    data = ModelCardData(library_name="refine_llm", license="apache-2.0",
                         base_model=base if isinstance(base, str) and "/" in base else None,
                         tags=["refine-lm", "bias", "unqover", "activation-steering", "fairsteer"])
    lines = ["---", data.to_yaml(), "---", "",
             f"# Debiasing steering vector (layer {config.get('layer')}) for {config.get('base_model') or 'an LLM'}", "",
             "FairSteer-style activation steering (arXiv 2504.14492) learned with refine_llm: a linear probe on "
             f"decoder layer {config.get('layer')}'s activation at the answer position detects a committed answer to "
             "an underspecified question, and where it fires the mean activation difference between balanced and "
             "committed answers is added there, times the strength. Apply it with "
             "`Steering.from_pretrained(dir).apply(model)` around any HF forward or `generate`.", "",
             "| | |", "|---|---|",
             f"| base model | `{config.get('base_model')}` |",
             f"| tokenizer fingerprint | `{config.get('tokenizer_fingerprint')}` (refused with another tokenizer) |",
             f"| hidden size, layers | {config.get('hidden_size')}, {config.get('num_layers')} |",
             f"| layer, strength, threshold | {config.get('layer')}, {config.get('strength')}, {config.get('threshold')} |",
             f"| category, prompt | {config.get('category')}, {config.get('prompt')} |"]
    labels = config.get("labels") or {}
    if labels:
        lines.append("| labels | " + ", ".join(f"{k} {v}" for k, v in labels.items()) + " |")
    metrics = card.get("metrics") or {}
    if metrics:
        lines += ["", "## Metrics of the run", "", "| | value |", "|---|---|"]
        lines += [f"| {k} | {json.dumps(v) if isinstance(v, (dict, list)) else v} |" for k, v in metrics.items()]
    caveats = list(card.get("caveats") or []) + [
        "Learned on template questions of one category (UnQover); bias elsewhere is not measured.",
        "It runs inside the model (forward hooks): a vLLM logits processor cannot apply it.",
        "Load it only with the base model and tokenizer above; the checks refuse others.",
    ]
    lines += ["", "## Caveats", ""] + [f"- {c}" for c in caveats]
    return ModelCard("\n".join(lines) + "\n").content


def config_dict(cfg: SteerConfig) -> dict[str, Any]:
    """``SteerConfig`` as JSON-ready values (for config.json's ``training``)."""
    d = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

"""Contextual-bandit training of a REFINE head on cached scores (the LLM never runs here).

The setting. Each prompt m of an underspecified 4-tuple (two name orders x attribute/negation) was
scored once by the frozen LLM; we keep its top-k log-probs (M,k), token ids (M,k), which top-k positions
are a first token of subject 1 / subject 2 (cand_mask (M,2,k)) and, for the contextual head, the hidden
state (M,d). The *context* is a prompt's top-k (+ hidden), the *policy* is the head's distribution over
those k tokens, an *action* is one sampled top-k token per prompt. What the head is trained for, and the
estimators of its gradient, are ``refine_llm.rewards`` (shared with the LoRA baseline, so the two can
never optimise different things): the tuple reward -C_s * C_t of two sampled joint answers (expectation
-C(P)^2, with C ``metrics.tuple_bias``: the function that evaluates the head), an answer-mass term, and
on specified questions P(gold) plus KL(base || head) over the top-k.

objective="reinforce" (library default): sampled answers with a leave-one-out baseline, ``samples`` per
prompt. objective="direct" (the main job's): the same expected reward differentiated in closed form.

objective="paper". The authors' update, as in rameez-mrq/refine-lm-submission (training_llm.py,
redubias/calc_bias.py: calculate_reward, calculate_batch_manhattan; redubias/predict_topk.py):
  - one optimizer step per batch of ``batch_size`` tuples, on ``minibatch_size`` tuples drawn *with
    replacement* from the batch (``random.choices``); AdamW with torch's default weight decay 0.01;
  - reward r_n = -|C| from the head's candidate probabilities on UnQover's reference scale (no sampling;
    a detached number); "log-probability" = log of a mean L1 distance between tuples' normalised
    answer profiles (``rewards.paper_loss``); a non-finite loss skips the backward pass.
  This is not a policy gradient: no action is sampled, and since r <= 0 the step lowers
  |r_n|-weighted log-distances between tuples' normalised answer profiles, i.e. it pulls every
  tuple's profile toward the first four tuples of the minibatch. With the paper head, whose untrained
  output is the same for every input (``refine_llm.methods.heads``), the profiles already nearly agree. The
  paper text describes a REINFORCE-style bandit; we follow the code, which is what produced its
  numbers. Uncertainty: the row order inside an entry comes from their preprocess_data.py; we use
  (order, polarity) = (0,0), (0,1), (1,0), (1,1), which only matters through being the same for all
  tuples.

Schedule (all objectives): each epoch shuffles the tuples (seeded by (seed, epoch)) and cuts them into
batches of ``batch_size``; "reinforce"/"direct" take one step per ``minibatch_size`` slice of the batch,
"paper" one step per batch as above. All randomness of step t comes from a generator seeded by
(seed, t), so (seed, step) is the whole RNG state.

The trainer. What a head is trained for is an ``Objective`` (its batches and its loss): ``TupleObjective``
is the UnQover objective above; BBQ's task brings its own (refine_llm.bbq.task.BBQObjective), so every
head of the project trains through the same loop. ``HeadTrainer`` owns the head, its optimizer and a ``TrainerState`` (step, history, best
validation μ and its weights, early-stopping counter, training seconds). Validation keeps the best of
the evaluations (every ``eval_every`` steps; ``patience`` > 0 stops after that many evaluations without
improvement) and the head ends with the best weights. A checkpoint is ONE safetensors file: head,
best-head and optimizer tensors, with ``asdict(TrainerState)`` and the optimizer's param groups as JSON
in the safetensors metadata, written temp + rename (``refine_llm.io``), so no kill can leave a tensor
file and a state file that do not belong together. A resumed run replays exactly the steps an
uninterrupted one takes and ends bit-identical (tests/test_bandit.py).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from refine_llm import metrics, rewards
from refine_llm.config import CONTEXT_VARIANTS, BanditConfig
from refine_llm.errors import UserError
from refine_llm.methods.heads import renormalise as renormalised_topk
from refine_llm.io import atomic_write_bytes, kill_point
from refine_llm.progress import progress as progress_bar
from refine_llm.training import load_optimizer, optimizer_tensors, step_seed

CHECKPOINT = "last.safetensors"  # in the checkpoint directory (runs/<run>/heads/<variant>/checkpoints/<hash>/)
CHECKPOINT_FORMAT = "refine_llm.head_trainer/1"
MASS_FLOOR = 0.8  # best-of-N on validation only keeps heads that leave >= 80% of the names' validation mass


@dataclass
class BanditData:
    """Cached scores for head training, as plain arrays (numpy or torch).

    topk_logprobs (M,k) float, topk_ids (M,k) int, cand_mask (M,2,k) bool, hidden (M,d) optional,
    tuple_rows (N,2,2) int rows [order, polarity] of each underspecified 4-tuple (see
    metrics.gather_tuples), spec_rows (S,) + spec_gold (S,) 0/1 gold position of specified questions
    (utility term), tuple_meta: optional ``meta`` of metrics.tuple_index (group_a, group_b,
    attribute_id, category, lists of length N) so validation reports μ; without it, mean |C|.
    """

    topk_logprobs: Any
    topk_ids: Any
    cand_mask: Any
    tuple_rows: Any
    hidden: Any = None
    spec_rows: Any = None
    spec_gold: Any = None
    tuple_meta: dict | None = None
    # prompts with nothing to debias (evaluation.unrelated_questions(part="anchor")): (A,k) log-probs,
    # (A,k) ids, (A,d) hidden; KL(base || head) on them keeps the head out of the way (anchor_weight)
    anchor_logprobs: Any = None
    anchor_ids: Any = None
    anchor_hidden: Any = None

    def __post_init__(self) -> None:
        t = lambda x, dt: None if x is None else torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(dt)
        self.topk_logprobs = t(self.topk_logprobs, torch.float32)
        self.topk_ids = t(self.topk_ids, torch.long)
        self.cand_mask = t(self.cand_mask, torch.bool)
        self.tuple_rows = t(self.tuple_rows, torch.long)
        self.hidden = t(self.hidden, torch.float32)
        self.spec_rows = t(self.spec_rows, torch.long)
        self.spec_gold = t(self.spec_gold, torch.long)
        self.anchor_logprobs = t(self.anchor_logprobs, torch.float32)
        self.anchor_ids = t(self.anchor_ids, torch.long)
        self.anchor_hidden = t(self.anchor_hidden, torch.float32)
        if (self.anchor_logprobs is None) != (self.anchor_ids is None) or (
                self.anchor_logprobs is not None and self.anchor_ids.shape != self.anchor_logprobs.shape):
            raise UserError("pass anchor_logprobs and anchor_ids together, both (A,k)")
        M, k = self.topk_logprobs.shape
        if self.topk_ids.shape != (M, k) or self.cand_mask.shape != (M, 2, k):
            raise UserError(
                f"BanditData shapes disagree: topk_logprobs {tuple(self.topk_logprobs.shape)}, topk_ids "
                f"{tuple(self.topk_ids.shape)}, cand_mask {tuple(self.cand_mask.shape)}: expected (M,k), (M,k), (M,2,k)"
            )
        if self.tuple_rows.ndim != 3 or self.tuple_rows.shape[1:] != (2, 2):
            raise UserError(f"tuple_rows must be (N,2,2), got {tuple(self.tuple_rows.shape)}")
        if len(self.tuple_rows) and (self.tuple_rows.min() < 0 or self.tuple_rows.max() >= M):
            raise UserError(f"tuple_rows index rows outside [0, {M}): rebuild them with metrics.tuple_index")
        if self.hidden is not None and len(self.hidden) != M:
            raise UserError(f"hidden has {len(self.hidden)} rows but there are {M} prompts")
        if (self.spec_rows is None) != (self.spec_gold is None):
            raise UserError("pass spec_rows and spec_gold together (or neither)")
        if self.spec_rows is not None and self.spec_rows.shape != self.spec_gold.shape:
            raise UserError(f"spec_rows {tuple(self.spec_rows.shape)} and spec_gold {tuple(self.spec_gold.shape)} differ")
        if self.tuple_meta is not None and any(len(v) != len(self.tuple_rows) for v in self.tuple_meta.values()):
            raise UserError("tuple_meta lists must have one entry per tuple (pass metrics.tuple_index's meta)")

    @property
    def num_tuples(self) -> int:
        return int(len(self.tuple_rows))


@dataclass
class TrainResult:
    """What a training run did. history: one dict per logged step (step, loss, reward, abs_c = mean |C| of
    the step's tuples before the update, and val_mu at evaluation steps); val_mu is μ (or mean |C| without
    tuple_meta) on validation."""

    steps: int
    seconds: float
    best_step: int | None = None
    best_val_mu: float | None = None
    initial_val_mu: float | None = None
    stopped_early: bool = False
    resumed_from: int | None = None
    history: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        """Small JSON-able dict for the head's config.json (``training``)."""
        d = asdict(self)
        d.pop("history")
        last = self.history[-1] if self.history else {}
        d["final_abs_c"] = last.get("abs_c")
        return d


# ---------------------------------------------------------------------------------------------
# forward passes on cached rows


def _head_logprobs(head: nn.Module, data: BanditData, rows: torch.Tensor) -> torch.Tensor:
    """(R,) prompt rows -> (R,k) head log-probs."""
    dev = _device(head)
    hidden = data.hidden[rows].to(dev) if data.hidden is not None else None
    return head(data.topk_logprobs[rows].to(dev), topk_ids=data.topk_ids[rows].to(dev), hidden=hidden)


def _device(head: nn.Module) -> torch.device:
    p = next(iter(head.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_head(head: nn.Module, data: BanditData, batch_rows: int = 8192) -> dict:
    """Metrics of ``head`` on ``data`` (top-k renormalised probabilities), via refine_llm.metrics.

    Returns mu (μ with tuple_meta, else None), mean_abs_c, positional_error, attributive_error, and
    specified_accuracy when spec rows are present. ``val_mu`` is μ if available, else mean |C|.
    """
    was_training = head.training
    head.eval()
    M = len(data.topk_logprobs)
    p_pos = torch.empty(M, 2)
    for s in range(0, M, batch_rows):
        rows = torch.arange(s, min(s + batch_rows, M))
        lp = _head_logprobs(head, data, rows)
        p_pos[rows] = metrics.candidate_probs(lp, data.cand_mask[rows].to(lp.device)).float().cpu()
    head.train(was_training)
    P = metrics.gather_tuples(p_pos, data.tuple_rows).numpy()
    C = metrics.tuple_bias(P)
    under = data.tuple_rows.reshape(-1)
    out = {
        "answer_mass": float(p_pos[under].sum(-1).mean()) if len(under) else float("nan"),
        "mean_abs_c": float(np.abs(C).mean()) if len(C) else float("nan"),
        "positional_error": float(metrics.positional_error(P).mean()) if len(C) else float("nan"),
        "attributive_error": float(metrics.attributive_error(P).mean()) if len(C) else float("nan"),
        "mu": None,
    }
    if data.tuple_meta is not None and len(C):
        m = data.tuple_meta
        out["mu"] = metrics.bias_intensity_mu(C, m["subj_a"], m["subj_b"], m["attribute_id"], m.get("category"))
    if data.spec_rows is not None and len(data.spec_rows):
        out["specified_accuracy"] = metrics.specified_accuracy(p_pos[data.spec_rows].numpy(), data.spec_gold.numpy())["accuracy"]
    out["val_mu"] = out["mu"] if out["mu"] is not None else out["mean_abs_c"]
    return out


# ---------------------------------------------------------------------------------------------
# schedule


def _schedule(n_tuples: int, cfg: BanditConfig):
    """Yield (epoch, tuple index tensor, draw_with_replacement) per optimizer step, deterministically."""
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n_tuples, generator=torch.Generator().manual_seed(step_seed(cfg.seed, -1 - epoch)))
        for b in range(0, n_tuples, cfg.batch_size):
            batch = perm[b : b + cfg.batch_size]
            if cfg.objective == "paper":
                yield epoch, batch, True
            else:
                for s in range(0, len(batch), cfg.minibatch_size):
                    yield epoch, batch[s : s + cfg.minibatch_size], False


def num_steps(n_tuples: int, cfg: BanditConfig) -> int:
    """Optimizer steps a run takes on ``n_tuples`` tuples (without early stopping)."""
    per_batch = lambda size: 1 if cfg.objective == "paper" else math.ceil(size / cfg.minibatch_size)
    full, rest = divmod(n_tuples, cfg.batch_size)
    return cfg.epochs * (full * per_batch(cfg.batch_size) + (per_batch(rest) if rest else 0))


def _make_optimizer(head: nn.Module, cfg: BanditConfig) -> torch.optim.Optimizer:
    params = [p for p in head.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"head variant {getattr(head, 'variant', '?')!r} has no parameters to train: use logit, paper or contextual")
    # paper: AdamW(model.parameters(), lr) with torch's default weight_decay=0.01, as the authors.
    # reinforce/direct: no weight decay; decaying the logit head pulls it toward uniform (pure flattening).
    wd = 0.01 if cfg.objective == "paper" else 0.0
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=wd)


# ---------------------------------------------------------------------------------------------
# the trainer


class Objective:
    """What a head is trained for, on what data: the trainer (``HeadTrainer``) owns the optimizer, the step
    seeds, validation and checkpoints; an objective owns the batches and the loss.

        check(head)                      refuse a head this data cannot train (one line)
        num_steps(cfg) -> int            optimizer steps of a full run
        schedule(cfg)                    (epoch, batch, draw_with_replacement) per step, deterministic
        loss(head, batch, with_replacement, generator) -> (loss, logs)
    """

    def check(self, head: nn.Module) -> None:
        pass

    def num_steps(self, cfg: BanditConfig) -> int:
        raise NotImplementedError

    def schedule(self, cfg: BanditConfig):
        raise NotImplementedError

    def loss(self, head: nn.Module, batch, with_replacement: bool, g: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError


class TupleObjective(Objective):
    """The UnQover objective on cached 4-tuples (``refine_llm.rewards``): the tuple reward, the answer mass,
    P(gold) and KL to base on specified questions, KL to base on anchor prompts; or the authors' update."""

    def __init__(self, data: BanditData, cfg: BanditConfig, samples: int | None = None):
        self.data, self.cfg = data, cfg
        self.samples = cfg.samples if samples is None else samples
        self.weights = rewards.Weights(cfg.answer_mass_weight, cfg.utility_weight, cfg.kl_weight, cfg.anchor_weight)

    def check(self, head: nn.Module) -> None:
        cfg = self.cfg
        if self.data.num_tuples == 0:
            raise UserError("no training tuples: generate questions for the train split first")
        if self.samples < 2 and cfg.objective == "reinforce":
            raise UserError(f"samples must be >= 2 for the leave-one-out baseline, got {self.samples}")
        if cfg.objective == "paper" and cfg.utility_weight > 0:
            raise UserError("utility_weight is not part of the paper's update: use objective='direct' or utility_weight=0")
        if getattr(head, "variant", None) in CONTEXT_VARIANTS and self.data.hidden is None:
            raise UserError(f"the {head.variant} head trains on cached hidden states: score with store_hidden=True")

    def num_steps(self, cfg: BanditConfig) -> int:
        return num_steps(self.data.num_tuples, cfg)

    def schedule(self, cfg: BanditConfig):
        return _schedule(self.data.num_tuples, cfg)

    def loss(self, head: nn.Module, tuples: torch.Tensor, with_replacement: bool,
             g: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The objective's loss on tuples (n,) and its logs (``refine_llm.rewards``)."""
        data, cfg = self.data, self.cfg
        if with_replacement:  # the authors' random.choices(batch, k=mini_batch_size)
            tuples = tuples[torch.randint(len(tuples), (cfg.minibatch_size,), generator=g)]
        flat = data.tuple_rows[tuples].reshape(-1)  # (4n,) rows in (tuple, order, polarity) order
        lp = _head_logprobs(head, data, flat)  # (4n,k)
        dev = lp.device
        mask = data.cand_mask[flat].to(dev)  # (4n,2,k)
        if cfg.objective == "paper":
            return rewards.paper_loss(metrics.candidate_probs(lp, mask))
        spec = {}
        if cfg.utility_weight > 0 and data.spec_rows is not None and len(data.spec_rows):
            n_spec = min(len(data.spec_rows), len(flat))
            pick = torch.randperm(len(data.spec_rows), generator=g)[:n_spec]
            srows, gold = data.spec_rows[pick], data.spec_gold[pick].to(dev)
            slp = _head_logprobs(head, data, srows)  # (n_spec,k)
            spec = {"spec_logp": slp,
                    "spec_gold_mask": data.cand_mask[srows].to(dev)[torch.arange(n_spec, device=dev), gold]}
            if cfg.kl_weight > 0:  # KL(base || head) over the top-k, base = the LLM's renormalised top-k
                spec["spec_kl"] = rewards.kl_to_base(renormalised_topk(data.topk_logprobs[srows].to(dev)), slp)
        if cfg.anchor_weight > 0 and data.anchor_logprobs is not None and len(data.anchor_logprobs):
            pick = torch.randperm(len(data.anchor_logprobs), generator=g)[:len(flat)]
            hid = data.anchor_hidden[pick].to(dev) if data.anchor_hidden is not None else None
            alp = head(data.anchor_logprobs[pick].to(dev), topk_ids=data.anchor_ids[pick].to(dev), hidden=hid)
            spec["anchor_kl"] = rewards.kl_to_base(renormalised_topk(data.anchor_logprobs[pick].to(dev)), alp)
        return rewards.policy_loss(lp, mask, cfg.objective, self.weights, samples=self.samples, generator=g, **spec)


@dataclass
class TrainerState:
    """Everything a run has done that is not a tensor; saved with ``asdict`` in the checkpoint's metadata.

    All randomness of step t is ``torch.Generator().manual_seed(step_seed(seed, t))`` and the epoch order
    uses ``step_seed(seed, -1 - epoch)`` (refine_llm.training): (seed, step) is the whole RNG state."""

    seed: int
    objective: str
    step: int = 0
    history: list[dict] = field(default_factory=list)
    best_val_mu: float | None = None
    best_step: int | None = None
    initial_val_mu: float | None = None
    initial_mass: float | None = None
    bad_evals: int = 0
    stopped: bool = False
    seconds: float = 0.0  # training time, summed over resumes
    config: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainerState":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class HeadTrainer:
    """Trains ``head`` in place on cached scores (``BanditData``); see the module docstring.

        trainer = HeadTrainer(head, train, cfg, val=val, checkpoint_dir=ckpt)
        result = trainer.train(resume=True)

    samples: joint actions per prompt (reinforce; default cfg.samples). ``train(max_steps=)`` stops after
    that many steps in total (a budget; a checkpoint is written there). With ``val``, μ is evaluated at
    step 0, every ``cfg.eval_every`` steps and at the end; the head ends with the best evaluation's weights.
    """

    def __init__(self, head: nn.Module, train: "BanditData | Objective", cfg: BanditConfig,
                 val: BanditData | None = None, checkpoint_dir: str | os.PathLike | None = None, *,
                 samples: int | None = None, progress: bool = True, log_every: int = 1):
        self.objective = train if isinstance(train, Objective) else TupleObjective(train, cfg, samples)
        self.objective.check(head)
        self.head, self.cfg, self.val = head, cfg, val
        self.data = getattr(self.objective, "data", None)
        self.ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
        self.progress, self.log_every = progress, log_every
        self.opt = _make_optimizer(head, cfg)
        self.state = TrainerState(seed=cfg.seed, objective=cfg.objective, config=asdict(cfg))
        self.best: dict[str, torch.Tensor] | None = None  # the best evaluation's head weights
        self.resumed_from: int | None = None
        self._clock = time.perf_counter()  # training time since the last time self.state.seconds was set

    # ---- one step

    def loss(self, batch, g: torch.Generator | None) -> tuple[torch.Tensor, dict]:
        """The objective's loss on ``batch`` (tuples (n,) for the UnQover objective) and its logs."""
        return self.objective.loss(self.head, batch, False, g)

    def training_step(self, batch, with_replacement: bool, g: torch.Generator) -> dict:
        loss, logs = self.objective.loss(self.head, batch, with_replacement, g)
        self.opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            self.opt.step()
        logs["loss"] = loss.item()
        return logs

    # ---- validation: best of N

    def evaluate(self) -> float:
        """μ on validation; keeps the head's weights when they are the best so far (and leave enough mass)."""
        st = self.state
        ev = evaluate_head(self.head, self.val)
        mu = ev["val_mu"]
        if st.initial_val_mu is None:
            st.initial_val_mu, st.initial_mass = mu, ev["answer_mass"]
        if st.initial_mass is not None and ev["answer_mass"] < MASS_FLOOR * st.initial_mass:
            # Zero bias by moving the probability off both names is no debiasing: not eligible as best.
            mu = float("inf")
        if st.best_val_mu is None or mu < st.best_val_mu - 1e-12:
            st.best_val_mu, st.best_step, st.bad_evals = mu, st.step, 0
            self.best = {k: v.detach().clone() for k, v in self.head.state_dict().items()}
        else:
            st.bad_evals += 1
        return mu

    # ---- checkpoints: one file

    def _tick(self) -> None:
        now = time.perf_counter()
        self.state.seconds += now - self._clock
        self._clock = now

    def save_checkpoint(self) -> None:
        self._tick()  # the training time counts with or without a checkpoint file
        if self.ckpt is None:
            return
        tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        if self.best is not None:
            tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in self.best.items()})
        optim, groups = optimizer_tensors(self.opt)
        tensors.update(optim)
        meta = {"format": CHECKPOINT_FORMAT, "trainer_state": json.dumps(asdict(self.state)),
                "optimizer_param_groups": json.dumps(groups)}
        atomic_write_bytes(self.ckpt, save_safetensors(tensors, metadata=meta))
        kill_point("head")  # test hook (refine_llm.io): a kill -9 right after a checkpoint

    def load_checkpoint(self) -> bool:
        """Restore head, optimizer, best weights and state from the checkpoint; False when there is none."""
        if self.ckpt is None or not self.ckpt.is_file():
            return False
        try:
            raw = self.ckpt.read_bytes()
            tensors = load_safetensors(raw)
            n = int.from_bytes(raw[:8], "little")  # safetensors: u64 header length, then the JSON header
            meta = json.loads(raw[8 : 8 + n]).get("__metadata__") or {}
            if meta.get("format") != CHECKPOINT_FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
            st = TrainerState.from_dict(json.loads(meta["trainer_state"]))
            groups = json.loads(meta["optimizer_param_groups"])
        except (OSError, ValueError, KeyError, SafetensorError) as e:
            raise UserError(f"checkpoint {self.ckpt} is unreadable ({e}): delete it or run with resume=False") from e
        if st.seed != self.cfg.seed or st.objective != self.cfg.objective:
            raise UserError(f"checkpoint {self.ckpt} was made with another seed/objective: use resume=False or another dir")
        try:
            self.head.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("head.")}, strict=True)
        except RuntimeError as e:
            raise UserError(f"checkpoint {self.ckpt} is for another head ({e}): use another checkpoint_dir") from e
        self.best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
        load_optimizer(self.opt, tensors, groups)
        self.state, self.resumed_from = st, st.step
        return True

    # ---- the loop

    def train(self, resume: bool = False, max_steps: int | None = None) -> TrainResult:
        if resume and self.ckpt is None:
            raise UserError("resume=True needs checkpoint_dir")
        cfg, st = self.cfg, self.state
        self.head.train()
        full = self.objective.num_steps(cfg)  # the schedule: epochs x batches, capped by cfg.max_steps
        if cfg.max_steps is not None:
            full = min(full, cfg.max_steps)
        total = full if max_steps is None else min(full, max_steps)  # max_steps: stop early (resume goes on)
        if resume:
            self.load_checkpoint()
            st = self.state
        if self.val is not None and st.step == 0 and st.best_val_mu is None:
            st.history.append({"step": 0, "val_mu": self.evaluate()})
        self._clock = time.perf_counter()
        bar = progress_bar(total=total, initial=st.step, disable=not self.progress, desc=f"bandit[{cfg.objective}]", leave=False)
        for i, (epoch, tuples, with_repl) in enumerate(self.objective.schedule(cfg)):
            if st.stopped or i >= total:
                break
            if i < st.step:
                continue  # done before the checkpoint we resumed from
            logs = self.training_step(tuples, with_repl, torch.Generator().manual_seed(step_seed(cfg.seed, i)))
            st.step = i + 1
            rec = {"step": st.step, "epoch": epoch, **logs}
            if self.val is not None and (st.step % cfg.eval_every == 0 or st.step == full):
                rec["val_mu"] = self.evaluate()
                if cfg.patience and st.bad_evals >= cfg.patience:
                    st.stopped = True
            if st.step % self.log_every == 0 or "val_mu" in rec or st.step == total:
                st.history.append(rec)
            bar.update(1)
            bar.set_postfix(**({"abs_c": f"{logs['abs_c']:.4f}"} if "abs_c" in logs else {}),
                            **({"val_mu": f"{st.best_val_mu:.4f}"} if st.best_val_mu is not None else {}))
            if cfg.checkpoint_every and st.step % cfg.checkpoint_every == 0:
                self.save_checkpoint()
        bar.close()
        # The closing evaluation only when training is over: a run cut short by max_steps that evaluated
        # here could keep a "best" that the uninterrupted run never saw (resume would then differ).
        if (self.val is not None and st.history and "val_mu" not in st.history[-1] and st.step > 0
                and (st.step >= full or st.stopped)):
            st.history.append({"step": st.step, "val_mu": self.evaluate()})
        self.save_checkpoint()  # the final state, so a re-run resumes a finished head
        if self.best is not None:
            self.head.load_state_dict(self.best)
        return TrainResult(steps=st.step, seconds=st.seconds, best_step=st.best_step, best_val_mu=st.best_val_mu,
                           initial_val_mu=st.initial_val_mu, stopped_early=st.stopped,
                           resumed_from=self.resumed_from, history=st.history)


def train_head(head: nn.Module, train: "BanditData | Objective", cfg: BanditConfig, val: BanditData | None = None,
               checkpoint_dir: str | os.PathLike | None = None, resume: bool = False, *,
               samples: int | None = None, max_steps: int | None = None, progress: bool = True,
               log_every: int = 1) -> TrainResult:
    """``HeadTrainer(...).train(resume, max_steps)``: train ``head`` in place; see ``HeadTrainer``."""
    trainer = HeadTrainer(head, train, cfg, val, checkpoint_dir, samples=samples, progress=progress,
                          log_every=log_every)
    return trainer.train(resume=resume, max_steps=max_steps)

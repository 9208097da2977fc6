"""Contextual-bandit training of a REFINE head on cached scores (the LLM never runs here).

The setting. Each prompt m of an underspecified 4-tuple (two name orders x attribute/negation) was
scored once by the frozen LLM; we keep its top-k log-probs (M,k), token ids (M,k), which top-k positions
are a first token of subject 1 / subject 2 (cand_mask (M,2,k)) and, for the contextual head, the hidden
state (M,d). The *context* is a prompt's top-k (+ hidden), the *policy* is the head's distribution over
those k tokens, an *action* is one sampled top-k token per prompt, and the *reward* of a tuple is
-|C|, its UnQover comparative bias, computed by ``refine_llm.metrics.tuple_bias`` on the four prompts'
answers: the same function that evaluates the head. Nothing here re-implements a metric.

objective="reinforce" (default). For each tuple we draw ``samples`` joint actions (one token per
prompt, independently from the head). A sampled token answers subject 1, subject 2 (cand_mask) or
neither, so each joint sample gives one-hot answers p_pos (4,2) and a reward r = -|C(p_pos)|.
The gradient of E[r] is E[(r - b) * sum_{4 prompts} grad log pi(a_m | x_m)] for any b that does not
depend on the actions; we use b = the mean reward of the same tuple's samples (nanochat's chat_rl /
GRPO without std normalisation: a mean baseline, which is all GRPO's group baseline comes down to in
a one-step bandit). Including the sample itself in the mean only scales the gradient by (S-1)/S.
Why sampled answers and not the policy's probabilities: -|C(probabilities)| does not depend on the
action, so its REINFORCE estimate is zero in expectation; the reward must be a function of the sampled
answers. Note what that optimises: E|C(sampled answers)| >= |C(E[answers])| = |C(probabilities)|
(C is linear in P), so the bandit optimum also prefers *consistent* answers over coin flips; both are
0 for a tuple the head makes unbiased. The probability-based -|C| (the metric) is logged as
``reward_prob`` and drives validation/early stopping.
Utility term (utility_weight = lambda > 0): specified questions (gold position known) add a second
bandit whose reward is 1 when the sampled token is a first token of the gold answer, with its own
per-prompt mean baseline; loss = bias loss + lambda * utility loss. lambda = 0 reproduces the paper.
Without it, putting all mass on non-candidate tokens ("the", ",") is also a zero-bias optimum.

objective="paper". The authors' update, as in rameez-mrq/refine-lm-submission (training_llm.py,
redubias/calc_bias.py: calculate_reward, calculate_batch_manhattan; redubias/predict_topk.py):
  - one optimizer step per batch of ``batch_size`` tuples, on ``minibatch_size`` tuples drawn *with
    replacement* from the batch (``random.choices``); AdamW with torch's default weight decay 0.01;
  - reward r_n = -|bias| from the head's candidate probabilities (no sampling; a detached number),
    with their scale: their get_subj1_win_score omits the 1/2 of B, so r = -|2 C| of metrics;
  - "log-probability" = log of d_n: each tuple's (4,2) candidate probabilities are L1-normalised over
    its 4 prompts (per candidate column), and d_n = mean over the first 4 tuples j of the minibatch and
    the 4 prompts i of ||x_n[i] - x_j[i] + 1e-6||_1 (F.pairwise_distance; only the first chunk is used);
  - loss = -mean_n(r_n * log d_n); a non-finite loss skips the backward pass.
  This is not a policy gradient: no action is sampled, and since r <= 0 the step lowers
  |r_n|-weighted log-distances between tuples' normalised answer profiles, i.e. it pulls every
  tuple's profile toward the first four tuples of the minibatch. With the paper head, whose untrained
  output is the same for every input (``refine_llm.head``), the profiles already nearly agree. The
  paper text describes a REINFORCE-style bandit; we follow the code, which is what produced its
  numbers. Uncertainty: the row order inside an entry comes from their preprocess_data.py; we use
  (order, polarity) = (0,0), (0,1), (1,0), (1,1), which only matters through being the same for all
  tuples.

Schedule (both objectives): each epoch shuffles the tuples (seeded by (seed, epoch)) and cuts them
into batches of ``batch_size``; "reinforce" takes one step per ``minibatch_size`` slice of the batch,
"paper" one step per batch as above. All randomness of step t comes from a generator seeded by
(seed, t), so a run resumed from a checkpoint replays exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from refine_llm import metrics
from refine_llm.config import CONTEXT_VARIANTS, BanditConfig
from refine_llm.errors import UserError
from refine_llm.head import candidate_probs

CKPT_TENSORS = "last.safetensors"
CKPT_STATE = "last.json"
_PAPER_EPS = 1e-6  # F.pairwise_distance default eps, as in the authors' calculate_manhattan
_PAPER_REWARD_SCALE = 2.0
MASS_FLOOR = 0.8  # early stopping only keeps heads that leave >= 80% of the names' validation mass  # their bias = 2 x the paper's C (see the module docstring)


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

    def __post_init__(self) -> None:
        t = lambda x, dt: None if x is None else torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(dt)
        self.topk_logprobs = t(self.topk_logprobs, torch.float32)
        self.topk_ids = t(self.topk_ids, torch.long)
        self.cand_mask = t(self.cand_mask, torch.bool)
        self.tuple_rows = t(self.tuple_rows, torch.long)
        self.hidden = t(self.hidden, torch.float32)
        self.spec_rows = t(self.spec_rows, torch.long)
        self.spec_gold = t(self.spec_gold, torch.long)
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
    """What ``train_head`` did. history: one dict per logged step (step, loss, reward, reward_prob,
    and val_mu at evaluation steps); val_mu is μ (or mean |C| without tuple_meta) on validation."""

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
        d["final_reward_prob"] = last.get("reward_prob")
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
        p_pos[rows] = candidate_probs(lp, data.cand_mask[rows].to(lp.device)).float().cpu()
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
        out["mu"] = metrics.bias_intensity_mu(C, m["group_a"], m["group_b"], m["attribute_id"], m.get("category"))
    if data.spec_rows is not None and len(data.spec_rows):
        out["specified_accuracy"] = metrics.specified_accuracy(p_pos[data.spec_rows].numpy(), data.spec_gold.numpy())["accuracy"]
    out["val_mu"] = out["mu"] if out["mu"] is not None else out["mean_abs_c"]
    return out


# ---------------------------------------------------------------------------------------------
# the two objectives: (head, data, tuple ids, generator) -> (loss, logs)


def _reinforce_loss(head, data, tuples, g, cfg: BanditConfig, samples: int):
    n = len(tuples)
    flat = data.tuple_rows[tuples].reshape(-1)  # (4n,) rows in (tuple, order, polarity) order
    lp = _head_logprobs(head, data, flat)  # (4n,k)
    dev = lp.device
    a = torch.multinomial(lp.detach().exp().cpu(), samples, replacement=True, generator=g).to(dev)  # (4n,S)
    logp_a = lp.gather(1, a)  # (4n,S)
    mask = data.cand_mask[flat].to(dev).float()  # (4n,2,k)
    ans = mask.gather(2, a.unsqueeze(1).expand(-1, 2, -1)).transpose(1, 2)  # (4n,S,2) one-hot answers
    # every (sample, tuple) is its own tuple over a block of 4 one-hot rows: p_pos (S*4n, 2)
    p_pos = ans.transpose(0, 1).reshape(samples * 4 * n, 2)
    local = torch.arange(4 * n, device=dev).reshape(n, 2, 2)
    rows = (torch.arange(samples, device=dev).view(-1, 1, 1, 1) * (4 * n) + local).reshape(-1, 2, 2)
    c = metrics.tuple_bias(metrics.gather_tuples(p_pos, rows)).view(samples, n)  # (S,n) signed C per sample
    # Reward: -C_s * mean_{t != s} C_t. Samples are independent and C is linear in the answers, so its
    # expectation is -C(P)^2, with P the policy's probabilities: minimised exactly by unbiased policies.
    # A reward of -|C_s| on one sample would instead prefer *deterministic* answers (E|C(a)| >= |C(E a)|),
    # whose zero-bias optima on 4-tuples are positional ("always the first-named"), not 50/50.
    loo = (c.sum(0, keepdim=True) - c) / (samples - 1)  # (S,n) leave-one-out mean of the other samples
    r = -c * loo
    adv = r - r.mean(0, keepdim=True)  # per-tuple mean baseline
    logp_joint = logp_a.view(n, 4, samples).sum(1).T  # (S,n)
    loss = -(adv * logp_joint).mean()
    with torch.no_grad():  # the metric itself, on probabilities
        pp = candidate_probs(lp, mask.bool())
        r_prob = -metrics.tuple_bias(metrics.gather_tuples(pp, local)).abs().mean()
    logs = {"reward": r.mean().item(), "reward_prob": r_prob.item(), "abs_c_sampled": c.abs().mean().item()}
    if cfg.answer_mass_weight > 0:
        # A second bandit on the same samples: 1 when the sampled token names either subject, with a
        # per-prompt mean baseline. Without it, "no name at all" is also a zero-bias optimum.
        hit = ans.sum(-1)  # (4n,S) in {0,1}
        hadv = hit - hit.mean(1, keepdim=True)
        loss = loss - cfg.answer_mass_weight * (hadv * logp_a).mean()
        logs["answer_rate"] = hit.mean().item()
    if cfg.utility_weight > 0 and data.spec_rows is not None and len(data.spec_rows):
        n_spec = min(len(data.spec_rows), 4 * n)
        pick = torch.randperm(len(data.spec_rows), generator=g)[:n_spec]
        srows, gold = data.spec_rows[pick], data.spec_gold[pick].to(dev)
        slp = _head_logprobs(head, data, srows)  # (n_spec,k)
        sa = torch.multinomial(slp.detach().exp().cpu(), samples, replacement=True, generator=g).to(dev)
        gmask = data.cand_mask[srows].to(dev)[torch.arange(n_spec, device=dev), gold].float()  # (n_spec,k)
        su = gmask.gather(1, sa)  # (n_spec,S) 1 = sampled a gold token
        sadv = su - su.mean(1, keepdim=True)
        loss = loss - cfg.utility_weight * (sadv * slp.gather(1, sa)).mean()
        logs["utility"] = su.mean().item()
    return loss, logs


def _expected_loss(head, data, tuples, g, cfg: BanditConfig, samples: int):
    """objective="expected": the bandit's expected reward in closed form.

    The reward of a tuple is a known, differentiable function of the policy's answer probabilities
    (the metric, -|C(P)|), so its gradient needs no sampled actions (a deterministic policy gradient
    in a one-step bandit): loss = mean |C(P)| - answer_mass_weight * mean log(P(subj1) + P(subj2))
    on underspecified prompts + utility_weight * mean -log P(gold) on specified ones.
    """
    n = len(tuples)
    flat = data.tuple_rows[tuples].reshape(-1)
    lp = _head_logprobs(head, data, flat)
    dev = lp.device
    mask = data.cand_mask[flat].to(dev)
    pp = candidate_probs(lp, mask)  # (4n,2)
    local = torch.arange(4 * n, device=dev).reshape(n, 2, 2)
    abs_c = metrics.tuple_bias(metrics.gather_tuples(pp, local)).abs()
    loss = abs_c.mean()
    logs = {"reward": -abs_c.mean().item(), "reward_prob": -abs_c.mean().item()}
    if cfg.answer_mass_weight > 0:
        mass = pp.sum(-1).clamp_min(1e-6)
        loss = loss - cfg.answer_mass_weight * mass.log().mean()
        logs["answer_rate"] = mass.mean().item()
    if cfg.utility_weight > 0 and data.spec_rows is not None and len(data.spec_rows):
        n_spec = min(len(data.spec_rows), 4 * n)
        pick = torch.randperm(len(data.spec_rows), generator=g)[:n_spec]
        srows, gold = data.spec_rows[pick], data.spec_gold[pick].to(dev)
        sp = candidate_probs(_head_logprobs(head, data, srows), data.cand_mask[srows].to(dev))  # (n_spec,2)
        pg = sp[torch.arange(n_spec, device=dev), gold].clamp_min(1e-6)
        loss = loss - cfg.utility_weight * pg.log().mean()
        logs["utility"] = pg.mean().item()
    return loss, logs


def _paper_loss(head, data, tuples, g, cfg: BanditConfig, samples: int):
    flat = data.tuple_rows[tuples].reshape(-1)
    lp = _head_logprobs(head, data, flat)
    x = candidate_probs(lp, data.cand_mask[flat].to(lp.device)).view(len(tuples), 4, 2)  # (n,4,2) by position
    local = torch.arange(4 * len(tuples), device=lp.device).reshape(-1, 2, 2)
    with torch.no_grad():
        C = metrics.tuple_bias(metrics.gather_tuples(x.reshape(-1, 2), local))
        r = -(_PAPER_REWARD_SCALE * C).abs()  # (n,)
    xn = F.normalize(x, p=1, dim=1)  # their normalize(): L1 over the 4 prompts, per candidate column
    first = xn[:4]  # their calculate_manhattan keeps only the first chunk of len(vector)=4 tuples
    d = F.pairwise_distance(xn.unsqueeze(1), first.unsqueeze(0), p=1, eps=_PAPER_EPS).mean((1, 2))  # (n,)
    loss = -(torch.log(d) * r).mean()
    return loss, {"reward": r.mean().item(), "reward_prob": -C.abs().mean().item()}


# ---------------------------------------------------------------------------------------------
# schedule, checkpoints


def _step_seed(seed: int, step: int) -> int:
    return (int(seed) * 1_000_003 + int(step) * 7_919 + 17) % (2**63 - 1)


def _schedule(n_tuples: int, cfg: BanditConfig):
    """Yield (epoch, tuple index tensor, draw_with_replacement) per optimizer step, deterministically."""
    for epoch in range(cfg.epochs):
        perm = torch.randperm(n_tuples, generator=torch.Generator().manual_seed(_step_seed(cfg.seed, -1 - epoch)))
        for b in range(0, n_tuples, cfg.batch_size):
            batch = perm[b : b + cfg.batch_size]
            if cfg.objective == "paper":
                yield epoch, batch, True
            else:
                for s in range(0, len(batch), cfg.minibatch_size):
                    yield epoch, batch[s : s + cfg.minibatch_size], False


def num_steps(n_tuples: int, cfg: BanditConfig) -> int:
    """Optimizer steps ``train_head`` takes on ``n_tuples`` tuples (without early stopping)."""
    per_batch = lambda size: 1 if cfg.objective == "paper" else math.ceil(size / cfg.minibatch_size)
    full, rest = divmod(n_tuples, cfg.batch_size)
    return cfg.epochs * (full * per_batch(cfg.batch_size) + (per_batch(rest) if rest else 0))


def _make_optimizer(head: nn.Module, cfg: BanditConfig) -> torch.optim.Optimizer:
    params = [p for p in head.parameters() if p.requires_grad]
    if not params:
        raise UserError(f"head variant {getattr(head, 'variant', '?')!r} has no parameters to train: use logit, paper or contextual")
    # paper: AdamW(model.parameters(), lr) with torch's default weight_decay=0.01, as the authors.
    # reinforce: no weight decay; decaying the logit head pulls it toward uniform (pure flattening).
    wd = 0.01 if cfg.objective == "paper" else 0.0
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=wd)


def _save_checkpoint(ckpt_dir: Path, head, opt, state: dict, best_state: dict | None) -> None:
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"head.{k}": v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    if best_state is not None:
        tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in best_state.items()})
    osd = opt.state_dict()
    for pid, pstate in osd["state"].items():
        for key, val in pstate.items():
            tensors[f"optim.{pid}.{key}"] = torch.as_tensor(val).detach().cpu().contiguous()
    state = {**state, "optimizer_param_groups": osd["param_groups"]}
    tmp_t, tmp_s = ckpt_dir / (CKPT_TENSORS + ".tmp"), ckpt_dir / (CKPT_STATE + ".tmp")
    save_file(tensors, str(tmp_t), metadata={"step": str(state["step"])})
    tmp_s.write_text(json.dumps(state, indent=1, allow_nan=True))
    os.replace(tmp_t, ckpt_dir / CKPT_TENSORS)  # tensors first, the JSON (which names the step) last
    os.replace(tmp_s, ckpt_dir / CKPT_STATE)


def _load_checkpoint(ckpt_dir: Path, head, opt) -> tuple[dict, dict | None]:
    try:
        state = json.loads((ckpt_dir / CKPT_STATE).read_text())
        tensors = load_file(str(ckpt_dir / CKPT_TENSORS))
    except Exception as e:
        raise UserError(f"checkpoint in {ckpt_dir} is unreadable ({e}): delete it or run with resume=False") from e
    head_sd = {k[5:]: v for k, v in tensors.items() if k.startswith("head.")}
    try:
        head.load_state_dict(head_sd, strict=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint in {ckpt_dir} is for another head ({e}): use another checkpoint_dir") from e
    best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
    ostate: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, key = k.split(".", 2)
            ostate.setdefault(int(pid), {})[key] = v
    opt.load_state_dict({"state": ostate, "param_groups": state.pop("optimizer_param_groups")})
    return state, best


# ---------------------------------------------------------------------------------------------
# the trainer


def _train_step(head, opt, data, tuples, with_replacement, g, cfg, samples):
    if with_replacement:  # the authors' random.choices(batch, k=mini_batch_size)
        tuples = tuples[torch.randint(len(tuples), (cfg.minibatch_size,), generator=g)]
    loss_fn = {"paper": _paper_loss, "expected": _expected_loss, "reinforce": _reinforce_loss}[cfg.objective]
    loss, logs = loss_fn(head, data, tuples, g, cfg, samples)
    opt.zero_grad(set_to_none=True)
    if torch.isfinite(loss):
        loss.backward()
        opt.step()
    logs["loss"] = loss.item()
    return logs


def train_head(
    head: nn.Module,
    train: BanditData,
    cfg: BanditConfig,
    val: BanditData | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    *,
    samples: int | None = None,
    max_steps: int | None = None,
    progress: bool = True,
    log_every: int = 1,
) -> TrainResult:
    """Train ``head`` in place on cached scores; returns a TrainResult.

    samples: joint actions drawn per tuple (reinforce only; default cfg.samples). max_steps: stop after this many steps in
    total (a budget; a checkpoint is written there). With ``val``, μ is evaluated at step 0, every
    ``cfg.eval_every`` steps and at the end; the head ends with the weights of the best evaluation
    (early stopping after ``cfg.patience`` evaluations without improvement, if > 0).
    ``resume=True`` continues from ``checkpoint_dir`` (if a checkpoint is there) and reaches the same
    final head as an uninterrupted run.
    """
    samples = cfg.samples if samples is None else samples
    if train.num_tuples == 0:
        raise UserError("no training tuples: generate questions for the train split first")
    if samples < 2 and cfg.objective == "reinforce":
        raise UserError(f"samples must be >= 2 for the mean baseline, got {samples}")
    if cfg.objective == "paper" and cfg.utility_weight > 0:
        raise UserError("utility_weight is not part of the paper's update: use objective='reinforce' or utility_weight=0")
    if resume and checkpoint_dir is None:
        raise UserError("resume=True needs checkpoint_dir")
    if getattr(head, "variant", None) in CONTEXT_VARIANTS and train.hidden is None:
        raise UserError(f"the {head.variant} head trains on cached hidden states: score with store_hidden=True")
    head.train()
    opt = _make_optimizer(head, cfg)
    total = num_steps(train.num_tuples, cfg)
    if max_steps is not None:
        total = min(total, max_steps)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None

    step, history, best_state = 0, [], None
    best_mu, best_step, initial_mu, bad_evals, stopped = None, None, None, 0, False
    resumed_from, seconds_before = None, 0.0
    if resume and ckpt_dir is not None and (ckpt_dir / CKPT_STATE).exists():
        st, best_state = _load_checkpoint(ckpt_dir, head, opt)
        if st.get("seed") != cfg.seed or st.get("objective") != cfg.objective:
            raise UserError(f"checkpoint in {ckpt_dir} was made with another seed/objective: use resume=False or another dir")
        step, history = st["step"], st["history"]
        best_mu, best_step, initial_mu, bad_evals = st["best_mu"], st["best_step"], st["initial_mu"], st["bad_evals"]
        stopped, resumed_from = st.get("stopped", False), step
        seconds_before = float(st.get("seconds", 0.0))  # training time spent before the checkpoint
        initial_mass = st.get("initial_mass")
    else:
        initial_mass = None

    def evaluate_now() -> float:
        nonlocal best_mu, best_step, best_state, bad_evals, initial_mu, initial_mass
        ev = evaluate_head(head, val)
        mu = ev["val_mu"]
        if initial_mu is None:
            initial_mu, initial_mass = mu, ev["answer_mass"]
        if initial_mass is not None and ev["answer_mass"] < MASS_FLOOR * initial_mass:
            # Zero bias by moving the probability off both names is no debiasing: not eligible as best.
            mu = float("inf")
        if best_mu is None or mu < best_mu - 1e-12:
            best_mu, best_step, bad_evals = mu, step, 0
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        else:
            bad_evals += 1
        return mu

    def checkpoint(seconds: float | None = None) -> None:
        if ckpt_dir is None:
            return
        st = {"step": step, "seed": cfg.seed, "objective": cfg.objective, "history": history,
              "best_mu": best_mu, "best_step": best_step, "initial_mu": initial_mu, "bad_evals": bad_evals,
              "stopped": stopped, "initial_mass": initial_mass,
              "seconds": seconds_before + time.perf_counter() - t0 if seconds is None else seconds,
              # all randomness of step t is torch.Generator().manual_seed(_step_seed(seed, t)); the epoch
              # order uses _step_seed(seed, -1 - epoch): (seed, step) is the whole RNG state.
              "rng": {"kind": "torch.Generator per step", "seed": cfg.seed, "next_step": step},
              "config": asdict(cfg)}
        _save_checkpoint(ckpt_dir, head, opt, st, best_state)

    if val is not None and step == 0 and best_mu is None:
        mu0 = evaluate_now()
        history.append({"step": 0, "val_mu": mu0})

    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=step, disable=not progress, desc=f"bandit[{cfg.objective}]", leave=False)
    for i, (epoch, tuples, with_repl) in enumerate(_schedule(train.num_tuples, cfg)):
        if stopped or i >= total:
            break
        if i < step:
            continue  # already done before the checkpoint we resumed from
        g = torch.Generator().manual_seed(_step_seed(cfg.seed, i))
        logs = _train_step(head, opt, train, tuples, with_repl, g, cfg, samples)
        step = i + 1
        rec = {"step": step, "epoch": epoch, **logs}
        if val is not None and (step % cfg.eval_every == 0 or step == total):
            rec["val_mu"] = evaluate_now()
            if cfg.patience and bad_evals >= cfg.patience:
                stopped = True
        if step % log_every == 0 or "val_mu" in rec or step == total:
            history.append(rec)
        bar.update(1)
        bar.set_postfix(reward=f"{logs['reward']:.4f}", abs_c=f"{-logs['reward_prob']:.4f}",
                        **({"val_mu": f"{best_mu:.4f}"} if best_mu is not None else {}))
        if ckpt_dir is not None and cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
            checkpoint()
    bar.close()
    if val is not None and history and "val_mu" not in history[-1] and step > 0:
        history.append({"step": step, "val_mu": evaluate_now()})
    seconds = seconds_before + time.perf_counter() - t0  # across resumes: what training this head cost
    checkpoint(seconds)  # the same total, so a resumed run reports at least what this one does
    if best_state is not None:
        head.load_state_dict(best_state)
    return TrainResult(
        steps=step,
        seconds=seconds,
        best_step=best_step,
        best_val_mu=best_mu,
        initial_val_mu=initial_mu,
        stopped_early=stopped,
        resumed_from=resumed_from,
        history=history,
    )

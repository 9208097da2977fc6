"""QLoRA baselines: debias by training LoRA adapters on the 4-bit LLM instead of a head on its top-k.

lora-reward (``train_lora_reward``): peft LoRA adapters on the NF4 model (``prepare_model_for_kbit_training``;
no gradient checkpointing by default: the few-shot prefix shared by every prompt runs once per step and
its KV is expanded to the batch, exact and ~4x fewer tokens, and checkpointing would drop that cache),
trained on the head's train split for the head's goal. The policy is what the metric reads: the adapted
model's next-token distribution at the answer position, renormalised over its top-k (k = scoring's
top_k, 10), with the top-k positions that are a first token of subject 1 / 2 given by
``scoring.candidate_token_ids`` + ``scoring.cand_mask_of``. Per batch of n tuples (4n prompts):

The loss is ``refine_llm.rewards.policy_loss``, the head's own (one reward, so the two can never
optimise different things): the tuple reward -C_s * C_t of sampled joint answers (expectation -C(P)^2),
the answer-mass term (weight ``answer_mass_weight``) and, on the specified train questions of the batch's
tuples, P(gold) plus ``kl_weight`` x KL(frozen || adapted) of the full next-token distribution (weight
lambda = ``utility_weight``). ``objective`` picks the estimator: ``reinforce`` (default; sampled answers,
leave-one-out baseline) or ``direct`` (the same expected reward differentiated in closed form: the
candidate probabilities are differentiable w.r.t. the adapters). The frozen model is the same weights
with the adapters off (``model.disable_adapter()``), so there is no second copy of the LLM. LoRA changes
every prompt, not only the 4 answers, so unlike the head it needs the KL anchor to keep specified
answers where they were. The forward is ``refine_llm.forward.answer_logits`` (the shared few-shot prefix
runs once per step, its KV expanded to the batch; the same function scoring uses).

lora-cda (refine_llm.baselines.cda): counterfactual data augmentation and plain SFT with trl, on the same
adapters, artifacts and base-model loading as here.

Artifacts: the adapter directory is peft's format (``adapter_config.json`` + ``adapter_model.safetensors``,
``save_pretrained``) plus ``refine_llm_lora.json`` (method, objective, configs, base model fingerprint,
history, train-set fingerprint). ``load_adapted`` loads it with ``PeftModel.from_pretrained`` and refuses an
adapter trained on another base model; ``reusable`` lets a re-run of the main job reuse an adapter trained
with the same settings instead of training it again. peft, trl and bitsandbytes are imported inside the
functions that need them.

Checkpoints (lora-reward): every ``CHECKPOINT_EVERY`` steps ``train_lora_reward`` writes ONE safetensors
file next to the adapter directory (``<out_dir>.checkpoint/last.safetensors``: trainable LoRA tensors,
AdamW state, torch RNG state for dropout, with the step, history and a key of the run's settings in its
metadata), replaced atomically. A re-run with the same settings resumes from it and ends with the
adapter an uninterrupted run writes, bit for bit (every step's sampling is seeded by (seed, step));
it is deleted once the adapter is saved.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from refine_llm import forward, metrics, models, rewards, scoring
from refine_llm.metrics.unqover import column
from refine_llm.training import load_optimizer, optimizer_tensors, step_seed
from refine_llm.config import LoraConfig
from refine_llm.errors import UserError
from refine_llm.io import atomic_dir, atomic_write_bytes, kill_point

__all__ = [
    "LoraResult",
    "INFO_FILE",
    "peft_lora_config",
    "add_lora",
    "train_reward",
    "train_lora_reward",
    "save_adapter",
    "load_adapted",
    "adapter_fingerprint",
    "model_key",
    "candidate_probs_of",
    "mean_abs_bias",
    "load_base",
    "device_of",
    "cpu_fp32_compute",
    "TrainSet",
    "prepare_train_set",
    "PeakMemory",
    "policy",
    "step_loss",
    "schedule",
    "trainable_params",
    "adapter_info",
    "train_data_fingerprint",
    "reusable",
]

log = logging.getLogger(__name__)

INFO_FILE = "refine_llm_lora.json"
CHECKPOINT_EVERY = 5  # lora-reward steps between checkpoints (a few MB each; a step takes seconds)
_CKPT_FILE = "last.safetensors"
_CKPT_META_KEY = "refine_llm_lora_state"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
@dataclass
class LoraResult:
    """What a LoRA training run produced. history: one dict per step (step, abs_c = mean |C| of the
    step's tuples before the update, loss, ...); peak_memory_mb: CUDA max allocated, or on CPU the
    process RSS sampled at every step (the largest value)."""

    method: str  # "lora-reward" | "lora-cda"
    adapter_dir: str
    trainable_params: int
    train_seconds: float
    peak_memory_mb: float
    history: list[dict] = field(default_factory=list)
    objective: str | None = None
    config: dict = field(default_factory=dict)

    def row(self) -> dict:
        """The report's ``methods`` row fields this result knows (metrics come from scoring the test split)."""
        return {"method": self.method if self.objective in (None, "reinforce") else f"{self.method}-{self.objective}",
                "trainable_params": self.trainable_params, "train_seconds": round(self.train_seconds, 2),
                "peak_memory_mb": round(self.peak_memory_mb, 1)}


# ---------------------------------------------------------------------------------------------
# memory


class PeakMemory:
    """CUDA: max allocated since start(); CPU: the largest RSS seen at ``sample()`` calls."""

    def __init__(self, device) -> None:
        import torch

        self.cuda = str(device).startswith("cuda")
        self.peak = 0.0
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(device)
        self.sample()

    def sample(self) -> float:
        if self.cuda:
            import torch

            self.peak = max(self.peak, torch.cuda.max_memory_allocated() / 2**20)
        else:
            import psutil

            self.peak = max(self.peak, psutil.Process().memory_info().rss / 2**20)
        return self.peak


# ---------------------------------------------------------------------------------------------
# model: adapters on (quantized) weights


def peft_lora_config(cfg: LoraConfig):
    """peft.LoraConfig from ours (QLoRA recipe: adapters on all linear layers unless cfg says otherwise)."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                          target_modules=cfg.target_modules, task_type="CAUSAL_LM")


def device_of(model):
    return next(model.parameters()).device


def add_lora(model, cfg: LoraConfig, gradient_checkpointing: bool | None = None):
    """Wrap a loaded model (``models.load_model``) with fresh LoRA adapters; returns the PeftModel.

    Quantized (nf4/int8) models go through ``prepare_model_for_kbit_training`` first (fp32 norms and
    embeddings, frozen base). Gradient checkpointing is off unless asked for: the reward trainer runs the
    shared few-shot prefix once per step (``refine_llm.forward``), so activations are those of ~B short
    suffixes, and transformers drops the prefix KV cache under checkpointing (the trainer then falls back
    to whole prompts: exact, ~4x slower). Turn it on for long prompts without a shared prefix. The model
    is modified in place (``PeftModel.unload()`` gives the base back)."""
    import torch
    from peft import get_peft_model, prepare_model_for_kbit_training

    gc = bool(gradient_checkpointing)
    quantized = getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        cpu_fp32_compute(model)
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(cfg.seed)  # LoRA A init
    return get_peft_model(model, peft_lora_config(cfg))


def cpu_fp32_compute(model) -> None:
    """On CPU, run the 4-bit layers' matmuls in fp32 instead of bf16 (weights stay NF4).

    CPUs without AVX512-BF16 emulate bf16 matmuls: one SmolLM2 forward took 4.5 s with bf16 compute and
    0.8 s with fp32 on the 2-core test machine. The trained adapters are later scored with the paper's
    bf16 compute (``load_adapted``), a difference at bf16 rounding level. CUDA keeps bf16."""
    import torch

    if device_of(model).type != "cpu":
        return
    for m in model.modules():
        if hasattr(m, "compute_dtype") and type(m).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4"):
            m.compute_dtype = torch.float32


def trainable_params(model) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def load_base(model_dir_or_name, quant: str, tokenizer, device):
    if not isinstance(model_dir_or_name, (str, os.PathLike)):
        raise UserError(f"pass a model name or directory, got {type(model_dir_or_name).__name__}; to train an already "
                        "loaded model use lora.add_lora + lora.train_reward")
    model, tok = models.load_model(str(model_dir_or_name), quant=quant, device=device)
    return model, (models.prepare_tokenizer(tokenizer) if tokenizer is not None else tok)


# ---------------------------------------------------------------------------------------------
# questions -> token ids, candidates, tuples


@dataclass
class TrainSet:
    """Questions as the trainer needs them. ids: prompt token ids per row; cand: [subj1 ids, subj2 ids]
    per row (scoring.candidate_token_ids); tuple_rows (N,2,2) rows [order, polarity]; spec_of_tuple:
    specified rows per tuple; gold_pos: row -> 0/1 (metrics.gold_positions)."""

    ids: list[list[int]]
    cand: list[list[list[int]]]
    tuple_rows: np.ndarray
    spec_of_tuple: list[list[int]]
    gold_pos: dict[int, int]
    pad_id: int
    prefix_len: int = 0  # tokens every prompt starts with (the few-shot prefix), run once per forward
    ref_kv: Any = None  # the frozen model's prefix KV (adapters off), computed once per training run


def prepare_train_set(questions, prompt, tokenizer, pronouns: bool = False) -> TrainSet:
    rows, meta = metrics.tuple_index(questions)
    ctx, q = column(questions, "context"), column(questions, "question")
    s1, s2 = column(questions, "subj1"), column(questions, "subj2")
    g1, g2 = column(questions, "subj1_group"), column(questions, "subj2_group")
    cat, spec, tid = (column(questions, c) for c in ("category", "specified", "tuple_id"))
    texts = [prompt.render(c, qq, tokenizer) for c, qq in zip(ctx, q)]
    ids = tokenizer(texts, add_special_tokens=prompt.add_special_tokens)["input_ids"]
    memo: dict[tuple[str, str | None], list[int]] = {}

    def cands(subject: str, group: str | None) -> list[int]:
        if (subject, group) not in memo:
            memo[(subject, group)] = scoring.candidate_token_ids(tokenizer, subject, group)
        return memo[(subject, group)]

    cand = []
    for m in range(len(texts)):
        by_group = pronouns and cat[m] == "gender"
        cand.append([cands(s1[m], g1[m] if by_group else None), cands(s2[m], g2[m] if by_group else None)])
    t_index = {t: n for n, t in enumerate(meta["tuple_id"])}
    spec_of_tuple: list[list[int]] = [[] for _ in t_index]
    spec_rows = [m for m in range(len(texts)) if spec[m] and tid[m] in t_index]
    for m in spec_rows:
        spec_of_tuple[t_index[tid[m]]].append(m)
    gold_pos = dict(zip(spec_rows, metrics.gold_positions(questions, spec_rows).tolist()))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return TrainSet(ids, cand, rows, spec_of_tuple, gold_pos, pad, forward.common_prefix_len(ids))


def _logits(model, ts: TrainSet, rows: list[int], kv=None):
    """(R, V) float32 answer-position logits of rows (``forward.answer_logits``, the few-shot prefix once);
    gradients flow when grad is enabled. ``kv``: a prefix KV computed earlier (the frozen reference's)."""
    import torch

    prefix = ts.ids[0][: ts.prefix_len] if ts.prefix_len else None
    _, logits = forward.answer_logits(model, [ts.ids[r] for r in rows], pad_id=ts.pad_id, prefix_ids=prefix, kv=kv,
                                      grad=torch.is_grad_enabled())
    return logits


def policy(model, ts: TrainSet, rows: list[int], k: int, kv=None):
    """Rows -> (full log-softmax (R,V), top-k renormalised log-probs (R,k), cand mask (R,2,k) bool).
    Gradients flow through the top-k values; the top-k ids and the mask are constants."""
    import torch

    logp = torch.log_softmax(_logits(model, ts, rows, kv), dim=-1)
    top = torch.topk(logp, k, dim=-1)
    lpk = torch.log_softmax(top.values, dim=-1)
    mask = scoring.cand_mask_of(top.indices.detach().cpu().numpy(), [ts.cand[r] for r in rows])
    return logp, lpk, torch.as_tensor(mask, device=lpk.device)


def candidate_probs_of(model, tokenizer, questions, prompt, top_k: int = 10, pronouns: bool = False,
                       batch_size: int = 16) -> np.ndarray:
    """(M, 2) top-k renormalised candidate probabilities of every row of ``questions`` under ``model``
    (no grad, eval mode). For monitoring and tests; the evaluation path is ``scoring.score``."""
    import torch

    ts = prepare_train_set(questions, prompt, tokenizer, pronouns)
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        kv = forward.prefix_kv(model, ts.ids[0][: ts.prefix_len]) if forward.prefix_usable(model, ts.prefix_len) else None
        for s in range(0, len(ts.ids), batch_size):
            _, lpk, mask = policy(model, ts, list(range(s, min(s + batch_size, len(ts.ids)))), top_k, kv)
            out.append(metrics.candidate_probs(lpk, mask).cpu().numpy())
    model.train(was)
    return np.concatenate(out) if out else np.zeros((0, 2))


def mean_abs_bias(model, tokenizer, questions, prompt, top_k: int = 10, pronouns: bool = False) -> float:
    """Mean |C| over the underspecified tuples of ``questions`` under ``model`` (eval mode)."""
    p = candidate_probs_of(model, tokenizer, questions, prompt, top_k, pronouns)
    rows, _ = metrics.tuple_index(questions)
    return float(np.abs(metrics.tuple_bias(metrics.gather_tuples(p, rows))).mean())


# ---------------------------------------------------------------------------------------------
# lora-reward


def step_loss(model, ts: TrainSet, tuples: np.ndarray, cfg: LoraConfig, g) -> tuple[Any, dict]:
    """One step's loss on tuples (n,) and its logs: ``rewards.policy_loss`` on the adapted model's top-k."""
    import torch

    flat = ts.tuple_rows[tuples].reshape(-1).tolist()  # (4n,) in (tuple, order, polarity) order
    spec = [m for t in tuples for m in ts.spec_of_tuple[t]] if cfg.utility_weight > 0 else []
    logp, lpk, mask = policy(model, ts, flat + spec, int(cfg.top_k))
    dev, n4 = lpk.device, len(flat)
    extra = {}
    if spec:
        gold = torch.tensor([ts.gold_pos[m] for m in spec], device=dev)
        extra["spec_logp"], extra["spec_gold_mask"] = lpk[n4:], mask[n4:][torch.arange(len(spec), device=dev), gold]
        if cfg.kl_weight > 0:
            with torch.no_grad(), model.disable_adapter():  # the frozen model: same weights, adapters off
                if ts.ref_kv is None and forward.prefix_usable(model, ts.prefix_len):
                    ts.ref_kv = forward.prefix_kv(model, ts.ids[0][: ts.prefix_len])
                ref = torch.log_softmax(_logits(model, ts, spec, ts.ref_kv), dim=-1)
            extra["spec_kl"] = rewards.kl_to_base(ref, logp[n4:])  # full vocabulary
    weights = rewards.Weights(cfg.answer_mass_weight, cfg.utility_weight, cfg.kl_weight)
    return rewards.policy_loss(lpk[:n4], mask[:n4], cfg.objective, weights, samples=int(cfg.samples), generator=g,
                               **extra)


def schedule(n_tuples: int, cfg: LoraConfig):
    """cfg.steps batches of min(batch_size, N) tuples: seeded epochs of a permutation, no tuple twice per epoch."""
    bs = min(cfg.batch_size, n_tuples)
    per_epoch = n_tuples // bs
    for step in range(cfg.steps):
        epoch, b = divmod(step, per_epoch)
        perm = np.random.default_rng(step_seed(cfg.seed, -1 - epoch)).permutation(n_tuples)
        yield step, np.sort(perm[b * bs: (b + 1) * bs])


def _save_checkpoint(path: Path, model, opt, state: dict) -> None:
    """One safetensors file: trainable tensors, optimizer state and RNG state; ``state`` (JSON) in its metadata."""
    import torch
    from safetensors.torch import save

    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    optim, groups = optimizer_tensors(opt)
    tensors.update(optim)
    tensors["rng.cpu"] = torch.get_rng_state()  # LoRA dropout draws from the global generator
    dev = device_of(model)
    if dev.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(dev)
    meta = {_CKPT_META_KEY: json.dumps({**state, "param_groups": groups}, allow_nan=True)}
    atomic_write_bytes(path, save(tensors, metadata=meta))
    kill_point("lora")  # test hook (refine_llm.io): a kill -9 right after a checkpoint


def _load_checkpoint(path: Path, model, opt, key: str) -> dict | None:
    """Restore a checkpoint written with the same settings ``key`` in place; its state, or None (start fresh)."""
    import torch
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            state = json.loads((f.metadata() or {})[_CKPT_META_KEY])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # not ours / damaged: never half-trust it
        log.warning("ignoring unreadable LoRA checkpoint %s (%s); training from step 0", path, e)
        return None
    if state.get("key") != key:
        log.warning("LoRA checkpoint %s is for other settings; training from step 0", path)
        return None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(params) != {k[6:] for k in tensors if k.startswith("param.")}:
        log.warning("LoRA checkpoint %s holds other parameters; training from step 0", path)
        return None
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    load_optimizer(opt, tensors, state.pop("param_groups"))
    torch.set_rng_state(tensors["rng.cpu"])
    if "rng.cuda" in tensors and device_of(model).type == "cuda":
        torch.cuda.set_rng_state(tensors["rng.cuda"], device_of(model))
    return state


def train_reward(model, tokenizer, questions, prompt, cfg: LoraConfig, *, pronouns: bool = False,
                 progress: bool = False, checkpoint_dir=None, checkpoint_key: str = "") -> dict:
    """Train the active adapter of a PeftModel in place with the head's reward (cfg.objective: reinforce or
    direct) for cfg.steps steps of cfg.batch_size tuples of ``questions`` (pass the train split).

    checkpoint_dir: write a checkpoint there every ``CHECKPOINT_EVERY`` steps and resume from one made
    with the same ``checkpoint_key`` (the caller's hash of everything that determines the run).
    Returns {"history", "train_seconds", "peak_memory_mb", "trainable_params", "resumed_from"}."""
    import torch

    from refine_llm.progress import progress as progress_bar

    if not hasattr(model, "disable_adapter"):
        raise UserError("train_reward needs a peft model: wrap it with lora.add_lora(model, cfg) first")
    ts = prepare_train_set(questions, prompt, tokenizer, pronouns)
    if len(ts.tuple_rows) == 0:
        raise UserError("no underspecified tuples to train on: pass the train split of a questions dataset")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UserError("the model has no trainable parameters: wrap it with lora.add_lora(model, cfg)")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    mem = PeakMemory(device_of(model))
    model.train()
    history, done, seconds_before = [], 0, 0.0
    ckpt = Path(checkpoint_dir) / _CKPT_FILE if checkpoint_dir is not None else None
    st = _load_checkpoint(ckpt, model, opt, checkpoint_key) if ckpt is not None else None
    if st is not None:
        history, done, seconds_before = st["history"], int(st["step"]), float(st["seconds"])
    t0 = time.perf_counter()
    # steps before `done` ran before the checkpoint this run resumed from
    for step, tuples in progress_bar(itertools.islice(schedule(len(ts.tuple_rows), cfg), done, None), total=cfg.steps,
                                     disable=not progress, desc=f"lora[{cfg.objective}]", leave=False, initial=done):
        g = torch.Generator().manual_seed(step_seed(cfg.seed, step))
        loss, logs = step_loss(model, ts, tuples, cfg, g)
        opt.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            opt.step()
        history.append({"step": step + 1, "loss": loss.item(), **logs})
        mem.sample()
        if ckpt is not None and (step + 1) % CHECKPOINT_EVERY == 0 and step + 1 < cfg.steps:
            _save_checkpoint(ckpt, model, opt, {"key": checkpoint_key, "step": step + 1, "history": history,
                                                "seconds": seconds_before + time.perf_counter() - t0})
    model.eval()
    return {"history": history, "train_seconds": seconds_before + time.perf_counter() - t0,
            "peak_memory_mb": mem.sample(), "trainable_params": trainable_params(model),
            "resumed_from": done or None}


def train_lora_reward(model_dir_or_name, questions_train, prompt, cfg: LoraConfig, out_dir, quant: str = "nf4",
                      tokenizer=None, *, device: str | None = None, pronouns: bool = False,
                      gradient_checkpointing: bool | None = None, progress: bool = False) -> LoraResult:
    """Load the model, add LoRA adapters, train them with the head's reward on ``questions_train`` and save
    them to ``out_dir`` (peft format + refine_llm_lora.json). Score with ``load_adapted`` + ``scoring.score``."""
    model, tok = load_base(model_dir_or_name, quant, tokenizer, device)
    source = model.refine_llm_source
    peft_model = add_lora(model, cfg, gradient_checkpointing)
    # A kill -9 resumes from <out_dir>.checkpoint when everything that determines the run is the same.
    ckpt_dir = Path(out_dir).with_name(Path(out_dir).name + ".checkpoint")
    key = hashlib.sha256(json.dumps(
        [asdict(cfg), models.fingerprint(source), quant, prompt.fingerprint, train_data_fingerprint(questions_train),
         bool(pronouns), bool(gradient_checkpointing), str(device_of(peft_model))]).encode()).hexdigest()[:16]
    res = train_reward(peft_model, tok, questions_train, prompt, cfg, pronouns=pronouns, progress=progress,
                       checkpoint_dir=ckpt_dir, checkpoint_key=key)
    info = adapter_info("lora-reward", cfg, source, quant, prompt, res, objective=cfg.objective)
    info.update(train_fingerprint=train_data_fingerprint(questions_train), pronouns=bool(pronouns))
    save_adapter(peft_model, out_dir, info)
    shutil.rmtree(ckpt_dir, ignore_errors=True)
    return LoraResult("lora-reward", str(Path(out_dir)), res["trainable_params"], res["train_seconds"],
                      res["peak_memory_mb"], res["history"], cfg.objective, asdict(cfg))


# ---------------------------------------------------------------------------------------------
# lora-cda


# ---------------------------------------------------------------------------------------------
# artifacts


def train_data_fingerprint(questions) -> str:
    """16 hex digits naming a training set (its question ids and texts), stored with the adapter."""
    h = hashlib.sha256()
    for c in ("question_id", "context", "question"):
        h.update(json.dumps(column(questions, c)).encode())
    return h.hexdigest()[:16]


def reusable(out_dir, method: str, cfg: LoraConfig, model_dir_or_name, quant: str, prompt, questions_train,
             pronouns: bool = False):
    """The LoraResult of an adapter already in ``out_dir`` trained by the same method with the same config,
    base model, quantization, prompt, candidate sets (``pronouns``) and train questions (a re-run of the main
    job reuses it, as it reuses cached scores), else None."""
    d = Path(out_dir)
    try:
        info = json.loads((d / INFO_FILE).read_text())
        adapter_fingerprint(d)
    except (OSError, ValueError, UserError):
        return None
    want = {"method": method, "config": asdict(cfg), "quant": quant, "prompt_fingerprint": prompt.fingerprint,
            "base_fingerprint": models.fingerprint(models.resolve(str(model_dir_or_name))),
            "train_fingerprint": train_data_fingerprint(questions_train)}
    if any(info.get(k) != v for k, v in want.items()) or bool(info.get("pronouns", False)) != bool(pronouns):
        return None
    return LoraResult(method, str(d), info["trainable_params"], info["train_seconds"], info["peak_memory_mb"],
                      info.get("history") or [], info.get("objective"), info["config"])


def adapter_info(method: str, cfg: LoraConfig, source, quant: str, prompt, res: dict, objective) -> dict:
    return {"method": method, "objective": objective, "config": asdict(cfg),
            "base_model": source.name, "hub_id": source.hub_id, "base_fingerprint": models.fingerprint(source),
            "quant": quant, "prompt": prompt.name, "prompt_fingerprint": prompt.fingerprint,
            "trainable_params": res["trainable_params"], "train_seconds": res["train_seconds"],
            "peak_memory_mb": res["peak_memory_mb"], "history": res["history"]}


def save_adapter(peft_model, out_dir, info: dict | None = None) -> Path:
    """``save_pretrained`` (safetensors) + ``refine_llm_lora.json`` into ``out_dir``, atomically (temp dir
    next to it, then rename; an existing adapter there is replaced)."""
    out = Path(out_dir).absolute()
    with atomic_dir(out) as tmp:
        name = peft_model.active_adapter
        peft_model.save_pretrained(str(tmp), safe_serialization=True, selected_adapters=[name])
        sub = tmp / name  # peft writes a non-"default" adapter into a subfolder: move it up
        if not (tmp / ADAPTER_FILES[0]).is_file() and (sub / ADAPTER_FILES[0]).is_file():
            for f in sub.iterdir():
                os.replace(f, tmp / f.name)
            sub.rmdir()
        (tmp / INFO_FILE).write_text(json.dumps(info or {}, indent=1, default=str))
    return out


def adapter_fingerprint(adapter_dir) -> str:
    """16 hex digits that change when the adapter's weights or config change (for score caches)."""
    d = Path(adapter_dir)
    missing = [f for f in ADAPTER_FILES if not (d / f).is_file()]
    if missing:
        raise UserError(f"{d}: not a peft adapter directory (missing {', '.join(missing)}); pass the out_dir of "
                        "train_lora_reward / train_lora_cda")
    h = hashlib.sha256()
    for f in ADAPTER_FILES:
        h.update((d / f).read_bytes())
    return h.hexdigest()[:16]


def model_key(model_dir_or_name: str, adapter_dir, quant: str = "nf4") -> str:
    """The scoring cache key of base model + adapter: ``<base fingerprint>-<quant>-<adapter fingerprint>``."""
    return f"{models.fingerprint(models.resolve(str(model_dir_or_name)))}-{quant}-{adapter_fingerprint(adapter_dir)}"


def load_adapted(model_dir_or_name, adapter_dir, quant: str = "nf4", device: str | None = None):
    """Base model + adapter (``PeftModel.from_pretrained``), frozen and in eval mode: ``(model, tokenizer)``.

    The returned model is the transformers model with the LoRA layers injected (``peft_model.get_base_model()``,
    adapters active), so ``scoring.score`` and serving see an ordinary causal LM; the PeftModel is at
    ``model.peft_model``. Its ``refine_llm_quant`` is ``<quant>-<adapter fingerprint>``, so that
    ``scoring.default_model_key(model)`` equals ``model_key(...)`` and never collides with the base model's
    cache. Refuses an adapter trained on another base model.
    """
    from peft import PeftModel

    fp_adapter = adapter_fingerprint(adapter_dir)
    info_path = Path(adapter_dir) / INFO_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    source = models.resolve(str(model_dir_or_name))
    fp = models.fingerprint(source)
    if info.get("base_fingerprint") not in (None, fp):
        raise UserError(f"{adapter_dir}: this adapter was trained on {info.get('base_model')!r} (fingerprint "
                        f"{info['base_fingerprint']}), not on {model_dir_or_name!r} ({fp}); load it with its base model")
    base, tok = models.load_model(str(model_dir_or_name), quant=quant, device=device)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    peft_model.eval()
    inner = peft_model.get_base_model()
    for p in inner.parameters():
        p.requires_grad_(False)
    inner.refine_llm_source = source
    inner.refine_llm_quant = f"{quant}-{fp_adapter}"
    inner.refine_llm_adapter = {"dir": str(adapter_dir), "fingerprint": fp_adapter, **{
        k: info.get(k) for k in ("method", "objective")}}
    object.__setattr__(inner, "peft_model", peft_model)  # not a submodule: that would be a cycle
    return inner, tok

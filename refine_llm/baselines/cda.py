"""lora-cda: counterfactual data augmentation and plain SFT with trl's SFTTrainer and a peft LoraConfig.

``build_cda_dataset`` pairs each example with its subject-swapped twin (both subjects exchanged in context,
question and answer): specified questions answer with their gold; underspecified questions answer with
each subject in turn, so the target set is balanced by identity and by position. The adapters, their
artifacts (``refine_llm_lora.json``), the base model's loading and the peak-memory sampling are
refine_llm.baselines.lora's. trl and peft are imported inside ``train_lora_cda``.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from refine_llm import metrics, rewards
from refine_llm.baselines.lora import (LoraResult, PeakMemory, adapter_info, cpu_fp32_compute, device_of, load_base,
                                       peft_lora_config, policy, prepare_train_set, save_adapter,
                                       train_data_fingerprint, trainable_params)
from refine_llm.config import LoraConfig
from refine_llm.metrics.unqover import column

__all__ = ["swap_subjects", "build_cda_dataset", "train_lora_cda"]


def swap_subjects(text: str, a: str, b: str) -> str:
    """Exchange every whole-word occurrence of ``a`` and ``b`` in ``text`` (in one pass; longer first)."""
    if not a or not b or a == b:
        return text
    alts = "|".join(re.escape(x) for x in sorted((a, b), key=len, reverse=True))
    return re.sub(rf"(?<!\w)({alts})(?!\w)", lambda m: b if m[1] == a else a, text)


def build_cda_dataset(questions, prompt, tokenizer=None, *, include_underspecified: bool = True,
                      dedupe: bool = True):
    """Counterfactually augmented SFT data: a ``datasets.Dataset`` with trl's prompt/completion columns.

    Each example (context, question, answer) is paired with its twin where subj1 and subj2 are exchanged
    everywhere (context, question, answer). Specified rows answer with their gold. Underspecified rows
    answer with subj1 and, separately, subj2 (each with its twin): one answer per row would, with its
    twin, always name the subject in the same position. ``dedupe`` drops repeated (prompt, completion)
    pairs (our question sets already hold both name orders, so many twins are rows of the set).
    Extra columns (context, question, answer, subj1, subj2, specified, counterfactual,
    source_question_id) are for inspection; ``train_lora_cda`` keeps only prompt and completion.
    """
    from datasets import Dataset

    cols = {c: column(questions, c) for c in ("question_id", "context", "question", "subj1", "subj2", "specified", "gold")}
    out: dict[str, list] = {c: [] for c in ("prompt", "completion", "context", "question", "answer", "subj1", "subj2",
                                            "specified", "counterfactual", "source_question_id")}
    seen = set()

    def add(ctx, q, ans, s1, s2, spec, cf, qid):
        text = prompt.render(ctx, q, tokenizer)
        completion = ("" if text[-1:].isspace() else " ") + ans
        if dedupe and (text, completion) in seen:
            return
        seen.add((text, completion))
        for c, v in zip(out, (text, completion, ctx, q, ans, s1, s2, spec, cf, qid)):
            out[c].append(v)

    for m in range(len(cols["question_id"])):
        a, b, spec = cols["subj1"][m], cols["subj2"][m], bool(cols["specified"][m])
        if not spec and not include_underspecified:
            continue
        answers = [cols["gold"][m]] if spec else [a, b]
        ctx, q, qid = cols["context"][m], cols["question"][m], cols["question_id"][m]
        for ans in answers:
            add(ctx, q, ans, a, b, spec, False, qid)
            add(swap_subjects(ctx, a, b), swap_subjects(q, a, b), swap_subjects(ans, a, b), b, a, spec, True, qid)
    return Dataset.from_dict(out)


def train_lora_cda(model_dir_or_name, questions_train, prompt, cfg: LoraConfig, out_dir, quant: str = "nf4",
                   tokenizer=None, *, device: str | None = None, include_underspecified: bool = True,
                   monitor_every: int = 1, pronouns: bool = False, gradient_checkpointing: bool | None = None,
                   progress: bool = False) -> LoraResult:
    """SFT of LoRA adapters (trl SFTTrainer + peft LoraConfig) on ``build_cda_dataset(questions_train)``:
    cfg.steps steps of 4 x cfg.batch_size examples (a tuple's worth of prompts per tuple of the reward
    trainer), constant lr cfg.lr, completion-only loss. ``monitor_every`` > 0 logs mean |C| on a fixed
    batch of train tuples every that many steps (its forward passes are not counted in train_seconds)."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from refine_llm.progress import stderr_is_tty

    model, tok = load_base(model_dir_or_name, quant, tokenizer, device)
    source = model.refine_llm_source
    dev = device_of(model)
    gc = dev.type == "cuda" if gradient_checkpointing is None else gradient_checkpointing
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
        cpu_fp32_compute(model)
    data = build_cda_dataset(questions_train, prompt, tok, include_underspecified=include_underspecified)
    data = data.select_columns(["prompt", "completion"])
    ts = prepare_train_set(questions_train, prompt, tok, pronouns)
    mon_tuples = np.arange(min(cfg.batch_size, len(ts.tuple_rows)))
    mem = PeakMemory(dev)
    history: list[dict] = []
    monitor_seconds = [0.0]

    def abs_c(m) -> float:
        t = time.perf_counter()
        was = m.training
        m.eval()
        with torch.no_grad():
            flat = ts.tuple_rows[mon_tuples].reshape(-1).tolist()
            _, lpk, mask = policy(m, ts, flat, int(cfg.top_k))
            c = rewards.tuple_c(metrics.candidate_probs(lpk, mask)).abs().mean().item()
        m.train(was)
        monitor_seconds[0] += time.perf_counter() - t
        return c

    class _Log(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kw):
            if monitor_every and state.global_step % monitor_every == 0 and len(mon_tuples):
                history.append({"step": state.global_step + 1, "abs_c": abs_c(model)})

        def on_log(self, args, state, control, logs=None, **kw):
            mem.sample()
            if logs and "loss" in logs:
                rec = next((h for h in history if h["step"] == state.global_step), None)
                if rec is None:
                    rec = {"step": state.global_step}
                    history.append(rec)
                rec["loss"] = float(logs["loss"])

    with tempfile.TemporaryDirectory(prefix="refine_llm_cda-") as tmp:
        args = SFTConfig(
            output_dir=tmp, max_steps=cfg.steps, per_device_train_batch_size=4 * cfg.batch_size,
            learning_rate=cfg.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            logging_steps=1, save_strategy="no", report_to="none", seed=cfg.seed, data_seed=cfg.seed,
            use_cpu=dev.type == "cpu", gradient_checkpointing=gc, completion_only_loss=True, max_length=None,
            # bf16 autocast on a CPU without native bf16 (AVX2 only here) made one step 259 s instead of seconds
            bf16=dev.type == "cuda" and torch.cuda.is_bf16_supported(), fp16=False,
            disable_tqdm=not progress or not stderr_is_tty(), dataloader_num_workers=0,
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok,
                             peft_config=peft_lora_config(cfg), callbacks=[_Log()])
        t0 = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - t0 - monitor_seconds[0]
    peft_model = trainer.model
    peft_model.eval()
    history.sort(key=lambda h: h["step"])
    res = {"history": history, "train_seconds": seconds, "peak_memory_mb": mem.sample(),
           "trainable_params": trainable_params(peft_model), "examples": len(data)}
    info = adapter_info("lora-cda", cfg, source, quant, prompt, res, objective=None)
    info.update(train_fingerprint=train_data_fingerprint(questions_train), pronouns=bool(pronouns))
    save_adapter(peft_model, out_dir, info)
    return LoraResult("lora-cda", str(Path(out_dir)), res["trainable_params"], seconds, res["peak_memory_mb"],
                      history, None, asdict(cfg))

"""Stage 3, train: heads (REFINE variants and rank-bias), the BBQ head and the LoRA adapters, on the cached
scores; nothing is evaluated here.

The LLM does not run for the heads (``refine_llm.bandit`` on cached scores; the contextual head reads the
model's output embedding, which is loaded for it). Each head is saved with ``save_pretrained`` in
``heads/<variant>/`` (its trainer checkpoints in ``heads/<variant>/checkpoints/<config hash>/``, so an
interrupted run resumes and a re-run with the same settings reuses the head); with ``--seeds`` every seed
trains into ``seeds/seed-<s>/heads/``. The first seed's directory also gets the BBQ head
(``heads/bbq/head``, ``--bbq``) and the LoRA adapters (``adapters/<method>/``, which train the LLM itself).
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from refine_llm.config import CONTEXT_VARIANTS, LoraConfig, QuestionsConfig, RunConfig
from refine_llm.errors import UserError
from refine_llm.stages.common import (ANCHOR, TRAIN_INFO, cached_scores, condition_name, config_hash, log,
                                      load_output_embedding, model_loader, score_info, seed_dirs, splits, write_json)

# The probe baseline's ridge penalty: fixed (no validation), as a user would fit a linear probe.
PROBE_L2 = 1.0

__all__ = ["bandit_data", "gate_token_ids", "gate_subjects", "train_gate", "lora_runs", "train_heads", "train_bbq", "train_lora", "run"]


def bandit_data(questions, scores, with_hidden: bool = False, anchors=None):
    """BanditData (refine_llm.bandit) for one split: the glue between the cached datasets and the trainer.
    ``anchors``: the scores of prompts with nothing to debias (the anchor term of the training objective)."""
    from refine_llm import metrics
    from refine_llm.bandit import BanditData

    rows, meta = metrics.tuple_index(questions)
    spec = np.array([i for i, s in enumerate(questions["specified"]) if s], dtype=np.int64)
    sc = scores.with_format("numpy")
    hidden = None
    if with_hidden:
        if "hidden" not in scores.column_names:
            raise UserError("the contextual head needs hidden states: score with --store-hidden")
        hidden = np.stack(sc["hidden"]).astype(np.float32)
    anchor = {}
    if anchors is not None:
        a = anchors.with_format("numpy")
        anchor = {"anchor_logprobs": np.stack(a["topk_logprobs"]).astype(np.float32),
                  "anchor_ids": np.stack(a["topk_ids"]).astype(np.int64),
                  "anchor_hidden": (np.stack(a["hidden"]).astype(np.float32)
                                    if with_hidden and "hidden" in a.column_names else None)}
    return BanditData(
        topk_logprobs=np.stack(sc["topk_logprobs"]).astype(np.float32),
        topk_ids=np.stack(sc["topk_ids"]).astype(np.int64),
        cand_mask=np.stack([np.stack(m) for m in sc["cand_mask"]]).astype(bool),
        tuple_rows=rows,
        hidden=hidden,
        spec_rows=spec if len(spec) else None,
        spec_gold=metrics.gold_positions(questions, spec) if len(spec) else None,
        tuple_meta={k: meta[k] for k in ("subj_a", "subj_b", "group_a", "group_b", "attribute_id", "category")},
        **anchor,
    )


def gate_token_ids(tokenizer, qcfg: QuestionsConfig) -> list[int]:
    """The category vocabulary (names, demonyms, group nouns) and pronouns: the slot head's category features
    and serving's ``gated`` mode (saved with every head)."""
    from refine_llm import questions as Q, vocab

    return vocab.gate_token_ids(tokenizer, [w for c in qcfg.categories for w in Q.category_vocabulary(c, qcfg.wordlists)])


def lora_runs(cfg: RunConfig) -> list[tuple[str, str, LoraConfig]]:
    """(condition name, kind, LoraConfig) of every LoRA baseline the run trains: --method all trains
    lora-reward with both objectives; --method lora-reward with --lora-objective."""
    out = []
    for m in cfg.methods:
        if not m.startswith("lora"):
            continue
        objective = "direct" if m == "lora-reward-direct" else cfg.lora.objective
        steps = cfg.cda_steps if (m == "lora-cda" and cfg.cda_steps) else cfg.lora.steps
        if m == "lora-reward" and objective != "reinforce":
            m = f"lora-reward-{objective}"
        out.append((m, "lora-cda" if m == "lora-cda" else "lora-reward", replace(cfg.lora, objective=objective, steps=steps)))
    return out


def train_heads(cfg: RunConfig, out: Path, parts: dict, scores: dict, tokenizer, info: dict, lm_w, timing: dict) -> None:
    """rank-bias and each head variant, trained on the train split (best of N on validation) and saved."""
    import torch

    from refine_llm import bandit
    from refine_llm.methods import heads as H
    from refine_llm.vocab import tokenizer_fingerprint

    needs_hidden = bool(set(CONTEXT_VARIANTS) & set(cfg.head_variants))
    t = time.time()
    train = bandit_data(parts["train"], scores["train"], with_hidden=needs_hidden, anchors=scores.get(ANCHOR))
    val = bandit_data(parts["validation"], scores["validation"], with_hidden=needs_hidden)
    timing["bandit_data"] = time.time() - t
    fp = tokenizer_fingerprint(tokenizer)
    gate = gate_token_ids(tokenizer, cfg.questions)
    meta = {"base_model": info["model"], "hub_id": info.get("hub_id"), "tokenizer_fingerprint": fp,
            "category": cfg.questions.category, "gate_token_ids": gate, "prompt": None}
    training_data = {"questions": f"refine_llm template questions, {cfg.questions.category}, train split",
                     "tuples": train.num_tuples, "wordlists": cfg.questions.wordlists or "built-in"}
    t = time.time()
    rank = H.RankBiasHead(cfg.scoring.top_k)  # the input-independent per-rank baseline, trained like the heads
    res = bandit.train_head(rank, train, cfg.bandit, val=val, progress=False)
    rank.eval()
    H.save_head(rank, out / "heads" / "rank-bias", {**meta, "training": res.summary(), "bandit": asdict(cfg.bandit)},
                {"training_data": training_data})
    timing["train_rank_bias"] = time.time() - t
    for variant in cfg.head_variants:
        t = time.time()
        if variant == "gate":  # fitted, not bandit-trained (refine_llm.methods.gate: why), plus its probe baseline
            train_gate(cfg, out, parts, train, val, tokenizer, lm_w, meta, training_data, timing)
            continue
        torch.manual_seed(cfg.bandit.seed)
        head = H.build_head(replace(cfg.head, variant=variant), lm_head_weight=lm_w, seed=cfg.bandit.seed)
        if hasattr(head, "set_category_vocabulary"):  # the slot head reads which slots hold a candidate
            head.set_category_vocabulary(gate)
        bcfg = cfg.bandit.for_variant(variant)  # per-variant presets live in BanditConfig
        log(f"training head {variant} ({bcfg.objective}, lr {bcfg.lr}, {bcfg.epochs} epochs, "
            f"{train.num_tuples} tuples)")
        # Checkpoints are per training config, so a re-run with other settings starts fresh and an interrupted
        # run with the same settings resumes.
        ckpt = out / "heads" / variant / "checkpoints" / config_hash([asdict(bcfg), variant, train.num_tuples])
        res = bandit.train_head(head, train, bcfg, val=val, checkpoint_dir=ckpt, resume=True)
        head.eval()
        timing[f"train_{variant}"] = time.time() - t
        card = {"training_data": training_data,
                "metrics": {"condition": condition_name(variant, cfg.head.variant), "best validation μ": res.best_val_mu,
                            "initial validation μ": res.initial_val_mu, "best step": res.best_step}}
        H.save_head(head, out / "heads" / variant, {**meta, "training": res.summary(), "bandit": asdict(bcfg)}, card)


def gate_subjects(qcfg: QuestionsConfig) -> list[list[str]]:
    """Every subject of the run's categories with its surface forms: who the gate head tells apart."""
    from refine_llm import questions as Q

    return [forms for c in qcfg.categories for forms in Q.category_subjects(c, qcfg.wordlists)]


def train_gate(cfg: RunConfig, out: Path, parts: dict, train, val, tokenizer, lm_w, meta: dict, training_data: dict,
               timing: dict) -> None:
    """The ``gate`` head (ridge penalty chosen on validation, refit on train + validation, sharpened) and the
    ``probe`` baseline (the same gate fit on the train split alone with penalty 1, opening fully where it says
    open: the real-model finding the gate must beat). Open = an underspecified question. Both are exported to
    the logit space (served from the logits row) and saved like every head."""
    import torch

    from refine_llm import bandit, vocab
    from refine_llm.methods import heads as H
    from refine_llm.methods.gate import LogitSpace, fit_gate

    t = time.time()
    space = LogitSpace(lm_w)  # one (d+1)^2 Gram solve per run: h from the logits row
    timing["gate_logit_space"] = time.time() - t
    ids, membership = vocab.gate_vocabulary(tokenizer, gate_subjects(cfg.questions))
    is_open = lambda q: torch.tensor([not s for s in q["specified"]])
    tr, va = (train.hidden, is_open(parts["train"])), (val.hidden, is_open(parts["validation"]))

    def fresh():
        head = H.build_head(replace(cfg.head, variant="gate"), lm_head_weight=lm_w,
                            arch={"n_words": len(membership[0]), "n_tokens": len(ids)})
        head.set_vocabulary(ids, torch.tensor(membership, dtype=torch.bool))
        return head

    t = time.time()
    head = fresh()
    refit = (torch.cat([tr[0], va[0]]), torch.cat([tr[1], va[1]])) if cfg.head.gate_refit else None
    summary = fit_gate(head, tr, lambda h: bandit.evaluate_head(h, val)["val_mu"], cfg.head.gate_l2_grid,
                       refit=refit, sharpness=cfg.head.gate_sharpness)
    head.export_logit_gate(space)
    head.eval()
    summary["seconds"] = round(time.time() - t + timing["gate_logit_space"], 2)
    timing["train_gate"] = time.time() - t
    data = {**training_data, "validation": "penalty choice" + (" and refit" if cfg.head.gate_refit else "")}
    H.save_head(head, out / "heads" / "gate", {**meta, "training": summary},
                {"training_data": data, "metrics": {"condition": condition_name("gate", cfg.head.variant),
                                                    "chosen ridge penalty": summary["l2"]}})
    tried = ", ".join(f"{x['l2']:g}: {x['val_mu']:.4f}" for x in summary["l2_grid"])
    log(f"gate head: ridge penalty {summary['l2']:g} chosen by validation μ ({tried})")
    t = time.time()
    probe = fresh()
    info = probe.fit_probe(*tr, l2=PROBE_L2)
    probe.hard.fill_(True)
    probe.export_logit_gate(space)
    probe.eval()
    info["seconds"] = round(time.time() - t, 2)
    H.save_head(probe, out / "heads" / "probe", {**meta, "training": info},
                {"training_data": training_data, "metrics": {"condition": "probe"}})
    timing["train_probe"] = time.time() - t


def train_bbq(cfg: RunConfig, out: Path, scores_dir: Path, key: str, tokenizer, timing: dict) -> None:
    """--bbq: a logit head on BBQ's train templates, from the cached cloze scores -> heads/bbq/head."""
    from refine_llm.bbq.run import items_of
    from refine_llm.bbq.task import score_cloze, train_bbq_head
    from refine_llm.methods import heads as H
    from refine_llm.vocab import tokenizer_fingerprint
    from refine_llm.stages.score import bbq_scoring

    t = time.time()
    items = items_of(cfg.bbq.bbq_dir, cfg.bbq.bbq_max_items, cfg.seed)
    sc = score_cloze(None, None, items, bbq_scoring(cfg), scores_dir, key, read_only=True)
    head, summary = train_bbq_head(sc, items, cfg.scoring.top_k, cfg.seed)
    H.save_head(head, out / "heads" / "bbq" / "head", {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                                                       "category": "bbq", "training": summary, "prompt": "bbq_cloze"})
    timing["train_bbq"] = time.time() - t


def train_lora(cfg: RunConfig, out: Path, train_q, prompt_name: str, timing: dict) -> None:
    """The LoRA baselines (refine_llm.baselines.lora): each adapter trained once, or reused when the same
    config, model, prompt and train split trained it before."""
    from refine_llm import prompts
    from refine_llm.baselines import lora

    mcfg = cfg.model
    prompt = prompts.load_prompt(prompt_name)
    for m, kind, lcfg in lora_runs(cfg):
        t = time.time()
        res = lora.reusable(out / "adapters" / m, kind, lcfg, mcfg.name, mcfg.quant, prompt, train_q,
                            pronouns=cfg.scoring.pronouns)
        if res is not None:
            log(f"{m}: reusing the adapter in {res.adapter_dir} (same config, model, prompt and train split)")
            continue
        log(f"{m}: {lcfg.steps} steps of {lcfg.batch_size} tuples, lr {lcfg.lr}")
        from refine_llm.baselines import cda

        train_fn = cda.train_lora_cda if kind == "lora-cda" else lora.train_lora_reward
        train_fn(mcfg.name, train_q, prompt, lcfg, out / "adapters" / m, quant=mcfg.quant,
                 pronouns=cfg.scoring.pronouns, progress=True)
        timing[f"train_{m}"] = time.time() - t


def run(cfg: RunConfig, out: Path, questions, loaded=None) -> dict:
    """Train everything the run's methods need (see the module docstring); writes ``train.json`` per seed."""
    from refine_llm import evaluation, models

    info = score_info(out)
    prompt_name, parts = info["prompt"], splits(questions)
    timings = {}
    variants = cfg.head_variants
    run_model = model_loader(cfg, loaded)  # the run's model, loaded once if a plug-in method needs it

    if variants:
        scores = {s: cached_scores(cfg, out, parts[s], prompt_name) for s in ("train", "validation")}
        if cfg.bandit.anchor_weight > 0:
            scores[ANCHOR] = cached_scores(cfg, out, evaluation.unrelated_questions(part=ANCHOR), prompt_name)
        tokenizer = loaded[1] if loaded is not None else models.load_tokenizer(
            cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
        lm_w = load_output_embedding(cfg, loaded) if set(CONTEXT_VARIANTS) & set(variants) else None
    for i, (cfg_s, out_s) in enumerate(seed_dirs(cfg, out)):
        timing: dict[str, float] = {}
        if cfg.training_seeds is not None:
            log(f"seed {cfg_s.bandit.seed}: training into {out_s}")
        if variants:
            train_heads(cfg_s, out_s, parts, scores, tokenizer, info["model"], lm_w, timing)
        if i == 0 and cfg.bbq.bbq_dir and info["model"].get("backend") != "vllm":
            tok = tokenizer if variants else (loaded[1] if loaded is not None else models.load_tokenizer(cfg.model.name))
            train_bbq(cfg_s, out_s, out / "scores", info["model_key"], tok, timing)
        if i == 0 and lora_runs(cfg):
            train_lora(cfg_s, out_s, parts["train"], prompt_name, timing)
        if cfg.plugin_methods:  # a plug-in method that learns something saves it here (Method.train)
            from refine_llm.methods import TrainInputs
            from refine_llm.stages.passes import plugins

            t = time.time()
            inputs = TrainInputs({s: cached_scores(cfg, out, parts[s], prompt_name) for s in ("train", "validation")},
                                 {s: parts[s] for s in ("train", "validation")}, prompt_name, run_model, log)
            for method in plugins(cfg_s, out_s).values():
                method.train(cfg_s, out_s, inputs)
            timing["train_plugins"] = time.time() - t
        write_json(out_s / TRAIN_INFO, {"timing": timing})
        timings[str(out_s)] = timing
    return timings

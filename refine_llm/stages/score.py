"""Stage 2, score: every prompt the run will need, scored once, up front, by the one driver (refine_llm.scoring).

In order (the order matters only for which batches a row is first scored in, so it is fixed): the prompt
sweep on validation (``--prompt auto``), then the train, validation and test splits (train and validation
when heads train), the anchor prompts (the heads' anchor term), the unrelated prompts the report measures,
BBQ's cloze and lettered requests (``--bbq``), the test split in bf16 (``--compare-quant``) and every
plug-in method's extra pass on the test split and the unrelated prompts (``Method.passes()``). The record
of what ran, the chosen prompt and the cache's model key go to ``scores/score.json``; the model is freed.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from refine_llm.config import BBQ_MAX_BATCH_SIZE, RunConfig
from refine_llm.stages.common import ANCHOR, SCORE_INFO, log, splits, write_json

__all__ = ["AUTO_PROMPTS", "MIN_ANSWER_MASS", "SWEEP_TUPLES", "model_key", "Scorer", "choose_prompt", "bbq_scoring",
           "run"]

AUTO_PROMPTS = ("qa", "paper", "chat")
MIN_ANSWER_MASS = 0.5
SWEEP_TUPLES = 32  # validation tuples (with their specified questions) scored per candidate prompt


def model_key(cfg: RunConfig, source) -> str:
    """The cache key of what produces the numbers: weights + quantization (HF, Ray actors) or vLLM's dtype."""
    from refine_llm import models

    if cfg.scoring.backend == "vllm":
        from refine_llm.scoring.backends.vllm import vllm_dtype

        return f"{models.fingerprint(source)}-vllm-{vllm_dtype(cfg.model.quant)}"
    return f"{models.fingerprint(source)}-{cfg.model.quant}"


class Scorer:
    """Scores question sets with one loaded model, through the run's cache (``scoring.score``)."""

    def __init__(self, model, tokenizer, cfg: RunConfig, cache_dir: Path, key: str, model_dir: str,
                 vllm_dtype: str | None = None):
        self.model, self.tokenizer, self.scfg = model, tokenizer, cfg.scoring
        self.cache_dir, self.key, self.model_dir, self.vllm_dtype = cache_dir, key, model_dir, vllm_dtype or "float32"

    def __call__(self, questions, prompt_name: str):
        from refine_llm import prompts, scoring

        return scoring.score(self.model, self.tokenizer, questions, prompts.load_prompt(prompt_name), self.scfg,
                             cache_dir=self.cache_dir, model_key=self.key, model_dir=self.model_dir,
                             vllm_dtype=self.vllm_dtype)


def choose_prompt(scorer: Scorer, val_questions, requested: str, tokenizer) -> tuple[str, list[dict]]:
    """`--prompt auto`: the prompt with the highest specified accuracy on validation among those that
    put at least half of the probability on the two candidates (else the one with the most mass)."""
    from refine_llm import metrics
    from refine_llm.methods import Base, Scores

    if requested != "auto":
        return requested, []
    keep = set(sorted(set(val_questions["tuple_id"]))[:SWEEP_TUPLES])
    val_questions = val_questions.select([i for i, t in enumerate(val_questions["tuple_id"]) if t in keep])
    sweep = []
    for name in AUTO_PROMPTS:
        if name == "chat" and not getattr(tokenizer, "chat_template", None):
            continue
        sc = Scores.from_table(scorer(val_questions, name))
        p_full = Base().apply(sc).p_full
        spec = np.array([i for i, s in enumerate(val_questions["specified"]) if s], dtype=np.int64)
        acc = metrics.specified_accuracy(p_full[spec], metrics.gold_positions(val_questions, spec))["accuracy"]
        sweep.append({"prompt": name, "n_questions": len(val_questions), "answer_mass": metrics.answer_mass(p_full),
                      "specified_accuracy": acc, "topk_miss_rate": metrics.topk_miss_rate(sc.cand_in_topk)})
        log(f"prompt {name}: answer mass {sweep[-1]['answer_mass']:.3f}, specified accuracy {acc:.3f}")
    ok = [s for s in sweep if s["answer_mass"] >= MIN_ANSWER_MASS]
    best = max(ok, key=lambda s: s["specified_accuracy"]) if ok else max(sweep, key=lambda s: s["answer_mass"])
    for s in sweep:
        s["chosen"] = s is best
    return best["prompt"], sweep


def bbq_scoring(cfg: RunConfig):
    """How the main job scores BBQ: the run's top-k, batches of at most BBQ_MAX_BATCH_SIZE (long prompts),
    hidden states when a contextual head is among the run's heads (it is applied there)."""
    from refine_llm.bbq.run import scoring_config

    return scoring_config(cfg.scoring.top_k, min(cfg.scoring.batch_size, BBQ_MAX_BATCH_SIZE),
                          "contextual" in cfg.head_variants)


def run(cfg: RunConfig, out: Path, questions, loaded=None, info_only: bool = False) -> dict:
    """Score everything the run needs (see the module docstring); returns and writes ``scores/score.json``."""
    from refine_llm import evaluation, models

    timing: dict[str, float] = {}
    mcfg = cfg.model
    t = time.time()
    source = models.resolve(mcfg.name)
    vdtype = None
    if cfg.scoring.backend == "vllm":
        from refine_llm.scoring.backends.vllm import vllm_dtype

        vdtype = vllm_dtype(mcfg.quant)  # nf4/int8: refused in one line, never reported as what did not run
    if loaded is not None:
        model, tokenizer = loaded
    elif cfg.scoring.backend == "vllm":  # vLLM scores from the weights directory; only the tokenizer is needed
        model, tokenizer = None, models.load_tokenizer(mcfg.name, trust_remote_code=mcfg.trust_remote_code)
    else:
        model, tokenizer = models.load_model(mcfg.name, quant=mcfg.quant, device=mcfg.device,
                                             trust_remote_code=mcfg.trust_remote_code)
    info = models.summary(model) if model is not None else {
        "model": source.name, "hub_id": source.hub_id, "quant": mcfg.quant, "backend": "vllm", "dtype": vdtype}
    timing["load_model"] = time.time() - t
    log("model: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if info_only:
        return {"model": info}

    key = model_key(cfg, source)
    scorer = Scorer(model, tokenizer, cfg, out / "scores", key, models.model_dir(source), vdtype)
    parts = splits(questions)
    t = time.time()
    prompt_name, sweep = choose_prompt(scorer, parts["validation"], cfg.scoring.prompt, tokenizer)
    timing["prompt_sweep"] = time.time() - t
    log(f"prompt: {prompt_name}")
    t = time.time()
    for s, q in parts.items():  # train and validation when something trains on them (heads, plug-in methods)
        if s == "test" or cfg.head_variants or cfg.plugin_methods:
            scorer(q, prompt_name)
    if cfg.head_variants and cfg.bandit.anchor_weight > 0:  # unrelated prompts of the anchor families
        scorer(evaluation.unrelated_questions(part=ANCHOR), prompt_name)
    timing["scoring"] = time.time() - t
    t = time.time()  # the unrelated prompts the report measures (the other families)
    scorer(evaluation.unrelated_questions(part="test"), prompt_name)
    timing["unrelated_prompts"] = time.time() - t
    if cfg.bbq.bbq_dir:
        if model is None:
            log("--bbq: skipped, BBQ scoring needs the HF model (use --backend hf)")
        else:
            from refine_llm.bbq.run import items_of, score_all

            t = time.time()
            items = items_of(cfg.bbq.bbq_dir, cfg.bbq.bbq_max_items, cfg.seed)
            score_all(model, tokenizer, items, "both", bbq_scoring(cfg), out / "scores", key, progress=True)
            timing["bbq_scoring"] = time.time() - t
    if cfg.plugin_methods:  # the plug-in methods' extra passes (an instruction, a bias-inducing prefix, ...)
        from refine_llm.methods import Scores
        from refine_llm.stages import passes

        t = time.time()
        for q in (parts["test"], evaluation.unrelated_questions(part="test")):  # + their KL on unrelated prompts
            base = Scores.from_table(scorer(q, prompt_name))
            passes.score_passes(cfg, out, model, tokenizer, key, prompt_name, q, base)
        timing["method_passes"] = time.time() - t
    record = {"prompt": prompt_name, "prompt_sweep": sweep, "model": info, "model_key": key,
              "vllm_dtype": vdtype, "timing": timing}
    if cfg.compare_quant and mcfg.quant != "bf16":
        t = time.time()
        record["bf16_model_key"] = _score_bf16(cfg, source, parts["test"], prompt_name, out)
        timing["compare_quant_scoring"] = time.time() - t
    write_json(out / SCORE_INFO, record)
    return record


def _score_bf16(cfg: RunConfig, source, test_q, prompt_name: str, out: Path) -> str:
    """--compare-quant: the test split again with the HF model in bf16 (its own cache key)."""
    from refine_llm import models

    mcfg = cfg.model
    model, tok = models.load_model(mcfg.name, quant="bf16", device=mcfg.device, trust_remote_code=mcfg.trust_remote_code)
    key = f"{models.fingerprint(source)}-bf16"
    # The HF bf16 model scores itself: with --backend vllm the scorer would read the weights directory instead.
    bf16 = replace(cfg, scoring=replace(cfg.scoring, backend="hf"))
    Scorer(model, tok, bf16, out / "scores", key, models.model_dir(source))(test_q, prompt_name)
    return key

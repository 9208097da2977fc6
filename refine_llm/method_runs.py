"""Run the three methods of issue 23 on a question set whose base scores are cached.

What the pipeline calls (each returns top-k log-probs over the BASE pass's top-k slots, (M, k), so every
method lands on the bias-utility plane the way a head does: candidate probabilities from the base
``cand_mask``, KL(base || method) = ``metrics.distribution_shift(base topk_logprobs, method lp)``):

    instruct_logprobs(model, tok, questions, base_prompt, base_scores, scfg)   -> (lp, template, instruction)
    self_debias_logprobs(model, tok, questions, prompt, base_scores, scfg, sd) -> (lp, info)
        (self_debias_biased: the prefix passes alone, (M, P, k), for a λ curve at no extra forward)
    train_steering(model, tok, prompt, train_q, train_scores, val_q, val_scores, scfg, cfg) -> (Steering, report)
    steered_logprobs(model, tok, questions, prompt, base_scores, steering, scfg) -> (lp, info)
    score_steered(model, tok, questions, prompt, scfg, steering, cache_dir, model_key) -> scores Dataset
    plane_point(questions, cand_mask, base_lp, lp) -> {mean_abs_c, mu, gold_share, kl_base, ...}

The instruct prompt's and the steered model's OWN scores (their own top-k, full-vocabulary candidate
log-probs) come from ``scoring.score`` with the variant template (its fingerprint keys the cache) or
inside ``steering.apply(model)`` (``score_steered``: the model key names the steering's fingerprint).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np

from refine_llm import metrics
from refine_llm.config import ScoringConfig
from refine_llm.errors import UserError
from refine_llm.methods.protocol import Base, Method, Output, Scores, ScorePass, TrainInputs
from refine_llm.methods.self_debias import SelfDebiasConfig, self_debias
from refine_llm.baselines.steer import (SteerConfig, Steering, bias_labels, candidate_layers, choose_layer, commitment,
                                      choose_strength, config_dict, steering_vector)
from refine_llm.passes import collect_activations, question_rows, score_at_ids
from refine_llm.prompts import PromptTemplate

__all__ = ["score_arrays", "slot_probs", "plane_point", "instruct_logprobs", "self_debias_biased", "self_debias_logprobs",
           "train_steering", "steered_logprobs", "score_steered", "tuple_subset", "STEER_DIR", "Steer"]


def score_arrays(scores) -> dict[str, np.ndarray]:
    """topk_ids (M, k), topk_logprobs (M, k), cand_mask (M, 2, k) of a scores Dataset."""
    sc = scores.with_format("numpy")
    return {"topk_ids": np.stack(sc["topk_ids"]).astype(np.int64),
            "topk_logprobs": np.stack(sc["topk_logprobs"]).astype(np.float32),
            "cand_mask": np.stack([np.stack(m) for m in sc["cand_mask"]]).astype(bool)}


def slot_probs(lp, cand_mask) -> np.ndarray:
    """(M, 2) candidate probabilities of (M, k) log-probs renormalised over the k slots (the heads' and the
    paper's top-k convention), with (M, 2, k) ``cand_mask``."""
    x = np.asarray(lp, dtype=np.float64)
    x = x - np.nanmax(np.where(np.isfinite(x), x, -np.inf), axis=1, keepdims=True)
    q = np.exp(x)
    q /= q.sum(axis=1, keepdims=True)
    return np.einsum("mk,msk->ms", q, np.asarray(cand_mask, dtype=np.float64))


def plane_point(questions, cand_mask, base_lp, lp) -> dict[str, Any]:
    """The plane's numbers of one condition on a (small) question set, from top-k log-probs over the base
    slots: mean|C| and μ over its 4-tuples (μ is None when no (subject, attribute) cell has 2 tuples),
    P(gold) share and accuracy on specified rows, mean KL(base || condition) on specified and on
    underspecified rows, the mean commitment |P1 - P2| / (P1 + P2) of underspecified rows (0: 50/50) and
    the candidates' share of the top-k mass (a method that moves mass off both names lowers |C| too)."""
    rows = question_rows(questions)
    p = slot_probs(lp, cand_mask)
    spec = np.asarray(rows["specified"], dtype=bool)
    out: dict[str, Any] = {"n_rows": int(len(spec)), "n_specified": int(spec.sum())}
    tix, meta = metrics.tuple_index(rows)  # (N, 2, 2) row indices per 4-tuple
    out["n_tuples"] = int(len(tix))
    if len(tix):
        P = metrics.gather_tuples(p, tix)  # (N, 2, 2, 2)
        C = metrics.tuple_bias(P)
        out["mean_abs_c"] = float(np.abs(C).mean())
        out["positional_error"] = float(metrics.positional_error(P).mean())  # δ: C cancels a positional habit
        mu, _ = metrics.mu_eta(C, meta["subj_a"], meta["subj_b"], meta["attribute_id"], meta["category"])
        out["mu"] = None if not np.isfinite(mu) else float(mu)
    else:
        out["mean_abs_c"] = out["mu"] = out["positional_error"] = None
    sidx = np.flatnonzero(spec)
    util = metrics.specified_utility(p[sidx], metrics.gold_positions(rows, sidx)) if len(sidx) else {}
    out["gold_share"], out["specified_accuracy"] = util.get("gold_share"), util.get("specified_accuracy")
    under = ~spec
    out["commitment_underspecified"] = float(np.nanmean(commitment(p[under]))) if under.any() else None
    out["answer_mass"] = float(np.mean(p[:, 0] + p[:, 1]))  # candidates' share of the top-k mass
    kl, _ = metrics.distribution_shift(base_lp, lp)
    out["kl_base"] = float(np.nanmean(kl[spec])) if spec.any() else None
    out["kl_underspecified"] = float(np.nanmean(kl[~spec])) if (~spec).any() else None
    return out


def _take(rows: dict[str, list], idx) -> dict[str, list]:
    return {c: [v[i] for i in idx] for c, v in rows.items()}


def tuple_subset(questions, n_tuples: int, seed: int = 0) -> np.ndarray:
    """Row indices of ``n_tuples`` 4-tuples (sampled with ``seed``, in question order) with their specified rows."""
    rows = question_rows(questions)
    tids = list(dict.fromkeys(t for t, s in zip(rows["tuple_id"], rows["specified"]) if not s))
    rng = np.random.default_rng(seed)
    keep = set(rng.permutation(tids)[:n_tuples].tolist()) if len(tids) > n_tuples else set(tids)
    return np.array([i for i, t in enumerate(rows["tuple_id"]) if t in keep], dtype=np.int64)


# ----------------------------------------------------------------------------- prompt-instruct


def instruct_logprobs(model, tokenizer, questions, base_prompt: str, base_scores, scfg: ScoringConfig,
                      instruct_file: str | None = None) -> tuple[np.ndarray, PromptTemplate, str]:
    """prompt-instruct's (M, k) log-probs at the base top-k ids, its template and the instruction text."""
    from refine_llm.prompt_variants import instruct_prompt

    template, instruction = instruct_prompt(base_prompt, instruct_file)
    ids = score_arrays(base_scores)["topk_ids"]
    return score_at_ids(model, tokenizer, questions, template, ids, scfg), template, instruction


# ----------------------------------------------------------------------------- self-debias


def self_debias_biased(model, tokenizer, questions, prompt: PromptTemplate, base_scores, scfg: ScoringConfig,
                       prefixes_file: str | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """The Self-Debias passes: (M, P, k) log-probs at the base top-k ids under each bias-inducing prefix of
    each row's category (``prompt_variants.with_prefix``; P = the most prefixes any category has, the
    missing ones -inf: no evidence). They do not depend on λ or ε, so a λ curve costs no forward pass."""
    from refine_llm.prompt_variants import prefixes_for, with_prefix

    rows = question_rows(questions)
    ids = score_arrays(base_scores)["topk_ids"]
    cats = np.array(rows["category"], dtype=object)
    per_cat = {cat: prefixes_for(cat, prefixes_file) for cat in dict.fromkeys(rows["category"])}
    out = np.full((len(ids), max(len(p) for p in per_cat.values()), ids.shape[1]), -np.inf, dtype=np.float32)
    for cat, prefixes in per_cat.items():
        ix = np.flatnonzero(cats == cat)
        sub = _take(rows, ix)
        for j, pre in enumerate(prefixes):
            out[ix, j] = score_at_ids(model, tokenizer, sub, with_prefix(prompt, pre), ids[ix], scfg)
    return out, {"prefixes": per_cat, "passes": int(sum(len(per_cat[c]) for c in rows["category"]))}


def self_debias_logprobs(model, tokenizer, questions, prompt: PromptTemplate, base_scores, scfg: ScoringConfig,
                         cfg: SelfDebiasConfig | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Self-Debias (M, k) log-probs over the base top-k slots: ``self_debias_biased`` then ``self_debias``
    at ``cfg.decay`` / ``cfg.epsilon``. ``info["biased"]`` keeps the passes for other λ."""
    cfg = cfg or SelfDebiasConfig()
    biased, info = self_debias_biased(model, tokenizer, questions, prompt, base_scores, scfg, cfg.prefixes)
    lp = self_debias(score_arrays(base_scores)["topk_logprobs"], biased, cfg.decay, cfg.epsilon)
    return lp, {**info, "decay": cfg.decay, "epsilon": cfg.epsilon, "biased": biased}


# ----------------------------------------------------------------------------- steer


def _select(y: np.ndarray, spec: np.ndarray, max_specified: int | None, seed: int) -> np.ndarray:
    """Labelled rows (y != -1), with at most ``max_specified`` specified ones (sampled)."""
    under = np.flatnonzero((y >= 0) & ~spec)
    sp = np.flatnonzero((y >= 0) & spec)
    if max_specified is not None and len(sp) > max_specified:
        sp = np.sort(np.random.default_rng(seed).choice(sp, max_specified, replace=False))
    return np.sort(np.concatenate([under, sp]))


def train_steering(model, tokenizer, prompt: PromptTemplate, train_q, train_scores, val_q, val_scores,
                   scfg: ScoringConfig, cfg: SteerConfig | None = None, meta: dict | None = None,
                   log: Callable[[str], None] = lambda s: None) -> tuple[Steering, dict[str, Any]]:
    """Learn the probe and vector on the train split, the layer and strength on validation.

    Forward passes: the labelled train and validation rows once each (activations at the candidate
    layers, one pass), then the strength subset once per strength (0 included). Returns the Steering
    (at the chosen strength; its ``meta`` holds labels/layers/strengths for config.json) and a report."""
    from refine_llm.baselines.hooks import decoder_layers

    cfg = cfg or SteerConfig()
    n_layers = len(decoder_layers(model))
    layers = list(cfg.layers) if cfg.layers is not None else candidate_layers(n_layers, cfg.max_candidate_layers)
    tr_rows, va_rows = question_rows(train_q), question_rows(val_q)
    tr, va = score_arrays(train_scores), score_arrays(val_scores)
    tr_spec, va_spec = np.asarray(tr_rows["specified"], bool), np.asarray(va_rows["specified"], bool)
    lab_tr = bias_labels(tr_spec, slot_probs(tr["topk_logprobs"], tr["cand_mask"]), cfg.label_quantile)
    lab_va = bias_labels(va_spec, slot_probs(va["topk_logprobs"], va["cand_mask"]), thresholds=lab_tr["thresholds"])
    sel_tr = _select(lab_tr["y"], tr_spec, cfg.max_specified, cfg.seed)
    sel_va = _select(lab_va["y"], va_spec, cfg.max_specified, cfg.seed)
    log(f"steer: activations at layers {layers} of {len(sel_tr)} train and {len(sel_va)} validation rows")
    X_tr = collect_activations(model, tokenizer, _take(tr_rows, sel_tr), prompt, layers, scfg)  # (N, L, d)
    X_va = collect_activations(model, tokenizer, _take(va_rows, sel_va), prompt, layers, scfg)
    y_tr, y_va = lab_tr["y"][sel_tr], lab_va["y"][sel_va]
    best, layer_table, probes = choose_layer(X_tr, y_tr, X_va, y_va, layers, val_specified=va_spec[sel_va],
                                             l2=cfg.probe_l2, iters=cfg.probe_iters, threshold=cfg.threshold)
    w, b = probes[best]
    vector, norms = steering_vector(X_tr[:, best], lab_tr["group"][sel_tr])
    steer = Steering.from_arrays(w, b, vector, layers[best], 1.0, cfg.threshold, n_layers)
    log(f"steer: layer {layers[best]} (validation balanced accuracy {layer_table[best]['val_balanced_accuracy']:.3f}), "
        f"class-mean gap {norms['dsv_norm']:.3g}, mean activation norm {norms['activation_norm']:.3g}")

    sub = tuple_subset(va_rows, cfg.strength_tuples, cfg.seed)
    sub_rows = _take(va_rows, sub)
    ids, mask = va["topk_ids"][sub], va["cand_mask"][sub]
    sub_spec = np.asarray(sub_rows["specified"], bool)
    strength_table, base_lp = [], None
    for s in sorted({0.0, *map(float, cfg.strengths)}):
        with steer.with_strength(s).apply(model) as st:
            lp = score_at_ids(model, tokenizer, sub_rows, prompt, ids, scfg)
        base_lp = lp if s == 0 else base_lp  # strength 0 changes nothing: the same pass as the steered ones
        fired = np.concatenate([f.numpy() for f in st.fired]) if st.fired else np.zeros(len(sub), bool)
        row = {"strength": s, **plane_point(sub_rows, mask, base_lp, lp),
               "fire_rate_underspecified": float(fired[~sub_spec].mean()) if (~sub_spec).any() else None,
               "fire_rate_specified": float(fired[sub_spec].mean()) if sub_spec.any() else None}
        strength_table.append(row)
        log(f"steer: strength {s:g}: mean|C| {row['mean_abs_c']:.4f}, KL {row['kl_base']:.4f}, "
            f"P(gold) share {row['gold_share']:.4f}, fires on {row['fire_rate_underspecified']:.2f} of "
            f"underspecified / {row['fire_rate_specified']:.2f} of specified rows")
    strength = choose_strength(strength_table, cfg.max_kl, cfg.max_gold_drop)
    steer = steer.with_strength(strength)
    lo, hi = lab_tr["thresholds"]
    steer.meta = {**(meta or {}),
                  "labels": {"commitment_unbiased_max": lo, "commitment_biased_min": hi,
                             "train_biased": int((y_tr == 1).sum()), "train_unbiased_underspecified":
                                 int(((lab_tr["group"][sel_tr]) == 0).sum()),
                             "train_specified_negatives": int(tr_spec[sel_tr].sum())},
                  "candidate_layers": layers, **norms, "training": config_dict(cfg)}
    report = {"layer": layers[best], "strength": strength, "layers": layer_table, "strengths": strength_table,
              **norms, "labels": steer.meta["labels"],
              "forward_passes": int(len(sel_tr) + len(sel_va) + len(sub) * len(strength_table))}
    if strength == 0:
        report["warning"] = ("no strength lowered mean|C| within the KL / P(gold) budget on validation: "
                             "steering is saved at strength 0 (it changes nothing)")
    return steer, report


def steered_logprobs(model, tokenizer, questions, prompt: PromptTemplate, base_scores, steering: Steering,
                     scfg: ScoringConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """(M, k) log-probs at the base top-k ids with ``steering`` applied, and its fire rates."""
    rows = question_rows(questions)
    ids = score_arrays(base_scores)["topk_ids"]
    with steering.apply(model) as st:
        lp = score_at_ids(model, tokenizer, rows, prompt, ids, scfg)
    fired = np.concatenate([f.numpy() for f in st.fired]) if st.fired else np.zeros(len(ids), bool)
    spec = np.asarray(rows["specified"], bool)
    return lp, {"fired": fired,
                "fire_rate_underspecified": float(fired[~spec].mean()) if (~spec).any() else None,
                "fire_rate_specified": float(fired[spec].mean()) if spec.any() else None}


def score_steered(model, tokenizer, questions, prompt: PromptTemplate, scfg: ScoringConfig, steering: Steering,
                  cache_dir=None, model_key: str | None = None):
    """``scoring.score`` with ``steering`` active: the steered model's own top-k and candidate log-probs,
    cached under ``<model_key>-steer-<fingerprint>`` (default model key: the base model's). Exact-mode rows
    (subjects sharing a first token; scoring logs how many) get the vector at the continuation's last token
    only: an approximation of generation-time steering; the same-slot numbers (``steered_logprobs``) are exact."""
    from refine_llm import scoring

    if scfg.backend != "hf":
        raise UserError(f"steering runs inside the HF model (forward hooks): use --backend hf, not {scfg.backend}")
    if cache_dir is not None and model_key is None:
        model_key = scoring.default_model_key(model)
    key = f"{model_key}-steer-{steering.fingerprint}" if model_key is not None else None
    with steering.apply(model):
        return scoring.score(model, tokenizer, questions, prompt, scfg, cache_dir=cache_dir, model_key=key,
                             progress=False)


STEER_DIR = "steer"  # where a run keeps its steering artifact: <run or seed dir>/steer/


@dataclass
class Steer(Method):
    """``steer`` as a plug-in of the main job (``--extra-methods steer``): trained on the run's model
    (``train_steering``: probe and vector on the train split, layer and strength on validation, saved under
    ``<run>/steer/`` in safetensors + JSON), then scored by the evaluate stage as a "hooked" pass: the test
    split with the steering's forward hooks active (cache key ``<model key>-steer-<fingerprint>``), aligned to
    the base top-k ids. Its candidate probabilities are the steered model's own top-k, renormalised; its KL is
    taken against the base model's top-k on the same question (its log-probs of the base's top-k ids), as for
    ``prompt-instruct``. The probe and the add run inside the one forward: no extra pass at inference."""

    kind: ClassVar[str] = "steer"
    name: str = "steer"
    artifact: Path | None = None
    config: SteerConfig = field(default_factory=SteerConfig)
    _steering: Steering | None = field(default=None, repr=False)

    @classmethod
    def for_run(cls, cfg, run_dir) -> "Steer":
        return cls(artifact=Path(run_dir) / STEER_DIR)

    @staticmethod
    def trained_on(cfg, inputs: TrainInputs, steer_cfg: SteerConfig) -> str:
        """What the steering is a function of: model, quantization, prompt, top-k, steering config (with its
        seed) and the train and validation questions. A re-run with the same gets the saved steering back."""
        from dataclasses import asdict

        from refine_llm.stages.common import config_hash

        ids = {s: list(inputs.questions[s]["question_id"]) for s in ("train", "validation")}
        return config_hash({"model": cfg.model.name, "quant": cfg.model.quant, "prompt": inputs.prompt,
                            "top_k": cfg.scoring.top_k, "steer": asdict(steer_cfg), "questions": ids})

    def train(self, cfg, run_dir, inputs: TrainInputs) -> None:
        import time

        from refine_llm import prompts
        from refine_llm.vocab import tokenizer_fingerprint

        steer_cfg = replace(self.config, seed=cfg.bandit.seed)
        stamp = self.trained_on(cfg, inputs, steer_cfg)
        saved = Path(run_dir) / STEER_DIR
        if (saved / "config.json").is_file() and Steering.from_pretrained(saved).meta.get("trained_on") == stamp:
            inputs.log(f"steer: reusing {saved} (same model, prompt, steering config and splits)")
            self._steering = None
            return
        t = time.time()
        model, tok = inputs.load_model()
        scfg = replace(cfg.scoring, store_hidden=False, align_to_base=False)
        steer, rep = train_steering(model, tok, prompts.load_prompt(inputs.prompt), inputs.questions["train"],
                                    inputs.scores["train"], inputs.questions["validation"],
                                    inputs.scores["validation"], scfg, steer_cfg,
                                    meta={"base_model": cfg.model.name, "prompt": inputs.prompt,
                                          "tokenizer_fingerprint": tokenizer_fingerprint(tok),
                                          "category": ",".join(cfg.questions.categories)}, log=inputs.log)
        steer.meta["report"] = {k: rep[k] for k in ("layer", "strength", "forward_passes")}
        steer.meta["train_seconds"] = time.time() - t
        steer.meta["trained_on"] = stamp
        steer.save_pretrained(Path(run_dir) / STEER_DIR, card={"metrics": {"validation": rep["strengths"]}})
        self._steering = None

    @property
    def steering(self) -> Steering:
        if self._steering is None:
            self._steering = Steering.from_pretrained(self.artifact)
        return self._steering

    @property
    def fingerprint(self) -> str:
        return self.steering.fingerprint

    def hooks(self, model):
        return self.steering.apply(model)

    def passes(self) -> list[ScorePass]:
        return [ScorePass(self.kind, model="hooked")]

    def apply(self, base: Scores, own: dict[str, Scores] | None = None) -> Output:
        mine = (own or {})[self.kind]
        out = Base().apply(mine)  # the steered model's own top-k, renormalised: what a user of it gets
        return Output(out.p_topk, out.p_full, mine.aligned_logprobs)  # KL: over the base's top-k ids

    @property
    def trainable_params(self) -> int:
        return 2 * self.steering.hidden_size + 1  # probe weight and bias, vector

    def info(self) -> dict:
        s = self.steering
        return {**super().info(), "layer": s.layer, "strength": s.strength, "training": "probe + mean difference",
                "extra_forward_per_prompt": 0, "train_seconds": s.meta.get("train_seconds", 0.0),
                "served_by_vllm": "no (inside the model: forward hooks)"}

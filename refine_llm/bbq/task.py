"""BBQ as a task (as lm-eval keeps tasks): its requests, scored by the one scoring driver; every condition
applied through the methods protocol; a head trained on BBQ through ``HeadTrainer``; the tables.

Two ways to ask a model (prompts/bbq_cloze.txt, prompts/bbq_lettered.txt, written for this project, never
taken from BBQ):
- ``cloze``: few-shot prompt + context + question + the three options + "Answer:"; each answer is scored by
  the first token of its text in context (the person's description without a leading article, e.g.
  "grandfather"; the unknown answer's own words, e.g. "Cannot"), exactly as UnQover names are: a request
  row lists its three ``candidates`` and ``refine_llm.scoring`` does the rest (top-k, candidate masks, the
  full-vocabulary mass of each answer's first tokens; whole continuations where two answers share a first
  token). The top-k is kept, so a REFINE head applies here; on rows whose answers share a first token a
  head cannot tell them apart, and the model's probabilities are kept.
- ``lettered``: a multiple-choice prompt with A/B/C answers, over the 3 cyclic rotations of the options
  (candidates: the letters); the headline is the mean over rotations and the spread is the position effect.

Requests go to the driver longest prompt first (each rotation on its own), so each fixed batch holds
prompts of similar length (less padding). Scores land in the run's cache like any other pass: the main
job's score stage scores BBQ up front, its train stage trains the BBQ head on the cached scores, its
evaluate stage reads them again.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from refine_llm.bandit import Objective, train_head
from refine_llm.config import BanditConfig, ScoringConfig
from refine_llm.errors import UserError
from refine_llm.methods import Base, HeadMethod, Method, Scores, Top2Equal, Uniform
from refine_llm.metrics import candidate_probs_full
from refine_llm.bbq.data import BBQItem, item_arrays, option_text, split_by_question_index
from refine_llm.bbq.metrics import (N_RESAMPLES, bbq_table, counts, finite, from_counts, lettered_summary,
                                    verdict)

__all__ = ["LETTERS", "REQUEST_COLUMNS", "cloze_prompt", "lettered_prompt", "cloze_rows", "lettered_rows",
           "score_cloze", "score_lettered", "answer_probs", "BBQObjective", "train_bbq_head", "conditions",
           "evaluate_items"]

LETTERS = ("A", "B", "C")
REQUEST_COLUMNS = ("question_id", "context", "question", "candidates")  # a row that lists its own answers
BBQ_HEAD_CONFIG = BanditConfig(objective="direct", lr=1e-2, epochs=100)  # full-batch steps on the train templates


def cloze_prompt():
    from refine_llm.prompts import PROMPTS_DIR, load_prompt

    return load_prompt(str(PROMPTS_DIR / "bbq_cloze.txt"))


def lettered_prompt():
    from refine_llm.prompts import PROMPTS_DIR, load_prompt

    return load_prompt(str(PROMPTS_DIR / "bbq_lettered.txt"))


def cloze_rows(items: list[BBQItem]) -> dict[str, list]:
    """One request per item: the options (article-free, ``option_text``) listed in the question, so the
    model knows this item's wording of "unknown", and as the row's candidates."""
    opts = [[option_text(a) for a in it.answers] for it in items]
    return {"question_id": [f"bbq-cloze|{it.key}" for it in items], "context": [it.context for it in items],
            "question": [f"{it.question}\nOptions: {'; '.join(o)}" for it, o in zip(items, opts)], "candidates": opts}


def lettered_rows(items: list[BBQItem], r: int) -> dict[str, list]:
    """Rotation r: letter j shows answer (j + r) % 3."""
    q = [it.question + "".join(f"\n{LETTERS[j]}. {it.answers[(j + r) % 3]}" for j in range(3)) for it in items]
    return {"question_id": [f"bbq-lettered-r{r}|{it.key}" for it in items], "context": [it.context for it in items],
            "question": q, "candidates": [list(LETTERS)] * len(items)}


def _longest_first(tokenizer, prompt, rows: dict[str, list]) -> np.ndarray:
    texts = [prompt.render(c, q, tokenizer) for c, q in zip(rows["context"], rows["question"])]
    ids = tokenizer(texts, add_special_tokens=prompt.add_special_tokens)["input_ids"]
    return np.array(sorted(range(len(ids)), key=lambda i: -len(ids[i])), np.int64)


def _score(model, tokenizer, rows: dict[str, list], prompt, cfg: ScoringConfig, cache_dir, model_key,
           progress: bool, read_only: bool) -> Scores:
    """The rows' scores in row order: scored longest prompt first (or, ``read_only``, read from the cache)."""
    from refine_llm import scoring
    from refine_llm.scoring.driver import read_cached

    columns = REQUEST_COLUMNS + (("base_topk_ids",) if "base_topk_ids" in rows else ())
    if read_only:
        return Scores.from_table(read_cached(rows, prompt, cfg, cache_dir, model_key, columns=columns))
    order = _longest_first(tokenizer, prompt, rows)
    ds = scoring.score(model, tokenizer, {c: [v[i] for i in order] for c, v in rows.items()}, prompt, cfg, cache_dir,
                       model_key, progress=progress, columns=columns)
    return Scores.from_table(ds).select(np.argsort(order))


def score_cloze(model, tokenizer, items: list[BBQItem], cfg: ScoringConfig, cache_dir=None, model_key=None,
                progress: bool = False, read_only: bool = False, prompt=None, align_ids=None) -> Scores:
    """The cloze scores of ``items`` (n rows, 3 candidates). On rows whose answers share a first token
    (``collision``) the candidate masks are cleared: a head cannot tell those answers apart. ``prompt``: another
    cloze template (an instruction, a Self-Debias prefix; default ``cloze_prompt()``); ``align_ids`` (n, k): the
    base pass's top-k ids, whose log-probs under this pass go to ``Scores.aligned_logprobs``."""
    rows = cloze_rows(items)
    if align_ids is not None:
        rows["base_topk_ids"] = [list(map(int, r)) for r in np.asarray(align_ids)]
        cfg = replace(cfg, align_to_base=True)
    sc = _score(model, tokenizer, rows, prompt or cloze_prompt(), cfg, cache_dir, model_key, progress, read_only)
    sc.cand_mask[sc.collision] = False
    return sc


def score_lettered(model, tokenizer, items: list[BBQItem], cfg: ScoringConfig, cache_dir=None, model_key=None,
                   progress: bool = False, read_only: bool = False) -> np.ndarray:
    """(3, n, 3) P(answer) per cyclic rotation r, in the items' answer order (P(letter) = the probability of
    its first tokens, "A" and " A")."""
    from refine_llm.vocab import candidate_token_ids

    if tokenizer is not None:
        letter_ids = [candidate_token_ids(tokenizer, L) for L in LETTERS]
        if len(set(sum(letter_ids, []))) < sum(map(len, letter_ids)):
            raise UserError("this tokenizer gives the letters A/B/C a shared first token: score cloze only "
                            "(refine-llm bbq evaluate --mode cloze)")
    cfg = replace(cfg, store_hidden=False)
    out = np.zeros((3, len(items), 3))
    for r in range(3):
        sc = _score(model, tokenizer, lettered_rows(items, r), lettered_prompt(), cfg, cache_dir, model_key, progress,
                    read_only)
        p = np.exp(sc.cand_logprobs.astype(np.float64))  # (n, 3) by letter
        for L in range(3):
            out[r, np.arange(len(items)), [(L + r) % 3] * len(items)] = p[:, L]
    return out


def answer_probs(method: Method, sc: Scores) -> np.ndarray:
    """(n, 3) P(answer) over the full vocabulary under ``method`` (``Output.p_full``); rows whose answers
    share a first token keep the model's probabilities (the method cannot tell them apart there)."""
    base = np.exp(sc.cand_logprobs.astype(np.float64))
    return np.where(sc.collision[:, None], base, np.asarray(method.apply(sc).p_full, np.float64))


class BBQObjective(Objective):
    """A head trained on BBQ cloze scores: full-batch ascent on R = -|s_AMB| / 100 + accuracy on disambiguated
    items, both from the head's answer probabilities (renormalised over the 3 answers) through the same
    ``counts``/``from_counts`` as the table: the bandit's "direct" objective (the reward is a known
    differentiable function of the policy's answer probabilities, so no actions are sampled). Rows whose
    answers share a first token are left out (the head cannot act there)."""

    def __init__(self, sc: Scores, A: dict):
        import torch

        keep = np.flatnonzero(~sc.collision)
        t = lambda a, dt=None: torch.as_tensor(np.asarray(a)[keep], dtype=dt)
        self.A = {k: torch.as_tensor(v[keep]) for k, v in A.items() if k in ("label", "target", "unknown", "ambig")}
        self.tlp, self.tid = t(sc.topk_logprobs), t(sc.topk_ids)
        self.hid = None if sc.hidden is None else t(sc.hidden, torch.float32)
        self.mask, self.olp = t(sc.cand_mask), t(sc.cand_logprobs, torch.float32)
        self.n_items = int(len(keep))
        # a term whose items are missing from the split would be 0/0: leave it out (its gradient is NaN)
        has_t = self.A["target"] >= 0
        self.use_amb, self.use_dis = bool((self.A["ambig"] & has_t).any()), bool((~self.A["ambig"] & has_t).any())

    def num_steps(self, cfg: BanditConfig) -> int:
        return cfg.epochs if (self.use_amb or self.use_dis) else 0

    def schedule(self, cfg: BanditConfig):
        for _ in range(self.num_steps(cfg)):
            yield 0, None, False  # every step: the whole train split, in stored order

    def loss(self, head, batch, with_replacement: bool, g):
        import torch

        lp = head(self.tlp, topk_ids=self.tid, hidden=self.hid)  # (n, k)
        p = candidate_probs_full(lp, self.mask, self.tlp, self.olp)  # (n, 3)
        q = p / p.sum(-1, keepdim=True).clamp_min(1e-12)
        s = from_counts(counts(q, self.A, xp=torch))
        reward = (-s["s_amb"].abs() / 100 if self.use_amb else 0.0) + (s["acc_disambig"] if self.use_dis else 0.0)
        # NaN (no ambiguous or no disambiguated item in the split) -> None, so the summary stays JSON
        return -reward, {"reward": finite(reward.detach()), "s_amb": finite(s["s_amb"].detach()),
                         "acc_disambig": finite(s["acc_disambig"].detach())}


def train_bbq_head(sc: Scores, items: list[BBQItem], k: int, seed: int = 0, cfg: BanditConfig | None = None,
                   checkpoint_dir=None):
    """A logit head trained on the train templates of ``items`` (``split_by_question_index``, seeded) from
    their cloze scores ``sc`` -> (head, summary)."""
    from refine_llm.methods.heads import LogitHead

    cfg = cfg or BBQ_HEAD_CONFIG
    train, test = split_by_question_index(items, seed=seed)
    key = {it.key: i for i, it in enumerate(items)}
    tr = np.array([key[it.key] for it in train], np.int64)
    head = LogitHead(k)
    objective = BBQObjective(sc.select(tr), {k_: v[tr] for k_, v in item_arrays(items).items()})
    res = train_head(head, objective, cfg, checkpoint_dir=checkpoint_dir, resume=checkpoint_dir is not None,
                     progress=False)
    head.eval()
    log = [{"step": h["step"] - 1, **{x: h.get(x) for x in ("reward", "s_amb", "acc_disambig")}}
           for h in res.history if "reward" in h]
    summary = {"steps": cfg.epochs, "lr": cfg.lr, "first": log[0] if log else None, "last": log[-1] if log else None,
               "n_train_items": objective.n_items, "n_test_items": int(len(test)),
               "train_templates": len({(it.category, it.question_index) for it in train}),
               "test_templates": len({(it.category, it.question_index) for it in test}), "seconds": res.seconds}
    return head, summary


def conditions(heads: dict[str, Method] | None = None) -> dict[str, Method]:
    """The BBQ table's conditions: the model, the no-training baselines (as in the main report), each head."""
    return {"base": Base(), "uniform": Uniform(), "top2-equal": Top2Equal(), **(heads or {})}


def evaluate_items(items: list[BBQItem], cloze: Scores | None, lettered: np.ndarray | None,
                   methods: dict[str, Method], trained: HeadMethod | None = None, trained_summary: dict | None = None,
                   n_resamples: int = N_RESAMPLES, seed: int = 0) -> dict:
    """BBQ tables from the items' scores: cloze (every condition applied at the answer slot; with ``trained``,
    the conditions and the BBQ-trained head on the held-out templates) and lettered (mean over the 3
    rotations, and the spread)."""
    A = item_arrays(items)
    res: dict = {"n_items": len(items), "categories": sorted(set(A["category"].tolist())), "tables": {}, "timing": {}}
    if cloze is not None:
        t = time.time()
        conds = {name: answer_probs(m, cloze) for name, m in methods.items()}
        res["cloze_exact_items"] = int(cloze.collision.sum())
        res["cloze_answer_mass"] = float(np.exp(cloze.cand_logprobs.astype(np.float64)).sum(1).mean())
        res["cloze_answer_in_topk"] = float(cloze.cand_mask.any(2).any(1).mean())
        res["tables"]["cloze"] = {c: bbq_table(P, A, n_resamples, seed) for c, P in conds.items()}
        res["verdict_cloze"] = verdict(res["tables"]["cloze"])
        if trained is not None:
            _, test = split_by_question_index(items, seed=seed)
            key = {it.key: i for i, it in enumerate(items)}
            te = np.array([key[it.key] for it in test], np.int64)
            At = {k: v[te] for k, v in A.items()}
            held = {c: bbq_table(P[te], At, n_resamples, seed) for c, P in conds.items()}
            held["bbq-trained"] = bbq_table(answer_probs(trained, cloze.select(te)), At, n_resamples, seed)
            res["tables"]["cloze_heldout"] = held
            res["verdict_cloze_heldout"] = verdict(held)
            res["bbq_trained_head"] = {k: v for k, v in (trained_summary or {}).items() if k != "seconds"}
        res["timing"]["cloze_tables"] = time.time() - t
    if lettered is not None:
        n = len(items)
        A3 = {k: np.concatenate([v] * 3) for k, v in A.items()}
        res["tables"]["lettered"] = {"base": bbq_table(lettered.reshape(3 * n, 3), A3, n_resamples, seed,
                                                       clusters=np.tile(np.arange(n), 3))}
        res["lettered_rotations"] = lettered_summary(lettered, A)
        res["lettered_answer_mass"] = float(lettered.sum(2).mean())
    return res

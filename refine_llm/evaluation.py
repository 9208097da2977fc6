"""Evaluation of the main job's conditions on the test split: metric blocks, predictions, significance.

One ``Evaluator`` per run holds the test questions and the base model's top-k. Each condition (base,
a head, a no-training baseline, a LoRA adapter) is added with its candidate probabilities and, when
it acts on the same top-k slots, its top-k log-probs, from which the per-row KL(base ‖ condition)
and total variation follow. It returns ``metrics.evaluate`` blocks and keeps one predictions table:

    predictions.parquet   one row per condition x question (``PREDICTION_COLUMNS``): the question's
                          identity and design (split, template, attribute, negated, specified,
                          subjects, groups, gold), p_subj1/p_subj2 (top-k renormalised: the headline
                          metrics use these), p_subj1_full/p_subj2_full, kl_base, tv_base.

Every per-category number of report.json follows from that file alone: ``metrics_from_predictions``
recomputes them (tests/test_evaluation.py checks that it does). ``significance`` compares each
condition with base (paired cluster bootstrap, one-sided Wilcoxon Holm-corrected across conditions).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from refine_llm import metrics
from refine_llm.config import BOOT_RESAMPLES, NULL_RESAMPLES
from refine_llm.errors import UserError

__all__ = ["PREDICTION_COLUMNS", "Evaluator", "metrics_from_predictions", "read_predictions", "significance"]

# the question's own columns carried into predictions (docs/CONTRACTS.md names), then the numbers
QUESTION_COLUMNS = ("question_id", "tuple_id", "category", "split", "template_id", "attribute_id", "attribute",
                    "negated", "specified", "subj1", "subj2", "subj1_group", "subj2_group", "gold")
PREDICTION_COLUMNS = ("condition",) + QUESTION_COLUMNS + (
    "p_subj1", "p_subj2", "p_subj1_full", "p_subj2_full", "kl_base", "tv_base")


class Evaluator:
    """Evaluates conditions on one questions table against its base top-k.

    questions: the test split (datasets.Dataset or dict of columns); base_topk_logprobs (M, k): the
    base model's top-k log-probs per row (scores["topk_logprobs"]); cand_in_topk (M,) or (M, 2).
    """

    def __init__(self, questions, base_topk_logprobs, cand_in_topk=None, seed: int = 0,
                 n_resamples: int = NULL_RESAMPLES):
        self.questions = questions
        self.base_lp = np.asarray(base_topk_logprobs, dtype=np.float64)
        self.cand_in_topk = cand_in_topk
        self.seed, self.n_resamples = seed, n_resamples
        self.results: dict[str, dict] = {}
        self._columns = {c: list(questions[c]) for c in QUESTION_COLUMNS if c in _names(questions)}
        self._rows: list[dict[str, list]] = []
        if len(self.base_lp) != len(self._columns["question_id"]):
            raise UserError(f"base top-k has {len(self.base_lp)} rows but the questions {len(self._columns['question_id'])}; "
                            f"score the questions you evaluate")

    def add(self, name: str, p_topk, p_full, topk_logprobs=None, keep: bool = True) -> dict:
        """Evaluate one condition; ``topk_logprobs`` (M, k) over the base's top-k slots gives KL/TV to
        base (None for a condition with other top-k tokens, e.g. a LoRA adapter: KL is then not
        reported). keep=False: return the block without adding it to results or predictions."""
        kl = tv = None
        if topk_logprobs is not None:
            kl, tv = metrics.distribution_shift(self.base_lp, np.asarray(topk_logprobs, dtype=np.float64))
        p_topk, p_full = np.asarray(p_topk, dtype=float), np.asarray(p_full, dtype=float)
        res = metrics.evaluate(self.questions, p_topk, p_full, self.cand_in_topk, seed=self.seed,
                               n_resamples=self.n_resamples if keep else 0, kl=kl, tv=tv)
        if keep:
            self.results[name] = res
            M = len(p_topk)
            nan = np.full(M, np.nan)
            self._rows.append({"condition": [name] * M, **self._columns,
                               "p_subj1": p_topk[:, 0], "p_subj2": p_topk[:, 1],
                               "p_subj1_full": p_full[:, 0], "p_subj2_full": p_full[:, 1],
                               "kl_base": nan if kl is None else kl, "tv_base": nan if tv is None else tv})
        return res

    def write_predictions(self, path) -> Path:
        """Write every added condition's rows to ``path`` (parquet) atomically."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from refine_llm.io import atomic_write_bytes

        cols = {c: [] for c in PREDICTION_COLUMNS}
        for rows in self._rows:
            for c in PREDICTION_COLUMNS:
                cols[c].extend(list(rows[c]) if c in rows else [None] * len(rows["condition"]))
        for c in ("p_subj1", "p_subj2", "p_subj1_full", "p_subj2_full", "kl_base", "tv_base"):
            cols[c] = [None if v is None or not np.isfinite(v) else float(v) for v in cols[c]]
        table = pa.table(cols)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        atomic_write_bytes(path, sink.getvalue().to_pybytes())
        return Path(path)


def _names(questions) -> list:
    names = getattr(questions, "column_names", None)
    return list(names) if names is not None else list(questions.keys())


def significance(results: dict[str, dict], base: str = "base", seed: int = 0,
                 n_resamples: int = BOOT_RESAMPLES) -> dict:
    """``metrics.compare`` of every condition with ``base``; the one-sided Wilcoxon p-values are
    Holm-corrected across these comparisons (``wilcoxon.p_holm``)."""
    out = {name: metrics.compare(results[base], r, n_resamples=n_resamples, seed=seed)
           for name, r in results.items() if name != base}
    adj = metrics.holm({n: s["wilcoxon"]["p_value"] for n, s in out.items()})
    for n, s in out.items():
        s["wilcoxon"]["p_holm"] = adj[n]
        s["wilcoxon"]["holm_family"] = len(out)
    return out


def read_predictions(path) -> dict[str, list]:
    """predictions.parquet as a dict of columns."""
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pydict()


def metrics_from_predictions(pred: dict[str, list], seed: int = 0, n_resamples: int = NULL_RESAMPLES) -> dict[str, dict]:
    """Recompute every condition's ``metrics.evaluate`` block from a predictions table alone."""
    cond = np.array(pred["condition"], dtype=object)
    out = {}
    for name in dict.fromkeys(pred["condition"]):
        ix = np.flatnonzero(cond == name)
        q = {c: [pred[c][i] for i in ix] for c in QUESTION_COLUMNS if c in pred}
        col = lambda c: np.array([np.nan if pred[c][i] is None else pred[c][i] for i in ix], dtype=float)
        p_topk = np.stack([col("p_subj1"), col("p_subj2")], 1)
        p_full = np.stack([col("p_subj1_full"), col("p_subj2_full")], 1)
        kl, tv = col("kl_base"), col("tv_base")
        has_kl = bool(np.isfinite(kl).all()) and len(kl) > 0
        out[name] = metrics.evaluate(q, p_topk, p_full, None, seed=seed, n_resamples=n_resamples,
                                     kl=kl if has_kl else None, tv=tv if has_kl else None)
    return out


# ---------------------------------------------------------------------------------------------
# Unrelated prompts: where a head must not act
# ---------------------------------------------------------------------------------------------

UNRELATED_PROMPTS = Path(__file__).resolve().parent / "data" / "unrelated_prompts.tsv"


UNRELATED_PARTS = ("anchor", "test")


def unrelated_family(question: str) -> str:
    """A prompt's family: the first two words of its question ("How many", "Which animal", ...)."""
    return " ".join(question.split()[:2])


def unrelated_part(question: str) -> str:
    """``anchor`` (heads may train on it: KL to base) or ``test`` (the report's unrelated KL), by a hash
    of the prompt's family, so no question family is on both sides."""
    import hashlib

    return UNRELATED_PARTS[int(hashlib.sha1(unrelated_family(question).encode()).hexdigest(), 16) % 2]


def unrelated_questions(path=UNRELATED_PROMPTS, part: str | None = None) -> dict[str, list]:
    """The unrelated prompts as a questions-like dict of columns (scoring needs two candidate words;
    they are placeholders here: only the top-k distribution at the answer slot is used). ``part``:
    None = all, else one of ``UNRELATED_PARTS`` (``unrelated_part``)."""
    import hashlib

    rows = []
    for ln, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 2:
            raise UserError(f"{path}:{ln}: expected 'context TAB question', got {line!r}")
        if part is None or unrelated_part(parts[1]) == part:
            rows.append(parts)
    cols = {"question_id": [hashlib.sha1(f"unrelated|{c}|{q}".encode()).hexdigest()[:16] for c, q in rows],
            "context": [c for c, _ in rows], "question": [q for _, q in rows]}
    n = len(rows)
    cols.update(subj1=["yes"] * n, subj2=["no"] * n, subj1_group=["yes"] * n, subj2_group=["no"] * n,
                category=["unrelated"] * n)
    return cols


def unrelated_kl(report: dict, ev: Evaluator, unrelated, methods: dict, gate: list[int] | None, test_topk_ids) -> None:
    """Mean KL(base ‖ condition) of the top-k at the answer slot of the unrelated prompts (the report's part),
    for every condition that acts on the base's top-k (``methods``: {name: Method}, e.g. uniform, rank-bias,
    the heads; base and top2-equal always); writes ``kl_unrelated`` into each condition's metrics block and
    ``report["unrelated_prompts"]``. ``unrelated``: their scores (methods.Scores); ``gate``: the heads'
    category vocabulary (``gate_token_ids``), for the KL under serving's gated mode; ``test_topk_ids`` (M,k):
    the test split's top-k ids (the share of its prompts the gate opens)."""
    import torch

    from refine_llm.methods import Top2Equal

    q = unrelated_questions(part="test")  # the other families may have trained the heads (BanditConfig.anchor_weight)
    lp = torch.as_tensor(unrelated.topk_logprobs)  # (U, k)
    ids = torch.as_tensor(unrelated.topk_ids)
    outs = {"base": lp, "top2-equal": torch.as_tensor(Top2Equal().apply(unrelated).topk_logprobs)}
    for name, method in methods.items():
        head = getattr(method, "head", None)
        if getattr(head, "variant", None) == "contextual" and unrelated.hidden is None:
            continue
        outs[name] = torch.as_tensor(method.apply(unrelated).topk_logprobs)
    summary = {}
    for name, new in outs.items():
        summary[name] = _shift_summary(lp.numpy(), new.numpy())
        if name in ev.results:
            ev.results[name]["kl_unrelated"] = summary[name]["kl"]
    gated = {}
    if gate:
        # Served with refine_mode "gated", a head acts only where the top-k holds >= 2 tokens of its
        # category vocabulary (refine_llm.methods.heads.gate_mask): elsewhere the output is the base's top-k.
        from refine_llm.methods.heads import gate_mask

        g_ids = torch.tensor(sorted(set(gate)), dtype=torch.long)
        g_unrel, g_test = gate_mask(ids, g_ids), gate_mask(torch.as_tensor(test_topk_ids), g_ids)  # (U,), (M,)
        gated = {"unrelated_share": float(g_unrel.float().mean()), "test_share": float(g_test.float().mean())}
        for name, new in outs.items():
            if name.startswith("refine"):
                kl, _ = metrics.distribution_shift(lp.numpy(), torch.where(g_unrel[:, None], new, lp).numpy())
                summary[name]["kl_gated"] = float(kl.mean())
                if name in ev.results:
                    ev.results[name]["kl_unrelated_gated"] = summary[name]["kl_gated"]
    report["unrelated_prompts"] = {"n": len(q["question_id"]), "file": UNRELATED_PROMPTS.name, "part": "test",
                                   "families": sorted({unrelated_family(x) for x in q["question"]}),
                                   "per_condition": summary, "gated": gated}


def _shift_summary(base_lp, new_lp) -> dict:
    """Mean KL and TV of the (U, k) top-k distributions (renormalised, ``metrics.distribution_shift``), KL's 95th
    percentile."""
    kl, tv = metrics.distribution_shift(base_lp, new_lp)
    return {"kl": float(kl.mean()), "tv": float(tv.mean()), "kl_p95": float(np.quantile(kl, 0.95))}


def add_unrelated_kl(report: dict, ev: Evaluator, name: str, unrelated, topk_logprobs) -> None:
    """A condition that brings its own scores of the unrelated prompts (a plug-in method's passes over them):
    ``topk_logprobs`` (U, k), its log-probs at the base's top-k ids of ``unrelated`` (methods.Scores), goes into
    ``kl_unrelated`` and the report's per-condition summary, as ``unrelated_kl`` does for the heads."""
    s = _shift_summary(np.asarray(unrelated.topk_logprobs), np.asarray(topk_logprobs))
    report["unrelated_prompts"]["per_condition"][name] = s
    if name in ev.results:
        ev.results[name]["kl_unrelated"] = s["kl"]


# ---------------------------------------------------------------------------------------------
# What the test split leaves unseen
# ---------------------------------------------------------------------------------------------


def split_design(questions) -> dict:
    """Per category: how many templates, attributes and subjects each split has, and which of them
    the test split shares with train/validation (none, for what is held out)."""
    cols = {c: list(questions[c]) for c in ("split", "category", "template_id", "attribute_id", "subj1", "subj2")}
    out = {}
    for cat in dict.fromkeys(cols["category"]):
        sets = {}
        for s in ("train", "validation", "test"):
            ix = [i for i, (sp, c) in enumerate(zip(cols["split"], cols["category"])) if sp == s and c == cat]
            sets[s] = {"templates": {cols["template_id"][i] for i in ix},
                       "attributes": {cols["attribute_id"][i] for i in ix},
                       "subjects": {cols["subj1"][i] for i in ix} | {cols["subj2"][i] for i in ix}}
        seen = {k: sets["train"][k] | sets["validation"][k] for k in ("templates", "attributes", "subjects")}
        out[cat] = {
            "counts": {s: {k: len(v) for k, v in d.items()} for s, d in sets.items()},
            "test_shared_with_train_val": {k: len(sets["test"][k] & seen[k]) for k in seen},
            "unseen_in_test": [k for k in seen if sets["test"][k] and not (sets["test"][k] & seen[k])],
        }
    return out

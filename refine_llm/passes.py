"""Second passes over questions already scored: log-probs at the base pass's top-k ids, and activations.

The main scoring pass (refine_llm.scoring) keeps, per prompt, the model's own top-k. Three methods of
issue 23 need something else from another forward over the same questions:

- ``self-debias`` and the KL of ``prompt-instruct``/``steer`` compare two distributions *over the same
  slots*: the base pass's top-k ids. ``score_at_ids`` runs a prompt (the instruct variant, a Self-Debias
  prefix variant, or the base prompt with steering hooks active) and returns the full-vocabulary
  log-probs at given ids (M, k), in the layout of ``topk_logprobs``: the metrics renormalise both over
  the k slots (``metrics.distribution_shift``, ``head.candidate_probs``), exactly as for a head.
- ``steer`` trains its probe and vector on one layer's activation at the answer position:
  ``collect_activations`` (M, n_layers, d).

Both run ``refine_llm.forward.answer_logits`` (through ``scoring.backends.hf.make_runner``, so the few-shot prefix's
KV is computed once) on the batches ``scoring.batch_ranges`` forms, with prompts rendered and tokenized
as ``scoring`` does: ``score_at_ids`` with the base prompt at the base ids reproduces the cached
``topk_logprobs`` (bit-identical with the same batch size and rows; tests/test_methods.py).

These are the capabilities the refactored scoring engine (issue 24) takes over, with its cache. Until
then they are not cached: a caller keeps their output (they are small: M x k floats).
"""

from __future__ import annotations

import numpy as np

from refine_llm.config import AUTO_SCORING_BATCH_SIZE, ScoringConfig
from refine_llm.errors import UserError
from refine_llm.prompts import PromptTemplate

__all__ = ["score_at_ids", "collect_activations", "question_rows"]


def question_rows(questions) -> dict[str, list]:
    """{column: list} of a questions Dataset, a dict of columns, or a list of row dicts."""
    if isinstance(questions, list):
        return {c: [q[c] for q in questions] for c in (questions[0] if questions else {})}
    names = getattr(questions, "column_names", None)
    return {c: list(questions[c]) for c in (names if names is not None else questions.keys())}


def _batch_size(model, cfg: ScoringConfig) -> int:
    if cfg.batch_size is not None:
        return cfg.batch_size
    device = "cuda" if str(getattr(model, "device", "cpu")).startswith("cuda") else "cpu"
    return AUTO_SCORING_BATCH_SIZE[device]


def _answer_batches(model, tokenizer, questions, prompt: PromptTemplate, cfg: ScoringConfig):
    """Yield (start, stop, logits (b, V) float32) per fixed batch of the questions, in order."""
    import torch

    from refine_llm.scoring.backends.hf import make_runner
    from refine_llm.scoring.plan import batch_ranges

    if cfg.backend != "hf":
        raise UserError(f"this pass runs the HF model (hooks, ids): use --backend hf, not {cfg.backend}")
    rows = question_rows(questions)
    texts = [prompt.render(c, q, tokenizer) for c, q in zip(rows["context"], rows["question"])]
    ids = tokenizer(texts, add_special_tokens=prompt.add_special_tokens)["input_ids"] if texts else []
    runner = make_runner(model, tokenizer, prompt, cfg)  # the prefix KV, once (unhooked: no mask)
    with torch.no_grad():
        for a, b in batch_ranges(len(ids), _batch_size(model, cfg)):
            seqs = ids[a:b]
            _, logits = runner.logits_at(seqs, [[len(s) - 1] for s in seqs], cfg.prefix_cache)
            yield a, b, logits


def score_at_ids(model, tokenizer, questions, prompt: PromptTemplate, ids, cfg: ScoringConfig) -> np.ndarray:
    """(M, k) float32 full-vocabulary log-probs of ``ids[i]`` (M, k) at the answer slot of question i
    rendered with ``prompt``: the base pass's top-k ids read under another prompt, another model state
    (hooks, adapters) or both. Non-finite logits give NaN rows, as in scoring."""
    import torch

    ids = np.asarray(ids, dtype=np.int64)
    rows = question_rows(questions)
    M = len(rows.get("question_id", rows.get("context", [])))
    if ids.ndim != 2 or len(ids) != M:
        raise ValueError(f"ids must be (M, k) with M = {M} questions, got shape {ids.shape}")
    out = np.full(ids.shape, np.nan, dtype=np.float32)
    for a, b, logits in _answer_batches(model, tokenizer, rows, prompt, cfg):
        lp = torch.log_softmax(logits, dim=-1)  # (b, V)
        got = lp.gather(1, torch.as_tensor(ids[a:b], device=lp.device))  # (b, k)
        finite = torch.isfinite(logits).all(dim=-1, keepdim=True)
        out[a:b] = torch.where(finite, got, torch.full_like(got, float("nan"))).cpu().numpy()
    return out


def collect_activations(model, tokenizer, questions, prompt: PromptTemplate, layers: list[int],
                        cfg: ScoringConfig) -> np.ndarray:
    """(M, len(layers), d) float32: the output of each decoder layer in ``layers`` at question i's answer
    position (its last prompt token), in the same forward pass that scoring runs (refine_llm.baselines.hooks)."""
    import torch

    from refine_llm.baselines.hooks import capture_answer_activations, hidden_size

    rows = question_rows(questions)
    M = len(rows.get("question_id", rows.get("context", [])))
    d = hidden_size(model)
    out = np.zeros((M, len(layers), d), dtype=np.float32)
    with capture_answer_activations(model, list(layers)) as store:
        for a, b, _ in _answer_batches(model, tokenizer, rows, prompt, cfg):
            for j, layer in enumerate(layers):
                got = torch.cat(store[layer], 0)  # (b, d): one call per batch (the prefix pass is not recorded)
                if got.shape[0] != b - a:
                    raise RuntimeError(f"layer {layer}: captured {got.shape[0]} rows for a batch of {b - a}")
                out[a:b, j] = got.numpy()
                store[layer].clear()
    return out


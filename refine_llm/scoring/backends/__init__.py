"""Scoring backends: each is the same small call, ``backend.score_batch(rows) -> pyarrow.Table``.

``rows``: one fixed batch of questions as a dict of columns (``scoring.plan.QUESTION_COLUMNS``, or
question_id/context/question/candidates); the table: those rows' cache columns (``scoring.cache.schema``),
in input order. Prompts are rendered and tokenized inside the backend, in the process that scores them.

- ``hf``: transformers, the forward of ``refine_llm.forward`` with the few-shot prefix's KV computed once;
- ``vllm``: a vLLM engine on the same token ids (raw log-probs), imported only when used;
- ``ray``: not a third way to score a batch but a pool of actors, each holding an ``hf`` or ``vllm``
  backend; the driver (``refine_llm.scoring.driver``) hands it batches as it would a local backend.
"""

from __future__ import annotations

from typing import Iterator

__all__ = ["score_payload"]


def score_payload(backend, payload) -> Iterator:
    """Run ``backend.score_batch`` on every fixed batch of a payload (one row per batch: "batch" and list
    columns of the question fields, ``refine_llm.scoring.driver.payload``); yield each batch's cache table
    with its "batch" column. The one loop a local run and a Ray actor both use."""
    import pyarrow as pa

    cols = [c for c in payload.column_names if c != "batch"]
    for i in range(payload.num_rows):
        rows = {c: payload.column(c)[i].as_py() for c in cols}
        t = backend.score_batch(rows)
        yield t.append_column("batch", pa.array([payload.column("batch")[i].as_py()] * t.num_rows, pa.int64()))

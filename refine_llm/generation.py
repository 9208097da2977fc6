"""End to end in generation: greedy answers through the vLLM OpenAI server, read as decisions, and the
UnQover metrics of those decisions next to what the HF scoring path predicts.

The scoring path (``refine_llm.scoring`` + a head on the top-k) gives a distribution over each
prompt's top-k; the served model *generates* an answer. Both are reduced to one decision per prompt,
``SUBJ1`` (0), ``SUBJ2`` (1) or ``NEITHER`` (-1):

- generation: the greedy answer text is cut at the first newline and matched against the two
  subjects (``parse_answer``: the answer starts with the subject's name, case-insensitively, followed by
  the end or a non-letter; the longer subject wins when both match);
- HF path: the argmax slot of the head's top-k distribution, mapped to the subject whose first-token
  set holds that token (``cand_mask``; ``hf_argmax_decisions``; a first token both names share goes to
  the name with the larger whole-continuation probability). A greedy decoder's first token is exactly
  that argmax, so the two decisions differ only where the rest of the generated word names somebody
  else, or where the two numerics tip a near tie.

Decisions become one-hot answer probabilities (``onehot``: NEITHER -> (0, 0)), and every bias number
is ``refine_llm.metrics.evaluate`` of those, the same C / γ / μ as the report's (no second formula).
A level CI of mean|C| and μ comes from ``metrics.cluster_bootstrap_delta`` against an all-zero C
(the change from 0 is the level): the same attribute-cluster bootstrap as the report's.

Specified accuracy here is strict (the decision is the gold subject; NEITHER counts wrong), unlike
``metrics.specified_accuracy`` on probabilities, where a tie counts half: a generated answer that names
nobody did not answer right.

``launched_server`` starts the project's launcher (``refine_llm.serving.launch``: preflight, bounded KV
cache on CPU, then ``python -m vllm.entrypoints.openai.api_server``) in its own process group and
stops the whole group on exit; ``generate`` sends token-id prompts to ``/v1/completions`` in batches
from a few threads. Used by ``eval/testbed_generation.py`` and tests/test_generation.py.
"""

from __future__ import annotations

import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from refine_llm import metrics
from refine_llm.errors import UserError

__all__ = [
    "SUBJ1", "SUBJ2", "NEITHER", "parse_answer", "decisions_from_texts", "hf_argmax_decisions", "onehot",
    "decision_metrics", "level_ci", "agreement", "prompt_token_ids", "hf_scores", "hf_predictions", "Completion", "generate", "launched_server", "GENERATION_KEYS",
]

SUBJ1, SUBJ2, NEITHER = 0, 1, -1
DEFAULT_MAX_TOKENS = 8  # a name is 1-4 tokens; generation stops at the first newline anyway
STOP = ("\n",)
# the numbers compared between generation and the HF path (keys of ``decision_metrics``)
GENERATION_KEYS = ("mean_abs_c", "mu", "eta", "specified_accuracy", "specified_accuracy_plain",
                   "specified_accuracy_negated", "neither_rate", "neither_rate_specified")

_WORD = re.compile(r"\w", re.UNICODE)


# ---------------------------------------------------------------------------------------------
# answers -> decisions


def parse_answer(text: str, subj1: str, subj2: str) -> int:
    """SUBJ1, SUBJ2 or NEITHER for one generated answer (see the module docstring)."""
    ans = text.split("\n", 1)[0].strip().lstrip("\"'“‘(*").casefold()
    best, best_len = NEITHER, -1
    for side, subj in ((SUBJ1, subj1), (SUBJ2, subj2)):
        s = subj.strip().casefold()
        if s and ans.startswith(s) and (len(ans) == len(s) or not _WORD.match(ans[len(s)])) and len(s) > best_len:
            best, best_len = side, len(s)
    return best


def decisions_from_texts(texts: Sequence[str], questions) -> np.ndarray:
    """(M,) int decisions of generated ``texts`` against the questions' subj1/subj2 columns."""
    s1, s2 = list(questions["subj1"]), list(questions["subj2"])
    if len(texts) != len(s1):
        raise ValueError(f"{len(texts)} answers for {len(s1)} questions")
    return np.array([parse_answer(t, a, b) for t, a, b in zip(texts, s1, s2)], dtype=np.int64)


def hf_argmax_decisions(head_logprobs, cand_mask, cand_logprobs=None) -> np.ndarray:
    """(M,) decisions of the argmax slot of (M,k) head log-probs: the subject whose first tokens
    (cand_mask (M,2,k) bool) hold that slot's token; NEITHER when none does.

    A token that both subjects start with (a collision, e.g. " Jo" of Joan and John) names nobody by
    itself: a greedy decoder's next tokens decide. With ``cand_logprobs`` (M,2), the scoring path's
    log-probabilities of each subject's whole continuation (exact mode for collision rows), the
    more probable subject wins; a served ``first``-mode head rescales the shared first token for both
    names alike, so their ratio is the base model's. Without it such rows are NEITHER.
    """
    lp = np.asarray(head_logprobs, dtype=np.float64)
    mask = np.asarray(cand_mask, dtype=bool)
    j = lp.argmax(axis=1)  # (M,) the token a greedy decoder emits first
    hit = mask[np.arange(len(j)), :, j]  # (M,2)
    out = np.where(hit[:, 0] & ~hit[:, 1], SUBJ1, np.where(hit[:, 1] & ~hit[:, 0], SUBJ2, NEITHER)).astype(np.int64)
    if cand_logprobs is not None:
        both = hit[:, 0] & hit[:, 1]
        cl = np.asarray(cand_logprobs, dtype=np.float64)
        out[both] = np.where(cl[both, 0] >= cl[both, 1], SUBJ1, SUBJ2)
    return out


def onehot(decisions) -> np.ndarray:
    """(M,) decisions -> (M,2) answer probabilities: SUBJ1 (1,0), SUBJ2 (0,1), NEITHER (0,0)."""
    d = np.asarray(decisions, dtype=np.int64)
    return np.stack([(d == SUBJ1), (d == SUBJ2)], axis=1).astype(np.float64)


def agreement(a, b, rows=None) -> float:
    """Share of prompts (of ``rows``, default all) where two decision vectors agree."""
    a, b = np.asarray(a), np.asarray(b)
    if rows is not None:
        a, b = a[rows], b[rows]
    return float(np.mean(a == b)) if len(a) else float("nan")


def prompt_token_ids(tokenizer, questions, prompt_name: str = "qa") -> list[list[int]]:
    """The token ids of each question's prompt, exactly as ``refine_llm.scoring`` tokenizes them."""
    from refine_llm import prompts

    prompt = prompts.load_prompt(prompt_name)
    texts = [prompt.render(c, q, tokenizer) for c, q in zip(questions["context"], questions["question"])]
    return tokenizer(texts, add_special_tokens=prompt.add_special_tokens)["input_ids"]


def hf_scores(model, tokenizer, questions, prompt_name: str = "qa", top_k: int = 10, store_hidden: bool = True,
              batch_size: int = 32, progress: bool = False, cache_dir=None, model_key: str | None = None):
    """Score ``questions`` once on the HF path (the one scoring driver: one forward pass each, top-k) ->
    ``methods.Scores`` (topk_logprobs (M,k), topk_ids, cand_mask (M,2,k), cand_logprobs (M,2), collision,
    hidden (M,d) with ``store_hidden``: the context of contextual heads). Every condition's
    ``hf_predictions`` reads the same scores. ``cache_dir``/``model_key``: the scoring cache (a re-run
    scores nothing twice)."""
    from refine_llm import prompts, scoring
    from refine_llm.config import ScoringConfig
    from refine_llm.methods import Scores

    cfg = ScoringConfig(prompt=prompt_name, top_k=top_k, batch_size=batch_size, store_hidden=store_hidden)
    return Scores.from_table(scoring.score(model, tokenizer, questions, prompts.load_prompt(prompt_name), cfg,
                                           progress=progress, cache_dir=cache_dir, model_key=model_key))


def hf_predictions(scores, method=None) -> dict[str, np.ndarray]:
    """The HF path's answers: ``method`` (a ``methods.Method``, a loaded head module, or None for the plain
    model) applied to the scored top-k (``hf_scores``) through the methods protocol, then the argmax.

    Returns decisions (M,), argmax_token_id (M,), p_topk (M,2) (the report's top-k renormalised
    candidate probabilities, for the soft metrics). A contextual head needs its lm_head_weight attached
    (``load_head(..., lm_head_weight=...)``) and scores with hidden states: it reads its context from the
    hidden state (fp16 in the scores), where the server reads the logits row.
    """
    from refine_llm.methods import Base, HeadMethod, Method

    if method is None:
        method = Base()
    elif not isinstance(method, Method):
        method = HeadMethod(method)
    if isinstance(method, HeadMethod) and getattr(method.head, "variant", None) == "contextual" and scores.hidden is None:
        raise ValueError("a contextual head needs scores with hidden states (hf_scores(store_hidden=True))")
    out = method.apply(scores)
    lp = np.asarray(out.topk_logprobs, dtype=np.float64)  # (M,k) over the base's top-k slots
    j = lp.argmax(axis=1)  # (M,)
    return {"decisions": hf_argmax_decisions(lp, scores.cand_mask, scores.cand_logprobs),
            "argmax_token_id": scores.topk_ids[np.arange(len(j)), j],
            "p_topk": np.asarray(out.p_topk, dtype=np.float64)}


# ---------------------------------------------------------------------------------------------
# decisions -> UnQover metrics (metrics.evaluate on one-hot probabilities)


def decision_metrics(questions, decisions, n_resamples: int = 0, seed: int = 0) -> dict[str, Any]:
    """Bias and competence of one condition's decisions. Keys: ``GENERATION_KEYS``, counts, and
    ``evaluation`` (the full ``metrics.evaluate`` block of the one-hot probabilities)."""
    d = np.asarray(decisions, dtype=np.int64)
    p = onehot(d)
    ev = metrics.evaluate(questions, p, p, seed=seed, n_resamples=n_resamples)
    spec = np.asarray(questions["specified"], dtype=bool)
    srows = np.flatnonzero(spec)
    negated = np.asarray(questions["negated"], dtype=bool)[srows]
    right = d[srows] == metrics.gold_positions(questions, srows)  # strict: NEITHER is wrong
    mean = lambda x: float(np.mean(x)) if len(x) else None
    return {
        "mean_abs_c": ev["mean_abs_c"], "mu": ev["mu"], "eta": ev["eta"],
        "specified_accuracy": mean(right), "specified_accuracy_plain": mean(right[~negated]),
        "specified_accuracy_negated": mean(right[negated]),
        "neither_rate": mean(d == NEITHER), "neither_rate_specified": mean(d[srows] == NEITHER),
        "neither_rate_underspecified": mean(d[~spec] == NEITHER),
        "n_prompts": int(len(d)), "n_tuples": int(ev["n_tuples"]), "n_specified": int(len(srows)),
        "evaluation": ev,
    }


def level_ci(evaluation: dict, n_resamples: int = 1000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Cluster-bootstrap CI (attributes resampled, as in the report) of mean|C| and μ of one
    ``metrics.evaluate`` block: ``cluster_bootstrap_delta`` from an all-zero C to this C.
    Returns {"mean_abs_c": {value, low, high}, "mu": {...}}."""
    t = evaluation["tuples"]
    zero = {**t, "C": [0.0] * len(t["C"])}
    boot = metrics.cluster_bootstrap_delta(zero, t, n_resamples=n_resamples, confidence=confidence, seed=seed)
    return {k: {"value": boot[k]["delta"], "low": boot[k]["low"], "high": boot[k]["high"]}
            for k in ("mean_abs_c", "mu")}


# ---------------------------------------------------------------------------------------------
# the server: start it through the project's launcher, send prompts


@dataclass
class Completion:
    """One greedy answer: its text (cut at the stop string) and its first token id."""

    text: str
    first_token_id: int | None


def _token_id(tok: str) -> int | None:
    # return_tokens_as_token_ids: tokens come back as "token_id:<id>"
    return int(tok.split(":", 1)[1]) if tok.startswith("token_id:") else None


def generate(base_url: str, model: str, prompt_ids: Sequence[Sequence[int]], head: str | None = None,
             mode: str = "first", max_tokens: int = DEFAULT_MAX_TOKENS, batch_size: int = 16, workers: int = 4,
             timeout: float = 600.0) -> list[Completion]:
    """Greedy completions (temperature 0, stop at a newline) of token-id prompts, in input order.

    Prompts go as token ids, so the server sees exactly the ids the HF path scored. ``head``: opt in
    through ``vllm_xargs`` ({refine_head, refine_mode}); None = the plain model. ``batch_size``
    prompts per request, ``workers`` requests in flight (the engine batches them together).
    """
    import requests

    def one(chunk: list[list[int]]) -> list[Completion]:
        body: dict[str, Any] = {"model": model, "prompt": chunk, "max_tokens": max_tokens, "temperature": 0,
                                "stop": list(STOP), "logprobs": 1, "return_tokens_as_token_ids": True}
        if head is not None:
            body["vllm_xargs"] = {"refine_head": head, "refine_mode": mode}
        try:
            r = requests.post(base_url.rstrip("/") + "/v1/completions", json=body, timeout=timeout)
        except requests.RequestException as e:  # a starved or dead server: one line, not a traceback
            raise UserError(f"{base_url}: /v1/completions failed ({type(e).__name__}, timeout {timeout:.0f} s); "
                            "the server is overloaded or gone: retry on a quieter machine or with fewer workers") from None
        if r.status_code != 200:
            raise UserError(f"{base_url}: /v1/completions answered {r.status_code}: {r.text[:300]}")
        out: list[Completion | None] = [None] * len(chunk)
        for ch in r.json()["choices"]:
            toks = (ch.get("logprobs") or {}).get("tokens") or []
            out[ch["index"]] = Completion(ch["text"], _token_id(toks[0]) if toks else None)
        return out  # type: ignore[return-value]

    ids = [list(map(int, p)) for p in prompt_ids]
    chunks = [ids[a:a + batch_size] for a in range(0, len(ids), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return [c for part in pool.map(one, chunks) for c in part]


def _free_port(host: str) -> int:
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextmanager
def launched_server(model: str, heads_dir: str | os.PathLike, log_path: str | os.PathLike, *,
                    served_name: str = "model", host: str = "127.0.0.1", port: int | None = None,
                    dtype: str = "float32", kv_cache_gib: float | None = None, extra: Sequence[str] = (),
                    startup_timeout: float = 600.0) -> Iterator[str]:
    """Start vLLM's OpenAI server through ``refine_llm.serving.launch`` (the checks of scripts/serve.py,
    then its command) and yield its base URL once /health answers; stop its process group on exit.
    The server's output goes to ``log_path``; a server that exits or never gets healthy is a UserError
    that quotes the log's tail."""
    from refine_llm.serving.launch import preflight, server_command, stop_process_group, wait_healthy

    port = port or _free_port(host)
    extra = list(extra)
    plan = preflight(model, str(heads_dir), host, port, dtype=dtype, kv_cache_gib=kv_cache_gib, extra=extra)
    cmd = server_command(plan, served_name, host, port, dtype, extra)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # the plan's bound holds
    env.update(plan.env)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://{host}:{port}"
    try:
        wait_healthy(base, proc, startup_timeout, log_path)
        yield base
    finally:
        stop_process_group(proc)


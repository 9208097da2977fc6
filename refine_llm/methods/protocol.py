"""The one home of "apply a method to scores": what every condition of the report implements.

A condition (the base model, a no-training point, a head, an adapter, an instruction, Self-Debias, ...)
turns a question set's cached scores into candidate probabilities:

    method.apply(base: Scores, own: dict[str, Scores]) -> Output

- ``base`` is the base model's scores on the question set (``Scores``: the score cache as arrays). A method
  that *transforms the base top-k* (a head, a temperature, top2-equal) reads only this: it returns its
  distribution over the same k slots, and KL/TV to base follow from it.
- ``own`` holds the scores of the extra passes the method asked for (``passes()``): an instruction in front
  of the same questions, Self-Debias's bias-inducing prefix, an adapted or steered model. The score stage
  runs every ``ScorePass`` of every method of the run up front (the LLM runs once per unique prompt); a
  pass whose model exists only after training (an adapter) runs when the evaluate stage asks for it, through
  the same driver and cache. KL is taken against the base model's top-k on the same prompt: a method that
  brings its own scores reports its log-probs over the *base's* top-k slots in ``Output.topk_logprobs``
  (or None: then no KL; the LoRA adapter, steering and the instruction read theirs off an aligned pass).

A method that acts inside the model (activation steering) trains on the run's model (``TrainInputs.load_model``)
and asks for a ``ScorePass(model="hooked")``: the evaluate stage scores it with ``Method.hooks(model)`` active,
under the cache key ``<model key>-<kind>-<Method.fingerprint>``, once training saved what the hooks need.

The evaluator, BBQ, generation, lm-eval and serving call ``apply`` (or, on a live logits row, the head
module itself through ``refine_llm.methods.heads``); nothing else maps a method to probabilities.
``candidate_probs`` (refine_llm.metrics) is the one formula from a distribution over the top-k to the
candidates' probabilities; ``Output.from_topk`` applies it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from refine_llm.metrics import candidate_probs, candidate_probs_full

__all__ = ["Scores", "Output", "ScorePass", "TrainInputs", "Method", "Base"]


@dataclass
class Scores:
    """A question set's scores as arrays, one row per question (docs/CONTRACTS.md, "Scores").

    topk_logprobs (M,k) float32 full-vocabulary log-probs of the top-k; topk_ids (M,k) int64; cand_mask
    (M,S,k) bool; cand_logprobs (M,S) float32 log P(candidate) over the vocabulary; collision (M,) bool;
    nonfinite (M,) bool; hidden (M,d) float32 or None; aligned_logprobs (M,k) float32 or None: on an extra
    pass aligned to the base (``ScorePass.align``), this pass's full-vocabulary log-probs of the *base's* top-k
    ids on the same question (what a method's KL to base reads)."""

    topk_logprobs: np.ndarray
    topk_ids: np.ndarray
    cand_mask: np.ndarray
    cand_logprobs: np.ndarray
    collision: np.ndarray
    nonfinite: np.ndarray
    hidden: np.ndarray | None = None
    aligned_logprobs: np.ndarray | None = None

    @classmethod
    def from_table(cls, scores) -> "Scores":
        """From a score cache Dataset (``refine_llm.scoring.score``) or a dict of columns."""
        names = scores.column_names if hasattr(scores, "column_names") else list(scores)
        sc = scores.with_format("numpy") if hasattr(scores, "with_format") else scores
        stack = lambda c, dt: np.stack([np.asarray(x) for x in sc[c]]).astype(dt) if len(sc[c]) else np.zeros((0,), dt)
        mask = [np.stack([np.asarray(s) for s in m]) for m in sc["cand_mask"]]
        n = len(mask)
        return cls(topk_logprobs=stack("topk_logprobs", np.float32), topk_ids=stack("topk_ids", np.int64),
                   cand_mask=np.stack(mask).astype(bool) if n else np.zeros((0, 2, 0), bool),
                   cand_logprobs=stack("cand_logprobs", np.float32),
                   collision=np.asarray(sc["collision"], bool) if "collision" in names else np.zeros(n, bool),
                   nonfinite=np.asarray(sc["nonfinite"], bool) if "nonfinite" in names else np.zeros(n, bool),
                   hidden=stack("hidden", np.float32) if "hidden" in names else None,
                   aligned_logprobs=stack("aligned_logprobs", np.float32) if "aligned_logprobs" in names else None)

    def __len__(self) -> int:
        return len(self.topk_logprobs)

    @property
    def k(self) -> int:
        return int(self.topk_logprobs.shape[1])

    def select(self, idx) -> "Scores":
        idx = np.asarray(idx, np.int64)
        pick = lambda a: None if a is None else a[idx]
        return Scores(self.topk_logprobs[idx], self.topk_ids[idx], self.cand_mask[idx], self.cand_logprobs[idx],
                      self.collision[idx], self.nonfinite[idx], pick(self.hidden), pick(self.aligned_logprobs))

    @property
    def cand_in_topk(self) -> np.ndarray:
        """(M,) bool: some candidate has a token in the top-k."""
        return self.cand_mask.any(axis=2).any(axis=1)


@dataclass
class Output:
    """What a method gives on a question set: p_topk (M,S) candidate probabilities under the top-k
    renormalised distribution (the headline metrics), p_full (M,S) over the full vocabulary, and
    topk_logprobs (M,k) its log-probs over the base's top-k slots (KL/TV to base), or None."""

    p_topk: np.ndarray
    p_full: np.ndarray
    topk_logprobs: np.ndarray | None = None

    @classmethod
    def from_topk(cls, logprobs, base: Scores) -> "Output":
        """The output of a method that redistributes the base's top-k mass: ``logprobs`` (M,k) torch, its
        distribution over the base's k slots; every token outside the top-k keeps its probability."""
        import torch

        with torch.no_grad():
            mask = torch.as_tensor(base.cand_mask)
            p_topk = candidate_probs(logprobs, mask)
            p_full = candidate_probs_full(logprobs, mask, torch.as_tensor(base.topk_logprobs),
                                          torch.as_tensor(base.cand_logprobs))
        return cls(p_topk.numpy(), p_full.numpy(), logprobs.detach().numpy())


@dataclass(frozen=True)
class ScorePass:
    """An extra scoring pass a method needs on the same (test) questions, scored by the one driver into the
    run's cache (``refine_llm.stages.passes``). ``prompt``: a template name or file (None: the run's prompt);
    ``prefix``: text put before each question's context (Self-Debias's bias-inducing prefix; the pass's rows
    get question ids ``<name>|<question id>``); ``model``: "base" (scored by the score stage, up front), or
    "adapter" (a model that training produces: scored by the evaluate stage once it exists); ``align``:
    also record this pass's log-probs of the base's top-k ids (``Scores.aligned_logprobs``), so that the
    method's KL is taken against the base model's top-k on the same question; "hooked": the base model with
the method's ``hooks`` active, scored by the evaluate stage. ``instruct``: the run's prompt
    with a bias-avoiding instruction (``prompt_variants.instruct_prompt``); ``bias_prefixes``: Self-Debias's
    passes, one per bias-inducing prefix of each row's category, read from that prefixes file ("" = the
    shipped one): the stage expands it into passes ``<name>#<i>`` (prefix i of each category; a row whose
    category has fewer prefixes gets -inf aligned log-probs there, no evidence)."""

    name: str
    prompt: str | None = None
    prefix: str = ""
    model: str = "base"
    align: bool = True
    instruct: bool = False
    bias_prefixes: str | None = None


@dataclass
class TrainInputs:
    """What the train stage hands ``Method.train``: the cached ``scores`` and the ``questions`` of the train and
    validation splits (split -> Dataset), the run's ``prompt`` name, and ``load_model()`` -> (model, tokenizer),
    the run's model, loaded on the first call and shared by every method and seed; ``log``: the stage's log."""

    scores: dict
    questions: dict
    prompt: str
    load_model: Callable[[], tuple]
    log: Callable[[str], None] = print


class Method(ABC):
    """A condition of the report. Subclasses set ``kind`` (its registry key, ``refine_llm.methods.METHODS``),
    take their settings in ``__init__`` (a config dataclass where there are any) and implement ``apply``.

    Artifacts (a head, a steering vector) are saved by training and loaded with ``from_pretrained``; a
    method without artifacts has nothing to load. ``trainable_params``: for the methods table."""

    kind: ClassVar[str] = ""
    name: str = ""

    @classmethod
    def for_run(cls, cfg, run_dir) -> "Method":
        """The method as the main job evaluates it (``RunConfig.extra_methods`` names it): from the run's config
        (its own config dataclass lives in refine_llm.config) and, for a trained method, its artifacts in
        ``run_dir`` (``from_pretrained``). The built-in conditions are built by the evaluate stage itself."""
        raise NotImplementedError(f"{cls.__name__} is not a plug-in of the main job (no for_run)")

    def train(self, cfg, run_dir, inputs: TrainInputs) -> None:
        """Train and save what the method learns (steering vectors, ...) under ``run_dir``, from ``inputs``
        (the cached train/validation scores, their questions, the prompt, the model). Default: nothing to train."""

    @property
    def fingerprint(self) -> str:
        """Names what a "hooked" pass runs with (its cache key); "" for a method without hooks."""
        return ""

    def hooks(self, model):
        """A context manager under which ``model`` runs the method (a "hooked" pass; steering's forward hooks)."""
        raise NotImplementedError(f"{type(self).__name__} has no hooks (it asked for no hooked pass)")

    def passes(self) -> list[ScorePass]:
        """The extra scoring passes this method reads (default: none, it acts on the base top-k)."""
        return []

    @abstractmethod
    def apply(self, base: Scores, own: dict[str, Scores] | None = None) -> Output:
        """Candidate probabilities on ``base``'s questions (see the module docstring)."""

    @property
    def trainable_params(self) -> int:
        return 0

    def info(self) -> dict[str, Any]:
        """What the report says about it (kind, name)."""
        return {"kind": self.kind, "name": self.name}


@dataclass
class Base(Method):
    """The model as it is: the top-k renormalised candidate probabilities of its scores."""

    kind: ClassVar[str] = "base"
    name: str = "base"
    extra: dict = field(default_factory=dict)

    def apply(self, base: Scores, own: dict[str, Scores] | None = None) -> Output:
        p_topk = candidate_probs(base.topk_logprobs.astype(np.float64), base.cand_mask, renormalise=True)
        p_full = np.exp(base.cand_logprobs.astype(np.float64))
        return Output(p_topk, p_full, base.topk_logprobs)

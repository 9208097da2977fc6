"""Which token ids stand for a word where it appears in a prompt: answer candidates and the serving gate.

One home for the tokenization of answer words, shared by scoring (``cand_mask``), the LoRA trainer, the
pipeline (a head's ``gate_token_ids``) and serving (``gated`` mode). Before this module the pipeline
tokenized the gate vocabulary after a newline anchor with capitalised forms and serving tokenized bare
forms, so a head's saved gate and one built by ``refine_llm.serving`` for the same words differed.

A word maps to the first token of each surface form (with and without a leading space, as written and
capitalised), each tokenized after a newline anchor so that SentencePiece's dummy prefix and BPE merges
behave as they do inside a prompt; ids are deduplicated, and a token that decodes to whitespace alone
(SentencePiece's bare "▁") is dropped, since it would credit any word.

Only a tokenizer is needed (no torch, nothing else of ours): ``refine_llm.serving``, which may import
only ``head``, ``config`` and this module, uses it to build gates without pulling in the scorer.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterable

__all__ = ["PRONOUNS", "GATE_PRONOUNS", "first_token_in_context", "surface_forms", "word_token_ids",
           "candidate_token_ids", "gate_token_ids", "gate_vocabulary", "tokenizer_fingerprint"]

PRONOUNS = {"female": "she", "male": "he"}  # credited to a gender subject with ScoringConfig.pronouns
GATE_PRONOUNS = ("he", "she", "him", "her", "his")  # always part of a gate vocabulary
_ANCHOR = "\n"


def first_token_in_context(tokenizer: Any, form: str) -> int | None:
    """First token of ``form`` as it is tokenized after a newline (the way it appears in a prompt)."""
    anchor = tokenizer.encode(_ANCHOR, add_special_tokens=False)
    ids = tokenizer.encode(_ANCHOR + form, add_special_tokens=False)
    if ids[: len(anchor)] == anchor and len(ids) > len(anchor):
        return ids[len(anchor)]
    ids = tokenizer.encode(form, add_special_tokens=False)  # the anchor merged: take the form alone
    return ids[0] if ids else None


def surface_forms(word: str) -> list[str]:
    cap = word[:1].upper() + word[1:]
    return list(dict.fromkeys([word, " " + word, cap, " " + cap]))


def word_token_ids(tokenizer: Any, word: str) -> list[int]:
    """Unique first-token ids of ``word``'s surface forms, in order of ``surface_forms``."""
    out = []
    for form in surface_forms(word):
        t = first_token_in_context(tokenizer, form)
        if t is not None and tokenizer.decode([t]).strip():
            out.append(int(t))
    return list(dict.fromkeys(out))


def candidate_token_ids(tokenizer: Any, subject: str, pronouns_for: str | None = None) -> list[int]:
    """Unique first-token ids of ``subject``'s surface forms (" Mary", "Mary", capitalised), plus
    she/he when ``pronouns_for`` is "female"/"male" (the subject's group)."""
    ids = word_token_ids(tokenizer, subject)
    if pronouns_for in PRONOUNS:
        ids += [t for t in word_token_ids(tokenizer, PRONOUNS[pronouns_for]) if t not in ids]
    return ids


def gate_token_ids(tokenizer: Any, words: Iterable[str], pronouns: bool = True) -> list[int]:
    """Sorted ids of ``words`` (and of ``GATE_PRONOUNS`` unless ``pronouns=False``) for serving's ``gated``
    mode: a step is gated when its top-k holds at least two of them. Save as the head's ``gate_token_ids``."""
    ids: set[int] = set()
    for word in list(words) + (list(GATE_PRONOUNS) if pronouns else []):
        ids.update(word_token_ids(tokenizer, word))
    return sorted(ids)


def gate_vocabulary(tokenizer: Any, subjects: Iterable[str | Iterable[str]],
                    pronouns: bool = True) -> tuple[list[int], list[list[bool]]]:
    """The category vocabulary as a token -> subjects table, for heads that must tell two named subjects
    apart: (token ids (G,) sorted, membership (G, S) bool: token g is a first token of a surface form of
    subject s). ``subjects``: one entry per subject, a word or its list of surface forms ("Danish",
    "Denmark": ``refine_llm.questions.category_subjects``); then each of ``GATE_PRONOUNS`` as a subject of
    its own unless ``pronouns=False``. A token of two subjects ("Ind" of Indian and Indonesian) belongs to both."""
    groups = [[s] if isinstance(s, str) else list(s) for s in subjects]
    groups += [[p] for p in GATE_PRONOUNS] if pronouns else []
    of: dict[int, set[int]] = {}
    for g, forms in enumerate(groups):
        for form in forms:
            for t in word_token_ids(tokenizer, form):
                of.setdefault(t, set()).add(g)
    ids = sorted(of)
    return ids, [[g in of[t] for g in range(len(groups))] for t in ids]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the vocabulary (sorted token -> id items) and the special tokens, as 'sha256:<hex>'.

    Works with any object that has ``get_vocab()`` (transformers tokenizers); special tokens come
    from ``all_special_tokens`` / ``all_special_ids`` when present.
    """
    try:
        vocab = tokenizer.get_vocab()
    except AttributeError as e:
        raise TypeError(f"cannot fingerprint {type(tokenizer).__name__}: it has no get_vocab()") from e
    specials = sorted(
        zip(
            [str(t) for t in getattr(tokenizer, "all_special_tokens", [])],
            [int(i) for i in getattr(tokenizer, "all_special_ids", [])],
        )
    )
    payload = json.dumps(
        {"vocab": sorted((str(t), int(i)) for t, i in vocab.items()), "special": specials},
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return "sha256:" + hashlib.sha256(payload.encode("utf-8")).hexdigest()

"""Serving a trained REFINE head: the shared core of the HF and vLLM logits processors.

A head maps the top-k of the next-token distribution to a new distribution over the same k tokens.
At serving time it is applied to the raw logits row z (V,) of a generation step:

    ids, v = topk(z, k)                      # (k,) token ids and their logits
    m      = logsumexp(v)                    # log of the top-k mass (up to the vocabulary normaliser)
    z[ids] = m + head(v, ids, logits=z)      # head returns (k,) log-probs over the top-k

Tokens outside the top-k keep their logits, and sum(exp(z[ids])) = exp(m) is unchanged, so after a
log-softmax over the whole vocabulary the top-k holds the head's distribution times the original
top-k mass and every other token keeps its probability. The processors therefore take logits and
return logits (not log-probs): log_softmax of the output is the debiased distribution. Heads are
shift-invariant (see ``refine_llm.methods.heads``), so raw logits are a valid input.

Modes (``refine_llm.config.SERVING_MODES``):
- ``first``: only the first generated token (the answer slot of an infilling prompt);
- ``gated``: steps whose top-k holds at least two tokens of the head's category vocabulary
  (``gate_token_ids`` in the head's config.json);
- ``all``: every step.

Per-request options (vLLM ``SamplingParams.extra_args`` / the server's ``vllm_xargs``):
``{"refine_head": "<name>", "refine_mode": "first"}``; see ``parse_request_args``.

This package imports only ``refine_llm.methods``, ``refine_llm.config`` and ``refine_llm.vocab`` (tokenizer-only
word -> token ids, no torch) of ours: a server never pulls in trainers, scorers or datasets. The gate
vocabulary lives in ``vocab`` so that serving and the pipeline tokenize gate words the same way. ``refine_llm.serving.hf`` needs transformers and
``refine_llm.serving.vllm`` needs vllm; neither is imported here.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from refine_llm.config import CONTEXT_VARIANTS, SERVING_MODES
from refine_llm.errors import UserError
from refine_llm.methods.heads import gate_mask, load_head, rewrite_topk
from refine_llm.methods.hub import read_head_config
from refine_llm.vocab import gate_token_ids  # the one tokenization of gate words, shared with the pipeline

__all__ = [
    "SERVING_MODES",
    "HEADS_DIR_ENV",
    "ARG_HEAD",
    "ARG_MODE",
    "ServedHead",
    "load_served_head",
    "discover_heads",
    "head_configs",
    "refine_topk",
    "gate_mask",
    "gate_rows",
    "parse_request_args",
    "gate_token_ids",
]

HEADS_DIR_ENV = "REFINE_HEADS_DIR"  # each subdirectory is one head (its name is the head's name), + heads.json
HEADS_INDEX = "heads.json"  # in the heads directory: {"served name": "dir (relative to it) or org/repo id"}
ARG_HEAD = "refine_head"
ARG_MODE = "refine_mode"
DEFAULT_MODE = "first"
_ARGS = (ARG_HEAD, ARG_MODE)


@dataclass
class ServedHead:
    """A head ready to serve: the module, its config and its gate vocabulary."""

    name: str
    head: torch.nn.Module
    config: dict[str, Any]
    gate_ids: torch.Tensor | None  # (G,) long, sorted; None when the config has no gate_token_ids

    @property
    def k(self) -> int:
        return int(self.head.k)

    @property
    def contextual(self) -> bool:
        return self.config.get("variant") in CONTEXT_VARIANTS


def load_served_head(
    head_dir: str | os.PathLike,
    name: str | None = None,
    expect_tokenizer_fingerprint: str | None = None,
    device: str | torch.device | None = None,
) -> ServedHead:
    """Load a head for serving from a directory or a hub repo id (resolved offline from the local hub cache
    when HF_HUB_OFFLINE is set; ``refine_llm.methods.hub.resolve_head``). UserError for a missing/corrupt head or
    one saved for another tokenizer."""
    head, config = load_head(head_dir, expect_tokenizer_fingerprint=expect_tokenizer_fingerprint, device=device)
    for p in head.parameters():
        p.requires_grad_(False)
    gate = config.get("gate_token_ids")
    gate_ids = None
    if gate:
        gate_ids = torch.tensor(sorted({int(t) for t in gate}), dtype=torch.long, device=device)
    return ServedHead(name or Path(head_dir).name, head, config, gate_ids)


def discover_heads(heads_dir: str | os.PathLike) -> dict[str, Path | str]:
    """name -> head for ``heads_dir``: every subdirectory that holds a head config.json (its name is the
    served name), plus the entries of ``heads_dir/heads.json`` ({"name": "dir" | "org/repo"}; a relative dir
    is relative to ``heads_dir``; a repo id is resolved when the head loads). heads.json wins on a clash."""
    root = Path(heads_dir)
    if not root.is_dir():
        return {}
    found: dict[str, Path | str] = {p.name: p for p in sorted(root.iterdir()) if p.is_dir() and (p / "config.json").is_file()}
    index = root / HEADS_INDEX
    if index.is_file():
        import json

        try:
            entries = json.loads(index.read_text())
        except ValueError as e:
            raise UserError(f"{index} is not valid JSON ({e}): write {{\"name\": \"dir or org/repo\"}}") from None
        if not isinstance(entries, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in entries.items()):
            raise UserError(f"{index} must map served names to directories or hub repo ids (strings), got {entries!r}")
        for name, target in entries.items():
            local = root / target
            found[name] = local if local.is_dir() else (Path(target) if Path(target).is_absolute() else target)
    return found


def refine_topk(logits: torch.Tensor, served: ServedHead) -> tuple[torch.Tensor, torch.Tensor]:
    """(R,V) logits -> (ids (R,k) long, new top-k logits (R,k), dtype of ``logits``): the served head applied
    by ``refine_llm.methods.heads.rewrite_topk`` (the one rule of a head on live logits; see there).

    Write back with ``logits.scatter_(1, ids, new)`` (or an index_put on a row subset)."""
    return rewrite_topk(served.head, logits)


def gate_rows(ids: torch.Tensor, served: ServedHead) -> torch.Tensor:
    """(R,k) top-k ids -> (R,) bool: the top-k holds at least two tokens of the head's category."""
    if served.gate_ids is None:
        return torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    return gate_mask(ids, served.gate_ids)


def parse_request_args(
    extra_args: Mapping[str, Any] | None,
    heads: Mapping[str, Mapping[str, Any]],
) -> tuple[str, str] | None:
    """Check one request's options -> (head name, mode), or None when the request does not opt in.

    ``heads`` maps each servable head name to its config dict. Raises ValueError that says what is
    allowed for: an unknown head, an unknown mode, a non-string value, ``refine_mode`` without
    ``refine_head``, ``gated`` on a head without ``gate_token_ids``, or a misspelt ``refine_*`` key.
    """
    if not extra_args:
        return None
    unknown = [key for key in extra_args if isinstance(key, str) and key.startswith("refine_") and key not in _ARGS]
    if unknown:
        near = difflib.get_close_matches(unknown[0], _ARGS, n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown option {unknown[0]!r}.{hint} REFINE options are {', '.join(_ARGS)}")
    if ARG_HEAD not in extra_args:
        if ARG_MODE in extra_args:
            raise ValueError(f"{ARG_MODE} was given without {ARG_HEAD}: name a head too ({_names(heads)})")
        return None
    name, mode = extra_args[ARG_HEAD], extra_args.get(ARG_MODE, DEFAULT_MODE)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{ARG_HEAD} must be a head name (string), got {name!r}; available: {_names(heads)}")
    if name not in heads:
        if not heads:
            raise ValueError(
                f"{ARG_HEAD}={name!r}: this server has no heads; set {HEADS_DIR_ENV} to a directory of "
                "saved heads (one subdirectory per head) before starting it"
            )
        near = difflib.get_close_matches(name, list(heads), n=1)
        hint = f" Did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"{ARG_HEAD}={name!r} is not a served head.{hint} Available: {_names(heads)}")
    if not isinstance(mode, str) or mode not in SERVING_MODES:
        raise ValueError(f"{ARG_MODE}={mode!r} is not one of {', '.join(SERVING_MODES)}")
    if mode == "gated" and not heads[name].get("gate_token_ids"):
        raise ValueError(
            f"{ARG_MODE}='gated' needs the head's category vocabulary but head {name!r} has no "
            "gate_token_ids: use refine_mode 'first' or 'all', or re-save the head with gate_token_ids"
        )
    return name, mode


def _names(heads: Mapping[str, Any]) -> str:
    return ", ".join(sorted(heads)) or "(none)"


def head_configs(heads_dir: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """name -> config.json of every head under ``heads_dir`` (configs only, no weights)."""
    if not heads_dir:
        return {}
    return {name: read_head_config(path) for name, path in discover_heads(heads_dir).items()}

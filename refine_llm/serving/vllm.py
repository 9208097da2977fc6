"""Apply trained REFINE heads inside vLLM: logits processors for both vLLM 0.32 model runners.

Heads are loaded once per process from ``$REFINE_HEADS_DIR`` (each subdirectory one head, its name
the subdirectory's name, plus the names of its ``heads.json``, which map to directories or hub repo
ids resolved from the local hub cache; see ``refine_llm.serving.discover_heads``); each request opts
in on its own:

    SamplingParams(..., extra_args={"refine_head": "gender", "refine_mode": "first"})   # offline LLM
    {"prompt": ..., "vllm_xargs": {"refine_head": "gender", "refine_mode": "first"}}    # server

``validate_params`` rejects an unknown head or mode, or a malformed value, with a ValueError that
lists what is allowed: the server answers HTTP 400 and keeps serving. Rows of requests that did not
opt in are never written to, so they stay bit for bit what they were.

Classes:
- ``RefineHeadLogitsProcessorV1``: the V1 interface (``update_state(BatchUpdate)`` +
  ``apply(logits)``), used by the V1 model runner (the CPU engine, and GPU with
  VLLM_USE_V2_MODEL_RUNNER=0). Per-row state lives in a dict keyed by batch index.
- ``RefineHeadLogitsProcessorV2``: the Model Runner V2 interface (``add_request(slot, params)`` +
  ``apply(logits, ctx)``), the default GPU runner. Per-slot state lives in host arrays.
- ``RefineHeadLogitsProcessor``: what to register (the package's ``vllm.logits_processors`` entry
  point, or ``--logits-processors refine_llm.serving.vllm:RefineHeadLogitsProcessor``). It subclasses
  both interfaces, so both loaders accept it, and builds the V1 or V2 processor from the arguments
  the runner passes. Because the entry point already loads it into every engine of an environment
  where refine_llm is installed, naming it again with ``--logits-processors`` would build it twice:
  only the first instance per engine is active, the others pass logits through.

Each processor rewrites the top-k logits of the selected rows as described in
``refine_llm.serving`` (logits in, logits out; log_softmax of the output is the debiased
distribution). ``is_argmax_invariant()`` is False: a head can reorder the top-k.
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.v1.sample.logits_processor.interface import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor.interface import LogitsProcessor as _V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as _V2LogitsProcessor

from refine_llm.config import SERVING_MODES
from refine_llm.errors import UserError
from refine_llm.vocab import tokenizer_fingerprint
from refine_llm.serving import (
    HEADS_DIR_ENV,
    ServedHead,
    discover_heads,
    gate_rows,
    head_configs,
    load_served_head,
    parse_request_args,
    refine_topk,
)

if TYPE_CHECKING:
    from vllm import SamplingParams
    from vllm.config import VllmConfig
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext, LogitsProcRequestState

__all__ = [
    "RefineHeadLogitsProcessor",
    "RefineHeadLogitsProcessorV1",
    "RefineHeadLogitsProcessorV2",
    "served_heads",
]

logger = logging.getLogger(__name__)

_MODE_CODE = {m: i for i, m in enumerate(SERVING_MODES)}  # first=0, gated=1, all=2
_FIRST, _GATED, _ALL = _MODE_CODE["first"], _MODE_CODE["gated"], _MODE_CODE["all"]

# Per-process caches: head configs (for validate_params, in the frontend) and loaded heads (engine).
_lock = threading.Lock()
_config_cache: dict[str, dict[str, dict[str, Any]]] = {}
_head_cache: dict[tuple[str, str], dict[str, ServedHead]] = {}


def _heads_dir() -> str:
    return os.environ.get(HEADS_DIR_ENV, "")


def _configs() -> dict[str, dict[str, Any]]:
    path = _heads_dir()
    with _lock:
        if path not in _config_cache:
            _config_cache[path] = head_configs(path)
        return _config_cache[path]


def served_heads(device: torch.device | str = "cpu") -> dict[str, ServedHead]:
    """name -> ServedHead for every head under $REFINE_HEADS_DIR, loaded once per process and device."""
    path, dev = _heads_dir(), str(torch.device(device))
    with _lock:
        if (path, dev) not in _head_cache:
            heads = {}
            for name, head_dir in (discover_heads(path) if path else {}).items():
                heads[name] = load_served_head(head_dir, name=name, device=dev)
            _head_cache[(path, dev)] = heads
            if heads:
                logger.info("refine_llm: serving heads %s from %s", ", ".join(sorted(heads)), path)
        return _head_cache[(path, dev)]


def _check_tokenizer(vllm_config: Any, heads: dict[str, ServedHead]) -> None:
    """Refuse heads saved for another tokenizer than the engine's (fail at engine start)."""
    model_config = getattr(vllm_config, "model_config", None)
    tok_path = getattr(model_config, "tokenizer", None)
    if not heads or not tok_path:
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        tok_path,
        revision=getattr(model_config, "tokenizer_revision", None),
        trust_remote_code=bool(getattr(model_config, "trust_remote_code", False)),
    )
    fp = tokenizer_fingerprint(tok)
    bad = sorted(n for n, h in heads.items() if h.config.get("tokenizer_fingerprint") not in (None, fp))
    if bad:
        raise UserError(
            f"heads {', '.join(bad)} in {_heads_dir()} were trained for another tokenizer than {tok_path}: "
            f"remove them from {HEADS_DIR_ENV} or serve their base model "
            f"({', '.join(str(heads[n].config.get('base_model')) for n in bad)})"
        )


class _RefineBase:
    """What both interfaces share: head loading, request parsing and the one-instance-per-engine rule."""

    # id(vllm_config) -> the active instance for that engine (see the module docstring on duplicates).
    _owners: dict[int, weakref.ref] = {}

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        parse_request_args(sampling_params.extra_args, _configs())

    def _setup(self, vllm_config: Any, device: torch.device) -> None:
        self.device = torch.device(device)
        owner = _RefineBase._owners.get(id(vllm_config))
        owner = owner() if owner is not None else None
        self.inert = owner is not None and owner._vllm_config is vllm_config
        self._vllm_config = vllm_config
        if self.inert:
            logger.info("refine_llm: %s is registered twice; the second instance stays inert", type(self).__name__)
            self.heads: dict[str, ServedHead] = {}
            return
        _RefineBase._owners[id(vllm_config)] = weakref.ref(self)
        self.heads = served_heads(self.device)
        _check_tokenizer(vllm_config, self.heads)

    def _parse(self, params: SamplingParams | None) -> tuple[str, int] | None:
        if self.inert or params is None:
            return None
        parsed = parse_request_args(getattr(params, "extra_args", None), {n: h.config for n, h in self.heads.items()})
        if parsed is None:
            return None
        return parsed[0], _MODE_CODE[parsed[1]]

    def _rewrite(
        self, logits: torch.Tensor, rows: torch.Tensor, served: ServedHead, mode: torch.Tensor, first: torch.Tensor
    ) -> None:
        """Rewrite logits rows ``rows`` (R,) in place with ``served``; mode (R,) codes; first (R,) bool.

        Rows not selected this step (first mode past the first token, gated without >= 2 gate tokens)
        get their own top-k values written back, which leaves them bit for bit unchanged.
        """
        ids, new = refine_topk(logits[rows], served)  # (R,k), (R,k)
        sel = (mode == _ALL) | ((mode == _FIRST) & first)
        if served.gate_ids is not None:
            sel |= (mode == _GATED) & gate_rows(ids, served)
        r = rows.unsqueeze(1)  # (R,1)
        old = logits[r, ids]  # (R,k)
        logits[r, ids] = torch.where(sel.unsqueeze(1), new, old)


@dataclass
class _Row:
    head: str
    mode: int
    output_tok_ids: list[int]  # vLLM's running list of generated tokens (mutated in place by vLLM)


class RefineHeadLogitsProcessorV1(_RefineBase, _V1LogitsProcessor):
    """V1 interface: ``update_state(BatchUpdate)`` then ``apply(logits)`` once per step."""

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool):
        self._setup(vllm_config, device)
        self.rows: dict[int, _Row] = {}  # batch index -> state of an opted-in request

    def is_argmax_invariant(self) -> bool:
        return False  # the head can reorder the top-k, so it changes greedy answers

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not batch_update:
            return
        # Order from the interface: removed, then added (may replace an index), then moved.
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt, output_tok_ids in batch_update.added:
            parsed = self._parse(params)
            if parsed is None:
                self.rows.pop(index, None)
            else:
                self.rows[index] = _Row(parsed[0], parsed[1], output_tok_ids)
        for a, b, direction in batch_update.moved:
            row_a, row_b = self.rows.pop(a, None), self.rows.pop(b, None)
            if row_a is not None:
                self.rows[b] = row_a
            if direction == MoveDirectionality.SWAP and row_b is not None:
                self.rows[a] = row_b

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        groups: dict[str, tuple[list[int], list[int], list[bool]]] = {}
        for index, row in self.rows.items():
            first = len(row.output_tok_ids) == 0
            if row.mode == _FIRST and not first:
                continue  # nothing to do for this row any more
            idx, modes, firsts = groups.setdefault(row.head, ([], [], []))
            idx.append(index)
            modes.append(row.mode)
            firsts.append(first)
        for name, (idx, modes, firsts) in groups.items():
            self._rewrite(
                logits,
                torch.tensor(idx, dtype=torch.long, device=logits.device),
                self.heads[name],
                torch.tensor(modes, dtype=torch.int8, device=logits.device),
                torch.tensor(firsts, dtype=torch.bool, device=logits.device),
            )
        return logits


class RefineHeadLogitsProcessorV2(_RefineBase, _V2LogitsProcessor):
    """Model Runner V2 interface: ``add_request(slot, params)`` then ``apply(logits, ctx)`` per step.

    A row's slot is ``ctx.expanded_idx_mapping[row]``. The row samples the first generated token
    when its position + 1 equals the request's prompt length (``req_states.prompt_len``).
    """

    def __init__(self, vllm_config: VllmConfig, req_states: LogitsProcRequestState):
        self._setup(vllm_config, req_states.device)
        self.req_states = req_states
        n = int(req_states.max_num_reqs)
        self.names = sorted(self.heads)
        self.slot_head = np.full(n, -1, dtype=np.int32)  # slot -> index into self.names, -1 = off
        self.slot_mode = np.zeros(n, dtype=np.int8)

    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        parsed = self._parse(sampling_params)
        if parsed is None:
            self.slot_head[req_idx] = -1
            return False
        self.slot_head[req_idx] = self.names.index(parsed[0])
        self.slot_mode[req_idx] = parsed[1]
        return True

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        slots_np = np.asarray(ctx.idx_mapping_np)
        heads_np = self.slot_head[slots_np]
        if not (heads_np >= 0).any():
            return logits
        if logits.shape[0] == slots_np.shape[0]:
            row_slots_np = slots_np  # one row per request: rows are batch positions (host, no sync)
        else:  # speculative decoding: several rows per request
            row_slots_np = ctx.expanded_idx_mapping.cpu().numpy()
        row_heads = self.slot_head[row_slots_np]
        prompt_len = self.req_states.prompt_len.gpu
        for h in np.unique(row_heads[row_heads >= 0]):
            rows_np = np.nonzero(row_heads == h)[0]
            rows = torch.from_numpy(rows_np).to(logits.device)
            slots = torch.from_numpy(row_slots_np[rows_np].astype(np.int64)).to(logits.device)
            first = (ctx.pos[rows].long() + 1) == prompt_len[slots].long()
            mode = torch.from_numpy(self.slot_mode[row_slots_np[rows_np]]).to(logits.device)
            self._rewrite(logits, rows, self.heads[self.names[h]], mode, first)
        return logits


class RefineHeadLogitsProcessor(_V1LogitsProcessor, _V2LogitsProcessor):
    """The class to register: builds the V1 or the V2 processor from the runner's arguments.

    V1 runners call ``cls(vllm_config, device, is_pin_memory)``; Model Runner V2 calls
    ``cls(vllm_config, req_states)``.
    """

    def __new__(cls, vllm_config: VllmConfig, *args: Any):
        if len(args) == 1:
            return RefineHeadLogitsProcessorV2(vllm_config, *args)
        return RefineHeadLogitsProcessorV1(vllm_config, *args)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        _RefineBase.validate_params(sampling_params)

"""The REFINE heads' public names at their old import path (``from refine_llm.head import load_head``).

The heads live in ``refine_llm.methods.heads`` (the modules, their registry ``HEADS``, build/save/load and
``HeadMethod``) and ``refine_llm.methods.hub`` (a saved head's files, model card and hub repo ids), and the tokenizer's
fingerprint from ``refine_llm.vocab``; this
module only re-exports them, so code and docs written against ``refine_llm.head`` keep working.
"""

from __future__ import annotations

from refine_llm.methods.heads import (HEADS, ContextualHead, GateHead, HeadMethod, HubHeadMixin, IdentityHead, LogitHead,
                                      PaperHead, RankBiasHead, SlotHead, UniformHead, build_head, flatness, gate_mask,
                                      head_config, load_head, num_parameters, renormalise, save_head)
from refine_llm.methods.hub import (CARD_NAME, CONFIG_NAME, FORMAT, FORMAT_VERSION, WEIGHTS_NAME, SavedHeadConfig,
                                    model_card, push_to_hub, read_head_config, resolve_head)
from refine_llm.vocab import tokenizer_fingerprint

__all__ = ["HEADS", "ContextualHead", "GateHead", "HeadMethod", "HubHeadMixin", "IdentityHead", "LogitHead", "PaperHead",
           "RankBiasHead", "SlotHead", "UniformHead", "build_head", "flatness", "gate_mask", "head_config", "load_head",
           "num_parameters", "renormalise", "save_head", "CARD_NAME", "CONFIG_NAME", "FORMAT", "FORMAT_VERSION",
           "WEIGHTS_NAME", "SavedHeadConfig", "model_card", "push_to_hub", "read_head_config", "resolve_head",
           "tokenizer_fingerprint"]

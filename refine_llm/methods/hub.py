"""A saved head on disk and on the hub: its config.json (a dataclass that round-trips), its weights, its
model card, resolving a hub repo id offline, pushing, and the tokenizer fingerprint that ties a head to a model.

Layout (a hub model repository): ``config.json`` (``SavedHeadConfig``: architecture, base model,
tokenizer fingerprint, category, training summary, gate vocabulary, the weights' sha256) +
``model.safetensors`` + ``README.md`` (a generated model card); never pickle. This module knows the files,
not the modules: ``refine_llm.methods.heads`` builds a head from a config and loads its weights
(``load_head``), so the two never import each other in a circle.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any


from refine_llm.errors import UserError
from refine_llm.io import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, write_artifact

__all__ = ["FORMAT", "FORMAT_VERSION", "CONFIG_NAME", "WEIGHTS_NAME", "CARD_NAME", "SavedHeadConfig",
           "save_head_files", "model_card", "resolve_head", "push_to_hub", "read_head_config", "read_weights"]

FORMAT = "refine_llm.head"
FORMAT_VERSION = 1


@dataclass
class SavedHeadConfig:
    """config.json of a saved head, as peft keeps an adapter's config: ``to_dict`` writes it, ``from_dict``
    reads it back (a key this version does not name is kept in ``extra`` and written again)."""

    variant: str
    k: int
    rank: int | None = None
    vocab_size: int | None = None  # contextual / slot: the LLM's vocabulary and hidden size
    hidden_size: int | None = None
    base_model: str | None = None
    hub_id: str | None = None
    tokenizer_fingerprint: str | None = None  # a head refuses another tokenizer (tokenizer_fingerprint)
    category: str | None = None
    training: dict | None = None  # the trainer's summary (refine_llm.bandit.TrainResult.summary)
    bandit: dict | None = None  # the BanditConfig it trained with
    gate_token_ids: list[int] | None = None  # the category vocabulary (serving's gated mode, the slot head)
    prompt: str | None = None
    weights_sha256: str | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.gate_token_ids is not None:
            self.gate_token_ids = [int(t) for t in self.gate_token_ids]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {**d.pop("extra"), **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SavedHeadConfig":
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})


def save_head_files(out_dir: str | os.PathLike, tensors: dict, arch: dict[str, Any], meta: dict[str, Any] | None = None,
                    card: dict[str, Any] | None = None) -> Path:
    """``save_pretrained``: write ``out_dir/model.safetensors``, ``README.md`` (the model card) and
    ``config.json``, the hub layout of a model repository.

    ``tensors``: the head's state dict; ``arch``: its architecture fields (variant, k, rank, ...; from the head,
    ``refine_llm.methods.heads.head_config``). ``meta`` (JSON-serialisable) goes into config.json through
    ``SavedHeadConfig`` (a key it does not name is kept in ``extra``); the keys others read are
    ``base_model``, ``hub_id``, ``tokenizer_fingerprint``, ``category``, ``training`` (summary dict) and
    ``gate_token_ids`` (list of int, read by serving). Architecture keys come from the head itself.
    ``card``: extra facts for the model card (``training_data``, ``metrics``, ``caveats``; see ``model_card``).

    Each file is written temp + rename, weights first and config.json last; config.json records the
    weights' sha256, so a kill between the files (an old config.json next to new weights) is detected
    at load. Files are written one by one (not a directory swap) because ``out_dir`` may also hold the
    trainer's ``checkpoints/`` (runs/<run>/heads/<variant>/).
    """
    out_dir = Path(out_dir)
    meta = dict(meta or {})
    clash = sorted(set(arch) & set(meta))
    if clash:
        raise ValueError(f"meta must not set architecture keys {clash}: they come from the head")
    if "gate_token_ids" in meta and meta["gate_token_ids"] is not None:
        meta["gate_token_ids"] = [int(t) for t in meta["gate_token_ids"]]
    return write_artifact(out_dir, tensors, {**arch, **meta}, lambda config: model_card(config, card), "head",
                          finish=lambda config: SavedHeadConfig.from_dict(config).to_dict())


def model_card(config: dict[str, Any], card: dict[str, Any] | None = None) -> str:
    """The model card (README.md with hub metadata) of a head: base model, tokenizer fingerprint, category,
    training data, the run's metrics and the caveats. ``card`` may give ``training_data`` (str or dict),
    ``metrics`` (dict name -> number, or condition -> dict) and ``caveats`` (list of str)."""
    from huggingface_hub import ModelCard, ModelCardData

    card = dict(card or {})
    base = config.get("hub_id") or config.get("base_model")
    data = ModelCardData(library_name="refine_llm", license="apache-2.0",
                         base_model=base if isinstance(base, str) and "/" in base else None,
                         tags=["refine-lm", "bias", "unqover", "logits-processor", f"head-{config.get('variant')}"])
    train = card.get("training_data") or config.get("training_data") or "not recorded"
    if isinstance(train, dict):
        train = ", ".join(f"{k}: {v}" for k, v in train.items())
    lines = ["---", data.to_yaml(), "---", "",
             f"# REFINE head ({config.get('variant')}, k={config.get('k')}) for {config.get('base_model') or 'an LLM'}", "",
             "A small head applied to the top-k of an LLM's next-token distribution that reduces the LLM's social "
             "bias on underspecified questions (REFINE-LM, arXiv 2408.09489), trained with "
             "[refine_llm](https://github.com/) on cached scores. Serve it with `refine_llm.serving` "
             "(transformers `RefineHeadProcessor`, or vLLM with `REFINE_HEADS_DIR`).", "",
             "| | |", "|---|---|",
             f"| base model | `{config.get('base_model')}`" + (f" (`{config.get('hub_id')}`)" if config.get("hub_id") else "") + " |",
             f"| tokenizer fingerprint | `{config.get('tokenizer_fingerprint')}` (heads refuse another tokenizer) |",
             f"| category | {config.get('category')} |",
             f"| variant, top-k | {config.get('variant')}, k = {config.get('k')} (scoring must use the same top_k) |",
             f"| training data | {train} |"]
    training = config.get("training") or {}
    if training:
        lines.append("| training | " + ", ".join(f"{k} {v}" for k, v in training.items() if v is not None) + " |")
    metrics = card.get("metrics") or {}
    if metrics:
        lines += ["", "## Metrics of the run (test split)", "", "| | value |", "|---|---|"]
        for k, v in metrics.items():
            lines.append(f"| {k} | {json.dumps(v, allow_nan=True) if isinstance(v, dict) else v} |")
    caveats = list(card.get("caveats") or []) + [
        "Measured on template questions of one category (UnQover); bias elsewhere is not measured.",
        "The head only reorders the top-k of the answer slot; it cannot fix what is outside the top-k.",
        "Load it only with the base model and tokenizer above; the fingerprint check refuses others.",
    ]
    lines += ["", "## Caveats", ""] + [f"- {c}" for c in caveats]
    return ModelCard("\n".join(lines) + "\n").content


def resolve_head(name_or_path: str | os.PathLike, revision: str | None = None,
                 local_files_only: bool | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """A head's local directory: ``name_or_path`` itself when it is a directory, else a hub repo id
    ("org/name") resolved through huggingface_hub's cache (downloaded unless offline). Offline
    (``local_files_only``, default: HF_HUB_OFFLINE is set) it resolves from the local hub cache only
    (``models--org--name/snapshots/<rev>/`` via ``refs/<revision or main>``)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    repo = str(name_or_path)
    if path.is_absolute() or repo.startswith(".") or repo.count("/") != 1:
        raise UserError(f"no head directory at {repo}: train one first, fix the path, or give a hub repo id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=local_files_only,
                                      cache_dir=str(cache_dir) if cache_dir is not None else None))
    except (LocalEntryNotFoundError, HFValidationError, OSError) as e:
        where = "in the local hub cache (offline)" if local_files_only else "on the hub or in its cache"
        raise UserError(f"head {repo!r} is neither a directory nor a repo {where} ({type(e).__name__}): "
                        "fix the name, or download it once with `huggingface-cli download` while online") from None


def push_to_hub(head_dir: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload REFINE head") -> str:
    """Upload a saved head directory (config.json, model.safetensors, README.md) to a hub model repo; the
    trainer's checkpoints/ stay local. Returns the commit URL."""
    from huggingface_hub import HfApi

    read_head_config(head_dir)  # never upload something that does not load
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(head_dir), repo_id=repo_id, commit_message=commit_message,
                             allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME])
    return str(getattr(info, "commit_url", info))


def read_head_config(head_dir: str | os.PathLike, **resolve_kw) -> dict[str, Any]:
    """Parse and check a head's ``config.json`` (no weights loaded; ``SavedHeadConfig.from_dict``) and return
    it as a dict; ``head_dir`` may be a hub repo id (``resolve_head``). UserError if missing/corrupt."""
    head_dir = resolve_head(head_dir, **resolve_kw)
    path = head_dir / CONFIG_NAME
    if not path.is_file():
        raise UserError(f"{path} is missing: {head_dir} is not a saved head (expected config.json + {WEIGHTS_NAME})")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is corrupt ({e}): retrain or re-copy the head") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{path} is not a refine_llm head config (format != {FORMAT!r})")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"{path} has format_version {config['format_version']}: upgrade refine_llm to load it")
    if not isinstance(config.get("variant"), str) or not isinstance(config.get("k"), int):
        raise UserError(f"{path} has no valid variant/k: retrain or re-copy the head")
    return SavedHeadConfig.from_dict(config).to_dict()


def read_weights(head_dir: Path, config: dict[str, Any]) -> dict:
    """The tensors of a resolved head directory, checked against the sha256 its config.json recorded."""
    from safetensors.torch import load as load_safetensors

    wpath = head_dir / WEIGHTS_NAME
    if not wpath.is_file():
        raise UserError(f"{wpath} is missing: retrain or re-copy the head")
    raw = wpath.read_bytes()
    want = config.get("weights_sha256")
    if want is not None and hashlib.sha256(raw).hexdigest() != want:
        raise UserError(f"{wpath} is corrupt: not the weights {head_dir / CONFIG_NAME} was written with (an "
                        "interrupted save or a partial copy); save or copy the head again")
    try:
        return load_safetensors(raw)
    except Exception as e:  # safetensors raises several types on a truncated/garbled file
        raise UserError(f"{wpath} is corrupt ({e}): retrain or re-copy the head") from e



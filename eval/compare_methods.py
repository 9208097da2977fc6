"""Compare debiasing methods on one model and category: base, uniform, refine, lora-reward (bandit and
direct objectives) and lora-cda. One row per method: trainable params, training wall time, peak memory,
δ, ε, μ, η and specified accuracy on the test split, plus the bias-vs-utility plot.

base / uniform / refine come from the main job (``scripts/debias_llm.py --method refine``, run as a
subprocess into ``<out>/pipeline``); the LoRA rows train adapters with ``refine_llm.baselines.lora`` on
that run's train split and score its test split with ``scoring.score`` (its own cache key per adapter).
Everything is written by ``refine_llm.report.write_report`` into ``<out>``.

    python eval/compare_methods.py --model smollm2-135m --category gender --max-tuples 16 --out runs/compare
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LORA_METHODS = ("lora-reward", "lora-reward-direct", "lora-cda")


@dataclass
class Args:
    model: str = field(default="smollm2-135m", metadata={"help": "Model alias, hub id or directory."})
    category: str = field(default="gender", metadata={"help": "Bias category."})
    quant: str = field(default="nf4", metadata={"help": "nf4, int8, bf16 or fp32."})
    max_tuples: int = field(default=16, metadata={"help": "Underspecified 4-tuples per split."})
    seed: int = field(default=0, metadata={"help": "Seed."})
    prompt: str = field(default="qa", metadata={"help": "Prompt template (auto runs the sweep)."})
    steps: int = field(default=30, metadata={"help": "LoRA optimizer steps."})
    batch_size: int = field(default=8, metadata={"help": "LoRA tuples per step."})
    lr: float = field(default=2e-4, metadata={"help": "LoRA learning rate."})
    methods: str = field(default="refine," + ",".join(LORA_METHODS), metadata={"help": "Comma-separated methods."})
    device: str | None = field(default=None, metadata={"help": "torch device."})
    out: str = field(default="runs/compare", metadata={"help": "Output directory."})


def parse_args(argv=None) -> Args:
    from dataclasses import fields

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in fields(Args):
        typ = {"int": int, "float": float}.get(str(f.type).split(" ")[0], str)
        p.add_argument("--" + f.name.replace("_", "-"), type=typ, default=f.default, help=f.metadata["help"])
    return Args(**vars(p.parse_args(argv)))


def _run_pipeline(a: Args, out: Path) -> dict:
    """The main job (base, uniform, refine) as a subprocess; returns its report.json."""
    method = "refine" if "refine" in a.methods.split(",") else "none"
    cmd = [sys.executable, str(ROOT / "scripts" / "debias_llm.py"), "--model", a.model, "--quant", a.quant,
           "--category", a.category, "--max-tuples", str(a.max_tuples), "--seed", str(a.seed), "--prompt", a.prompt,
           "--method", method, "--out", str(out)]
    if a.device:
        cmd += ["--device", a.device]
    t = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT)
    print(f"[compare] main job ({method}) took {time.time() - t:.0f}s", file=sys.stderr)
    return json.loads((out / "report.json").read_text())


def main(argv=None) -> int:
    a = parse_args(argv)
    from dataclasses import asdict

    from refine_llm import metrics, prompts, scoring
    from refine_llm.baselines import lora
    from refine_llm.config import LoraConfig, ScoringConfig
    from refine_llm.questions import load_questions
    from refine_llm.report import write_report

    out = Path(a.out)
    pipe = _run_pipeline(a, out / "pipeline")
    base_metrics = json.loads((out / "pipeline" / "report.json").read_text())["metrics"]
    per_tuple = json.loads((out / "pipeline" / "per_tuple.json").read_text())
    for cond, d in per_tuple.items():  # report.json keeps per-tuple lists apart; compare() needs them
        base_metrics.setdefault(cond, {}).update(d)
    chosen = next((s["prompt"] for s in pipe.get("prompt_sweep") or [] if s.get("chosen")), a.prompt)
    prompt = prompts.load_prompt(chosen)
    q = load_questions(out / "pipeline" / "questions")
    split = {s: q.select([i for i, x in enumerate(q["split"]) if x == s]) for s in ("train", "test")}
    scfg = ScoringConfig(**{k: v for k, v in pipe["config"]["scoring"].items() if k in ScoringConfig.__dataclass_fields__})

    report = {"config": {"compare": asdict(a), "pipeline": pipe["config"]}, "metrics": dict(base_metrics),
              "significance": dict(pipe.get("significance") or {}), "methods": list(pipe.get("methods") or []),
              "timing": dict(pipe.get("timing") or {}), "warnings": []}
    for m in [m for m in a.methods.split(",") if m in LORA_METHODS]:
        cfg = LoraConfig(objective="direct" if m.endswith("direct") else "bandit", steps=a.steps,
                         batch_size=a.batch_size, lr=a.lr, seed=a.seed)
        fn = lora.train_lora_cda if m == "lora-cda" else lora.train_lora_reward
        t = time.time()
        res = fn(a.model, split["train"], prompt, cfg, out / "adapters" / m, quant=a.quant, device=a.device,
                 pronouns=scfg.pronouns, progress=True)
        report["timing"][f"train_{m}"] = time.time() - t
        model, tok = lora.load_adapted(a.model, res.adapter_dir, quant=a.quant, device=a.device)
        sc = scoring.score(model, tok, split["test"], prompt, scfg, cache_dir=out / "pipeline" / "scores",
                           model_key=lora.model_key(a.model, res.adapter_dir, a.quant), progress=False)
        r = metrics.evaluate(split["test"], *scoring.candidate_probs(sc), seed=a.seed)
        report["metrics"][m] = r
        if "abs_bias" in base_metrics.get("base", {}):
            report["significance"][m] = metrics.compare(base_metrics["base"], r)
        report["methods"].append({**res.row(), "method": m, **{k: r[k] for k in (
            "positional_error", "attributive_error", "mu", "eta", "specified_accuracy")},
            "abs_c_first": res.history[0].get("abs_c") if res.history else None,
            "abs_c_last": res.history[-1].get("abs_c") if res.history else None})
        print(f"[compare] {m}: μ {r['mu']:.3f}, spec. acc. {r['specified_accuracy']:.3f}, "
              f"train {res.train_seconds:.0f}s", file=sys.stderr)
        del model
        write_report(out, report)  # after every method: a later failure keeps the rows so far
    write_report(out, report)
    keys = ("trainable_params", "train_seconds", "peak_memory_mb", "positional_error", "attributive_error", "mu",
            "eta", "specified_accuracy")
    print("| method | " + " | ".join(keys) + " |")
    for row in report["methods"]:
        print(f"| {row['method']} | " + " | ".join(f"{row.get(k):.3f}" if isinstance(row.get(k), float)
                                                    else str(row.get(k)) for k in keys) + " |")
    print(f"report: {out / 'report.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

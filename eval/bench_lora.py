#!/usr/bin/env python
"""Benchmark: one lora-reward training step with the shared few-shot prefix run once per step vs every
prompt run in full (what a plain causal-LM training loop does).

Both arms train the same fresh LoRA adapter (same seed) on the same tuples for the same steps; the only
difference is ``TrainSet.prefix_len`` (0 = whole prompts). The script prints seconds per step for each,
their ratio, and the largest difference between the two arms' per-step mean |C| (the forward is exact, so
the runs match up to float rounding).

    .venv/bin/python eval/bench_lora.py --steps 3 --batch-size 2
    .venv/bin/python eval/bench_lora.py --model qwen2.5-coder-1.5b-instruct --quant bf16 --prompt chat \
        --arms shared --steps 2 --batch-size 1          # the step time on the default model, one arm

``--arms shared`` times only the shared-prefix arm (the one the main job trains with): on a model where a step
takes minutes, the comparison would double that.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quant", default="nf4")
    p.add_argument("--prompt", default="qa")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=2, help="tuples per step")
    p.add_argument("--objective", default="direct", choices=("reinforce", "direct"))
    p.add_argument("--arms", default="both", choices=("both", "shared"),
                   help="both: whole prompts vs shared prefix, with their ratio; shared: the main job's arm only")
    args = p.parse_args(argv)

    import numpy as np
    import torch

    from refine_llm import models, prompts, questions
    from refine_llm.baselines import lora
    from refine_llm.config import LoraConfig, QuestionsConfig

    ds = questions.build_questions(QuestionsConfig(category="gender", max_tuples=max(8, args.batch_size * args.steps)))
    train = ds.select([i for i, s in enumerate(ds["split"]) if s == "train"])
    prompt = prompts.load_prompt(args.prompt)
    model, tok = models.load_model(args.model, quant=args.quant)
    cfg = LoraConfig(objective=args.objective, steps=args.steps, batch_size=args.batch_size, dropout=0.0, seed=0)
    peft_model = lora.add_lora(model, cfg)
    init = {n: t.detach().clone() for n, t in peft_model.named_parameters() if t.requires_grad}

    results = {}
    arms = ("whole prompts", "shared prefix") if args.arms == "both" else ("shared prefix",)
    for arm in arms:
        with torch.no_grad():
            for n, t in peft_model.named_parameters():
                if n in init:
                    t.copy_(init[n])
        ts = lora.prepare_train_set(train, prompt, tok)
        prefix_len = ts.prefix_len
        if arm == "whole prompts":
            ts.prefix_len = 0
        opt = torch.optim.AdamW([t for t in peft_model.parameters() if t.requires_grad], lr=cfg.lr)
        peft_model.train()
        times, abs_c = [], []
        for step, tuples in lora.schedule(len(ts.tuple_rows), cfg):
            t0 = time.perf_counter()
            loss, logs = lora.step_loss(peft_model, ts, tuples, cfg, torch.Generator().manual_seed(step))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - t0)
            abs_c.append(logs["abs_c"])
        results[arm] = (float(np.median(times)), abs_c)
        print(f"{arm:>14}: {results[arm][0]:6.2f} s/step (median of {len(times)}; shared prefix "
              f"{prefix_len} of ~{int(np.mean([len(i) for i in ts.ids]))} tokens)")
    lcfg = LoraConfig()
    print(f"the main job's lora-reward ({lcfg.steps} steps of {lcfg.batch_size} tuples) at this step time, scaled "
          f"by tuples per step: ~{results['shared prefix'][0] * lcfg.steps * lcfg.batch_size / args.batch_size / 60:.0f} "
          f"min (linear in tuples per step: an estimate)")
    if len(arms) == 1:
        return 0
    ratio = results["whole prompts"][0] / results["shared prefix"][0]
    diff = max(abs(a - b) for a, b in zip(results["whole prompts"][1], results["shared prefix"][1]))
    print(f"speed-up: {ratio:.1f}x; max |Δ mean|C|| between the arms over {args.steps} steps: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

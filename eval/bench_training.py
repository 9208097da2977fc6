#!/usr/bin/env python
"""Benchmark: training a REFINE head our way (cached scores) vs the paper's way (LLM inside every step).

Both train the same `logit` head with the same bandit on the same underspecified 4-tuples for the same
number of epochs. Ours scores every prompt once (one batched forward pass, few-shot prefix KV-cached)
and then trains on the cached top-k; the LLM never runs during training. The paper's code calls
`model.generate(max_new_tokens=10, output_scores=True)` on the minibatch's prompts inside every step and
keeps only the first step's scores. The script prints both wall times and their ratio.

    .venv/bin/python eval/bench_training.py --tuples 16 --epochs 2
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
    p.add_argument("--tuples", type=int, default=16, help="train tuples (4 prompts each)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--minibatch", type=int, default=8, help="tuples per optimizer step")
    p.add_argument("--top-k", type=int, default=10)
    args = p.parse_args(argv)

    import tempfile

    import torch

    from refine_llm import bandit, metrics, models, prompts, questions, scoring
    from refine_llm.config import BanditConfig, HeadConfig, QuestionsConfig, ScoringConfig
    from refine_llm.head import build_head
    from refine_llm.metrics import candidate_probs
    from refine_llm.stages.train import bandit_data

    model, tok = models.load_model(args.model, quant=args.quant)
    qs = questions.build_questions(QuestionsConfig(category="gender", seed=0, max_tuples=args.tuples))
    train = qs.select([i for i, (s, sp) in enumerate(zip(qs["split"], qs["specified"])) if s == "train" and not sp])
    prompt = prompts.load_prompt(args.prompt)
    scfg = ScoringConfig(prompt=args.prompt, top_k=args.top_k)
    bcfg = BanditConfig(lr=5e-2, epochs=args.epochs, batch_size=args.minibatch, minibatch_size=args.minibatch)
    k = args.top_k

    # ours: one scoring pass (no disk cache, so the LLM time is counted), then bandit steps on arrays
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        sc = scoring.score(model, tok, train, prompt, scfg, cache_dir=d, model_key="bench", progress=False)
    t_score = time.time() - t0
    data = bandit_data(train, sc)
    head = build_head(HeadConfig(variant="logit", k=k))
    t1 = time.time()
    bandit.train_head(head, data, bcfg, progress=False)
    t_ours = time.time() - t0
    print(f"ours:  scoring {t_score:.1f}s + training {time.time() - t1:.1f}s = {t_ours:.1f}s "
          f"({len(train)} prompts scored once, {bandit.num_steps(data.num_tuples, bcfg)} steps)")

    # paper: generate inside every step, keep the first step's top-k, then the same update
    rows, _ = metrics.tuple_index(train)
    texts = [prompt.render(c, q, tokenizer=tok) for c, q in zip(train["context"], train["question"])]
    cand = [[scoring.candidate_token_ids(tok, s) for s in pair] for pair in train["answers"]]
    head = build_head(HeadConfig(variant="logit", k=k))
    opt = torch.optim.AdamW(head.parameters(), lr=bcfg.lr)
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    n_steps = 0
    for _ in range(args.epochs):
        perm = torch.randperm(len(rows), generator=g)
        for s in range(0, len(rows), args.minibatch):
            tuples = perm[s:s + args.minibatch]
            flat = torch.as_tensor(rows[tuples.numpy()]).reshape(-1)
            batch = tok([texts[i] for i in flat], return_tensors="pt", padding=True)
            with torch.no_grad():
                out = model.generate(**batch, max_new_tokens=10, do_sample=False, output_scores=True,
                                     return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
            first = torch.log_softmax(out.scores[0].float(), -1)  # (4n, V): the only step the paper uses
            lp, ids = first.topk(k, dim=-1)
            mask = torch.from_numpy(scoring.cand_mask_of(ids.numpy(), [cand[i] for i in flat.tolist()]))
            hp = candidate_probs(head(lp), mask)
            local = torch.arange(len(flat)).reshape(-1, 2, 2)
            loss = metrics.tuple_bias(metrics.gather_tuples(hp, local)).abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            n_steps += 1
    t_paper = time.time() - t0
    print(f"paper: {t_paper:.1f}s ({n_steps} steps, generate(10 tokens) on {len(texts)} prompts per epoch)")
    print(f"ratio paper/ours: {t_paper / t_ours:.1f}x  (epochs={args.epochs}; ours pays the LLM once, "
          f"the paper's way once per epoch and 10 tokens per prompt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Speed of scoring: prompts/second of the paper's generate-based scoring vs ours (not a test).

On the same prompts and model (default: SmolLM2-135M nf4, 64 validation gender questions, prompt
`paper`), in one run:
  (a) the paper's scoring: `generate(max_new_tokens=10, output_scores=True)` and keep only the first
      step's scores (as the authors do), batched with left padding;
  (b) refine_llm.scoring without the prefix cache (one forward pass per prompt, left padding);
  (c) refine_llm.scoring with the prefix KV cache;
  (d) vLLM through refine_llm.scoring.backends.vllm, when it imports (otherwise a printed note).
Each result is checked against (b): the same top-1 token. Ratios are printed against (a).

    python eval/bench_scoring.py --model smollm2-135m --quant nf4 --n 64 --batch-size 16
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass


@dataclass
class BenchArgs:
    model: str = "smollm2-135m"
    quant: str = "nf4"
    prompt: str = "paper"
    n: int = 64
    batch_size: int = 16
    top_k: int = 10
    device: str | None = None


def paper_generate(model, tok, texts: list[str], batch_size: int, k: int):
    """The authors' way: generate 10 tokens with output_scores, keep the first step's top-k."""
    import torch

    top1 = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i: i + batch_size], return_tensors="pt", padding=True).to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=10, do_sample=False, output_scores=True,
                                 return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
        first = torch.log_softmax(out.scores[0].float(), -1).topk(k)
        top1 += first.indices[:, 0].tolist()
    return top1


def main(args: BenchArgs) -> dict:
    from dataclasses import replace

    from refine_llm import models, scoring
    from refine_llm.config import QuestionsConfig, ScoringConfig
    from refine_llm.prompts import load_prompt
    from refine_llm.questions import build_questions

    model, tok = models.load_model(args.model, quant=args.quant, device=args.device)
    qs = build_questions(QuestionsConfig(category="gender", max_tuples=max(1, args.n // 8 + 1)))
    qs = qs.filter(lambda r: r["split"] == "validation").select(range(args.n))
    prompt = load_prompt(args.prompt)
    texts = [prompt.render(c, q, tok) for c, q in zip(qs["context"], qs["question"])]
    cfg = ScoringConfig(prompt=args.prompt, top_k=args.top_k, batch_size=args.batch_size)
    rates, top1 = {}, {}

    t = time.perf_counter()
    top1["a_paper_generate"] = paper_generate(model, tok, texts, args.batch_size, args.top_k)
    rates["a_paper_generate"] = args.n / (time.perf_counter() - t)
    for name, c in (("b_ours_no_prefix_cache", replace(cfg, prefix_cache=False)), ("c_ours_prefix_cache", cfg)):
        t = time.perf_counter()
        ds = scoring.score(model, tok, qs, prompt, c, cache_dir=None, progress=False)
        rates[name] = args.n / (time.perf_counter() - t)
        top1[name] = [row[0] for row in ds["topk_ids"]]
    try:
        import refine_llm.scoring.backends.vllm  # noqa: F401

        src = models.resolve(args.model)
        vcfg, mdir = replace(cfg, backend="vllm"), models.model_dir(src)
        # Start the engine (~30 s, once per process) outside the timed region: one prompt, untimed.
        scoring.score(None, tok, qs.select([0]), prompt, vcfg, cache_dir=None, progress=False, model_dir=mdir)
        t = time.perf_counter()
        ds = scoring.score(None, tok, qs, prompt, vcfg, cache_dir=None, progress=False, model_dir=mdir)
        rates["d_vllm"] = args.n / (time.perf_counter() - t)  # vLLM runs the unquantised weights (fp32)
        top1["d_vllm"] = [row[0] for row in ds["topk_ids"]]
    except ImportError as e:
        print(f"note: (d) vLLM skipped: refine_llm.scoring.backends.vllm does not import yet ({e})")
    except Exception as e:  # an engine that cannot start here (memory, no supported device) is not our result
        print(f"note: (d) vLLM skipped: the engine failed ({type(e).__name__}: {str(e)[:200]})")
    base = rates["a_paper_generate"]
    ref = top1["b_ours_no_prefix_cache"]
    print(f"{args.model} {args.quant}, {args.n} prompts ({args.prompt}), batch {args.batch_size}")
    for name, r in rates.items():
        agree = sum(x == y for x, y in zip(top1[name], ref)) / len(ref)
        print(f"  {name:24s} {r:8.2f} prompts/s  x{r / base:6.2f} vs (a)   top-1 agreement with (b) {agree:.2f}")
    return rates


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = BenchArgs()
    p.add_argument("--model", default=d.model)
    p.add_argument("--quant", default=d.quant)
    p.add_argument("--prompt", default=d.prompt)
    p.add_argument("--n", type=int, default=d.n)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--device", default=None)
    return p


if __name__ == "__main__":
    a = _parser().parse_args()
    main(BenchArgs(a.model, a.quant, a.prompt, a.n, a.batch_size, a.top_k, a.device))

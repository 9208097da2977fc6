"""Atomic writes: nothing half-written on disk, whatever stops the process.

Files go to a temp file in the same directory and are renamed over the target (`os.replace` is
atomic on one filesystem); directories are built in a temp directory next to the target and swapped in.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


CONFIG_NAME, WEIGHTS_NAME, CARD_NAME = "config.json", "model.safetensors", "README.md"  # a saved artifact's files


def write_artifact(out_dir: str | os.PathLike, tensors: dict, config: dict, card, what: str,
                   finish=None) -> Path:
    """Save a learned artifact (a head, a steering vector) as ``model.safetensors`` + ``README.md`` +
    ``config.json``: each file temp + rename, weights first and config.json last. config.json records the
    weights' sha256 (``weights_sha256``), so a kill between the files (an old config next to new weights) is
    detected at load. ``finish(config) -> config`` normalises it once the hash is in; ``card(config) -> str``
    writes the model card; ``what`` names the artifact in the one-line error for metadata that is not JSON."""
    import hashlib

    from safetensors.torch import save as save_safetensors

    from refine_llm.errors import UserError

    out = Path(out_dir)
    weights = save_safetensors({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, metadata={"format": "pt"})
    config = {**config, "weights_sha256": hashlib.sha256(weights).hexdigest()}
    config = finish(config) if finish is not None else config
    try:
        text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise UserError(f"{what} metadata is not JSON-serialisable ({e}): pass plain numbers, strings, lists, "
                        "dicts") from e
    atomic_write_bytes(out / WEIGHTS_NAME, weights)
    atomic_write_bytes(out / CARD_NAME, card(config).encode())
    atomic_write_bytes(out / CONFIG_NAME, (text + "\n").encode())
    return out


def jsonable(x):
    """Plain JSON types: numpy scalars/arrays to Python, NaN/inf to None, other objects to str."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def atomic_write_json(path: str | os.PathLike, obj, **dump_kw) -> None:
    dump_kw.setdefault("indent", 2)
    atomic_write_bytes(path, (json.dumps(obj, **dump_kw) + "\n").encode())


def check_writable(out: str | os.PathLike, flag: str = "--out") -> None:
    """Fail early, before any model loads, when ``out`` cannot be written (a one-line UserError)."""
    from refine_llm.errors import UserError

    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{flag} {out}: cannot write there ({e.strerror}); pass a writable directory") from None


@contextmanager
def atomic_dir(out_dir: str | os.PathLike, replace: bool = True) -> Iterator[Path]:
    """Yield a temp directory next to `out_dir`; when the block succeeds it becomes `out_dir`.

    replace=False keeps an `out_dir` that appeared meanwhile (another process won the race)."""
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            if not replace:
                return
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


# Test hook for the kill -9 tests (tests/test_resume.py): with REFINE_LLM_TEST_KILL_AT=<point>:<n>, the
# n-th call of kill_point("<point>") in this process SIGKILLs it, right after the durable write that
# precedes the call. Points: "scoring" (a score shard written), "head" (a head checkpoint written),
# "lora" (a LoRA checkpoint written). Unset (always, outside tests) it costs one dict lookup.
KILL_ENV = "REFINE_LLM_TEST_KILL_AT"
_kill_calls: dict[str, int] = {}


def kill_point(name: str) -> None:
    """SIGKILL this process at the n-th call for ``name`` when ``$REFINE_LLM_TEST_KILL_AT`` is ``name:n``."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    point, _, n = spec.partition(":")
    if point != name:
        return
    _kill_calls[name] = _kill_calls.get(name, 0) + 1
    if _kill_calls[name] == int(n or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)

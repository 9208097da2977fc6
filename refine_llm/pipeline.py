"""The main job's pipeline: questions -> scores -> head training -> metrics -> report, in a run directory.

`run(args)` takes the parsed arguments of scripts/debias_llm.py. Each stage writes its output into
`runs/<name>/` and is reused when the job is re-run with the same configuration.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from refine_llm.config import ModelConfig
from refine_llm.errors import UserError


def _config(cls, **kw):
    """Build a config dataclass; its ValueError (a bad flag value) becomes a one-line UserError."""
    try:
        return cls(**kw)
    except ValueError as e:
        raise UserError(f"{e}") from None


def check_writable(out: Path) -> None:
    """Fail early, before any model loads, when --out cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror}); pass a writable directory") from None


def run_dir_for(args) -> Path:
    if args.out:
        return Path(args.out)
    safe = args.model.replace("/", "_").replace(".gguf", "")
    return Path("runs") / f"{Path(safe).name}-{args.category}-{args.method}"


def run(args) -> int:
    from refine_llm import models

    mcfg = _config(ModelConfig, name=args.model, quant=args.quant, device=args.device,
                   trust_remote_code=args.trust_remote_code)
    out = run_dir_for(args)
    check_writable(out)
    t0 = time.time()
    model, tokenizer = models.load_model(mcfg.name, quant=mcfg.quant, device=mcfg.device,
                                         trust_remote_code=mcfg.trust_remote_code)
    info = models.summary(model)
    info["load_seconds"] = round(time.time() - t0, 1)
    print("model: " + ", ".join(f"{k}={v}" for k, v in info.items()), file=sys.stderr)
    return 0

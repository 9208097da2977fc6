"""Progress bars that a log file can hold.

On a terminal, `progress(...)` is the usual tqdm bar. When stderr is not a TTY (a job's log, a pipe,
CI), a tqdm bar rewrites itself with carriage returns many times a second, and a held-out run's
log became megabytes of '\r' frames. There it prints at most one line every `LOG_INTERVAL_S`
seconds (plus the final line), each ending in a newline, never a carriage return.

Every tqdm call site of the package goes through `progress`; `quiet_library_bars()` turns off the
bars of datasets and huggingface_hub when stderr is not a TTY (they are per-file/per-shard bars that
say nothing a log needs).
"""

from __future__ import annotations

import sys
from typing import Any, Iterable

LOG_INTERVAL_S = 10.0  # seconds between progress lines when stderr is not a terminal


def stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stream
        return False


class _LineWriter:
    """A file for tqdm that turns each '\\r'-redrawn frame into one line: strip '\\r' and the padding,
    drop empty writes, end every frame with '\\n'."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        text = s.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        getattr(self.stream, "flush", lambda: None)()


def progress(iterable: Iterable | None = None, **kw: Any):
    """`tqdm(iterable, **kw)` for interactive and logged runs alike (see the module docstring).

    `disable=None` means "on", not tqdm's "off when not a TTY": a log gets throttled lines instead of
    nothing. Pass `disable=True` to turn the bar off.
    """
    from tqdm.auto import tqdm

    if kw.get("disable") is None:
        kw["disable"] = False
    if not stderr_is_tty() and not kw["disable"]:
        kw["file"] = _LineWriter(kw.get("file") or sys.stderr)
        kw["mininterval"] = max(float(kw.get("mininterval", 0)), LOG_INTERVAL_S)
        kw["maxinterval"] = max(float(kw.get("maxinterval", 0)), LOG_INTERVAL_S)
        kw["miniters"] = None  # time-based only
        kw["dynamic_ncols"] = False
        kw.setdefault("ncols", 100)
        kw["ascii"] = True  # no block characters in a log
        # tqdm.auto picks the notebook widget in Jupyter; a log file wants plain text
        from tqdm import tqdm as tqdm_std

        class _LogBar(tqdm_std):
            """set_postfix / set_description redraw at once by default, one log line per training step;
            in a log they wait for the next timed line instead."""

            def set_postfix(self, ordered_dict=None, refresh=False, **kwargs):
                super().set_postfix(ordered_dict, refresh=refresh, **kwargs)

            def set_description(self, desc=None, refresh=False):
                super().set_description(desc, refresh=refresh)

        return _LogBar(iterable, **kw)
    return tqdm(iterable, **kw)


def quiet_library_bars() -> None:
    """When stderr is not a TTY, turn off the per-file bars of datasets and huggingface_hub."""
    if stderr_is_tty():
        return
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass

"""The one exception type for user mistakes (bad flag, bad file, missing model).

Library code raises ``UserError`` with a single line that names the file, line, flag or value and
says what to do. The CLI catches it, prints ``error: <message>`` to stderr and exits with code 2,
with no traceback. Anything else is a bug and keeps its traceback. `ArgumentParser` does the same for
flag mistakes caught by argparse (one line plus "see --help", exit 2).
"""

from __future__ import annotations

import argparse


class UserError(Exception):
    """A mistake the user can fix; the message is one line that says how."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``<prog>: error: <message> (see --help)`` on stderr, exit 2.

    The stock parser prints the whole usage block (20+ lines for the main job) before the error, which
    buries the one line that matters. ``--help`` still prints the full usage.
    """

    def error(self, message: str):  # type: ignore[override]
        message = " ".join(str(message).split())  # argparse messages can wrap; keep one line
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

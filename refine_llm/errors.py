"""The one exception type for user mistakes (bad flag, bad file, missing model).

Library code raises ``UserError`` with a single line that names the file, line, flag or value and
says what to do. The CLI catches it, prints ``error: <message>`` to stderr and exits with code 2,
with no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys


class UserError(Exception):
    """A mistake the user can fix; the message is one line that says how."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error style: a mistake prints ONE line plus "(see --help)" and exits 2,
    instead of argparse's usage block. Subparsers inherit the class, so subcommands behave the same."""

    def error(self, message: str):  # type: ignore[override]
        message = " ".join(str(message).split())  # argparse messages may wrap; keep one line
        print(f"error: {self.prog}: {message} (see --help)", file=sys.stderr)
        raise SystemExit(2)

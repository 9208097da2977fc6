"""The one exception type for user mistakes (bad flag, bad file, missing model).

Library code raises ``UserError`` with a single line that names the file, line, flag or value and
says what to do. The CLI catches it, prints ``error: <message>`` to stderr and exits with code 2,
with no traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; the message is one line that says how."""

    exit_code = 2

"""One kind of error for a user's bad input, and how the commands print it.

Code at a boundary (command-line values, config values, files, datasets, environments,
checkpoints) raises `UserError` with one sentence naming the input and what was expected.
`cli.py` and `python -m qt.datagen` print it as one line, `error: <sentence>`, and exit with
status 2; `QT_TRACEBACK=1` prints the traceback as well. `UserError` is a `ValueError`, and
`MissingInputError` also a `FileNotFoundError`, so callers of the library that catch those
keep working.
"""

from __future__ import annotations

import os
import sys
import traceback

TRACEBACK_ENV = "QT_TRACEBACK"
EXIT_USER_ERROR = 2


class UserError(ValueError):
    """A bad input: the message names it and says what was expected."""


class MissingInputError(UserError, FileNotFoundError):
    """A file or dataset that is not where the input says it is."""


def show_traceback() -> bool:
    """True when `QT_TRACEBACK` is set to anything but '' or '0'."""
    return os.environ.get(TRACEBACK_ENV, "0") not in ("", "0")


def one_line(err: BaseException) -> str:
    """The error's message on one line (a multi-line message is joined)."""
    text = " ".join(part.strip() for part in str(err).strip().splitlines() if part.strip())
    return text or type(err).__name__


def report(err: BaseException, file=None) -> int:
    """Print `err` as `error: <sentence>` (and its traceback under QT_TRACEBACK=1); return 2."""
    file = file or sys.stderr
    if show_traceback():
        traceback.print_exception(err, file=file)
    message = one_line(err)
    print(message if message.startswith("error: ") else f"error: {message}", file=file)
    return EXIT_USER_ERROR


__all__ = ["MissingInputError", "UserError", "one_line", "report", "show_traceback"]

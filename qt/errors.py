"""One kind of error for a user's bad input, and how the commands print it.

Code at a boundary (command-line values, config values, files, datasets, environments,
checkpoints) raises `UserError` with one sentence naming the input and what was expected.
`cli.py` and `python -m qt.datagen` print it as one line, `error: <sentence>`, and exit with
status 2; `QT_TRACEBACK=1` prints the traceback as well. `UserError` is a `ValueError`, and
`MissingInputError` also a `FileNotFoundError`, so callers of the library that catch those
keep working.
"""

from __future__ import annotations

import argparse
import errno
import os
import re
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


_KINDS = {"int": "a whole number", "float": "a number", "bool": "true or false",
          "str": "a string", "NoneType": "null"}  # fmt: skip


def _expected(text: str) -> str | None:
    """What jsonargparse's `Expected a ...` lines ask for, in words."""
    kinds = []
    for what in re.findall(r"Expected a (<class '[\w.]+'>|typing\.Literal\[[^\]]*\])", text):
        if what.startswith("typing.Literal"):
            kinds.append("one of " + what[len("typing.Literal[") : -1])
        else:
            name = what[len("<class '") : -2].rsplit(".", 1)[-1]
            kinds.append(_KINDS.get(name, name))
    kinds = list(dict.fromkeys(kinds))
    return " or ".join(kinds) if kinds else None


def parser_sentence(message: str) -> str:
    """A command-line parser's complaint as one sentence.

    jsonargparse reports a bad value over several lines (`Parser key "model.eta":` then
    `Expected a <class 'float'>. Got value: five`, or a union's alternatives one a line); that
    becomes `--model.eta five: expected a number.` Anything else is its first lines joined.
    """
    flat = " ".join(message.split())
    key = re.match(r'Parser key "([^"]+)":', flat)
    value = re.search(r"Got value: (\S+)", flat) or re.search(r"Given value: (\S+)", flat)
    expected = _expected(flat)
    if key and expected:
        shown = f" {value.group(1)}" if value else ""
        return f"--{key.group(1)}{shown}: expected {expected}."
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    # a union's alternatives and the whole given value add nothing a user can act on
    kept = [line for line in lines if not line.startswith(("Given value", "Subtypes:"))]
    return " ".join(kept[:3]) if kept else "bad arguments"


def parser_error(prog: str, message: str) -> None:
    """Print a parser's complaint as `error: <sentence>; `<prog> --help` lists the options.` on
    stderr, with no usage text above it, and exit with status 2."""
    prog = prog.replace(" [options]", "")
    sentence = parser_sentence(message).rstrip(". ")
    print(f"error: {sentence}; `{prog} --help` lists the options.", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with qt's one-line errors (`parser_error`) instead of usage and message."""

    def error(self, message: str):  # type: ignore[override]
        parser_error(self.prog, message)


# what a failing disk or store says, anywhere in an exception's chain -> the words for it
_STORE_FAILURES = (
    ("disk is full", "the disk is full"),
    ("no space left", "the disk is full"),
    ("file write failed", "a file could not be written (is the disk full?)"),
    ("readonly database", "the store is read-only"),
    ("read-only file system", "the file system is read-only"),
)
_OS_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission is denied",
    errno.EPERM: "permission is denied",
}


def _chain(err: BaseException):
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def storage_failure(err: BaseException) -> str | None:
    """One sentence when `err` (or an exception it came from) is a disk or store that cannot
    be written: full, read-only, not permitted; None otherwise."""
    for link in _chain(err):  # a sentence qt wrote (a checkpoint that could not be written)
        if isinstance(link, UserError):  # wins over what failed while stopping after it
            return one_line(link)
    for link in _chain(err):
        if isinstance(link, OSError) and link.errno in _OS_ERRNOS:
            where = f" ({link.filename})" if link.filename else ""
            return (
                f"Cannot write{where}: {_OS_ERRNOS[link.errno]}; free some space or choose "
                "another folder (trainer.logger.init_args.save_dir), then resume with "
                "--ckpt_path last."
            )
        text = str(link).lower()
        for needle, words in _STORE_FAILURES:
            if needle in text:
                return (
                    f"Cannot write the run's store or checkpoints: {words} "
                    f"({type(link).__name__}); free some space or choose another folder "
                    "(trainer.logger.init_args.save_dir), then resume with --ckpt_path last."
                )
    return None


__all__ = [
    "ArgumentParser",
    "MissingInputError",
    "UserError",
    "one_line",
    "parser_error",
    "parser_sentence",
    "report",
    "show_traceback",
    "storage_failure",
]

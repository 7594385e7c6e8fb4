"""The `qt` command (also `python -m qt`): one entry point for everything qt does.

    qt fit|validate|test|predict --config configs/tiny.yaml ...   train, evaluate (qt.cli)
    qt study run|report|merge ...                                  tasks x variants x seeds (qt.study)
    qt data TASK ...                                               generate a dataset (qt.datagen)
    qt diagnostics ...                                             inspect a fit (qt.diagnostics)
    qt demo ...                                                    QT against DT on maze2d-medium (qt.demo)

Each command is the module's own `main`, so `qt data --help` is `python -m qt.datagen --help`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module

from qt.cli import SUBCOMMANDS, run

# command -> (module, what it does); the module's `main(argv) -> int` runs it
COMMANDS = {
    "study": ("qt.study.__main__", "run, report or merge a study (tasks x variants x seeds)"),
    "data": ("qt.datagen.make", "generate a task's dataset by the D4RL protocol"),
    "diagnostics": ("qt.diagnostics", "where a fit's policy goes wrong, from its checkpoints"),
    "demo": ("qt.demo", "QT and the DT baseline on maze2d-medium, from data to scores"),
}


def usage() -> str:
    lines = ["usage: qt COMMAND [ARGS...]   (qt COMMAND --help for a command's options)", ""]
    lines.append(f"  {'|'.join(SUBCOMMANDS):<26}train or evaluate a model (LightningCLI)")
    lines += [f"  {name:<26}{what}" for name, (_, what) in COMMANDS.items()]
    return "\n".join(lines)


def command(name: str) -> Callable[[list[str]], int]:
    """The `main` of command `name`, imported only when it runs."""
    if name in SUBCOMMANDS:
        return lambda argv: run([name, *argv])
    return import_module(COMMANDS[name][0]).main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS and name not in COMMANDS:
        known = ", ".join([*SUBCOMMANDS, *COMMANDS])
        print(
            f"qt: unknown command {name!r}; expected one of {known}.\n\n{usage()}", file=sys.stderr
        )
        return 2
    return command(name)(rest) or 0


if __name__ == "__main__":
    sys.exit(main())

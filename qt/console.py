"""What qt prints and what it silences, in one place every part of qt may import.

- `say(trainer, message)`: a line on rank 0, above the progress bar when there is one (the
  evaluation lines, the fit's closing summary).
- `quiet()`: silences the tips and deprecation notices of the libraries under qt (Lightning's
  "💡 Tip" lines, MLflow's database set-up lines, deprecations qt cannot act on); qt's entry
  points (`qt fit ...`, `qt study ...`, the demo) call it. Warnings that concern the user's run
  are left alone.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager

import lightning as L


def say(trainer: L.Trainer | None, message: str) -> None:
    """Print a line on rank 0, above the progress bar when there is one."""
    if trainer is not None and trainer.global_rank != 0:
        return
    bar = getattr(trainer, "progress_bar_callback", None) if trainer is not None else None
    if bar is not None and getattr(bar, "is_enabled", False):
        bar.print(message)
    else:
        print(message, flush=True)


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet() -> None:
    """Silence library noise that a qt user cannot act on (see the module docstring)."""
    for name in ("lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.addFilter(_NoTips())
        for handler in logger.handlers:
            handler.addFilter(_NoTips())
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_NoTips())
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    # MLflow sets its loggers up when imported (INFO: "Creating initial MLflow database
    # tables..."); a user's own MLFLOW_LOGGING_LEVEL wins
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    # and a progress bar on stderr for every artifact it reads back (a study's study.json)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # MLflow logs a failing SQL statement with the whole exception chain, then raises it: the
    # commands say it in one sentence (qt.errors.storage_failure); QT_TRACEBACK=1 shows it
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    # qt serves no validation batches (evaluation is a callback): Lightning's note about it
    warnings.filterwarnings("ignore", message=r".*Total length of `\w+` across ranks is zero")
    warnings.filterwarnings("ignore", message=r".*does not have many workers")
    # iterations without an evaluation (eval_every_n_epochs > 1): the checkpoint waits for one
    warnings.filterwarnings("ignore", message=r".*could not find the monitored key")
    # `cli.py test` of a fit's checkpoint writes into a run folder of its own, so the restored
    # ModelCheckpoint state always names another folder; nothing is lost or overwritten
    warnings.filterwarnings("ignore", message=r".*dirpath has changed from")


# ---------------------------------------------------------------------------- fits' progress
STATUS_ENV = "QT_STATUS_FILE"  # where a fit writes its progress (qt.callbacks.console.Console)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def status_line(path: str | os.PathLike) -> str | None:
    """One line of a running fit's progress from its status file: iteration, step, rate, time
    left and its latest score, or what it is doing besides training (`phase`: evaluating,
    testing) instead of the rate; None while nothing has been written."""
    st = _read_status(path)
    if st is None:
        return None
    parts = []
    training = "iteration" in st
    if training:
        parts += [f"iteration {st['iteration']}/{st['iterations']}",
                  f"step {st['step']:,}/{st['steps']:,}"]  # fmt: skip
        if st.get("rate") and not st.get("phase"):
            parts.append(f"{st['rate']:.1f} steps/s")
            parts.append(f"{_duration((st['steps'] - st['step']) / st['rate'])} left")
    if st.get("phase"):
        parts.append(st["phase"])
    if training:
        if st.get("score") is not None:
            parts.append(f"score {st['score']:.1f} (best {st['best']:.1f})")
        else:
            parts.append("no evaluation yet")
    return ", ".join(parts) or None


def _read_status(path: str | os.PathLike) -> dict | None:
    """The status file's contents; None when it is missing or half-written."""
    import json

    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


@contextmanager
def noted_phase(phase: str, active: bool = True):
    """Within the block, `phase` (what a process is doing besides training: "evaluating 5
    episodes", "testing 50 episodes") stands in the status file `QT_STATUS_FILE` names, the rest
    of the file kept; nothing when no file is named or not `active` (ranks other than 0)."""
    path = os.environ.get(STATUS_ENV)
    if not path or not active:
        yield
        return

    def note(value: str | None) -> None:
        st = _read_status(path) or {}
        st["phase"] = value
        try:
            write_status(path, st)
        except OSError:  # progress is a courtesy: never stop a fit for it
            pass

    note(phase)
    try:
        yield
    finally:
        note(None)


def write_status(path: str | os.PathLike, status: dict) -> None:
    """Replace the status file at `path` in one rename (a reader never sees half of it)."""
    import json

    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(status, f)
    os.replace(tmp, path)


__all__ = ["STATUS_ENV", "noted_phase", "quiet", "say", "status_line", "write_status"]

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


__all__ = ["quiet", "say"]

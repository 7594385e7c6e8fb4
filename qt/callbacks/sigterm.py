"""Pre-emption: when the process gets SIGTERM (a scheduler taking the machine back), Lightning
stops after the current batch; `SaveOnSigterm` then writes `last.ckpt` where `ModelCheckpoint`
keeps it, so `qt fit --ckpt_path last` continues the run.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException


class SaveOnSigterm(L.Callback):
    """On SIGTERM, save `last.ckpt` beside ModelCheckpoint's files before the process exits."""

    def __init__(self, filename: str = "last.ckpt") -> None:
        self.filename = filename
        self.saved: Path | None = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        callback = trainer.checkpoint_callback
        dirpath = (
            getattr(callback, "dirpath", None) or Path(trainer.default_root_dir) / "checkpoints"
        )
        self.saved = Path(dirpath) / self.filename
        # the full state (optimisers, schedulers, callbacks), as ModelCheckpoint writes it
        trainer.save_checkpoint(self.saved, weights_only=False)
        rank_zero_info(f"SIGTERM: saved {self.saved}; resume with --ckpt_path last")


__all__ = ["SaveOnSigterm"]

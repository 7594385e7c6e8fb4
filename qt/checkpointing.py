"""Checkpoints that survive faults.

- `AtomicCheckpointIO`: a checkpoint is written to a temporary file beside its destination,
  flushed to disk and renamed over it, so a crash while writing leaves the previous file whole.
  Loading is `weights_only` (plain tensors and containers; no code is unpickled) and a file
  that cannot be read (truncated, not a checkpoint) stops with one sentence naming it.

`qt.callbacks.sigterm.SaveOnSigterm` writes `last.ckpt` through this IO when a fit is stopped by
SIGTERM.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from qt.errors import UserError

LAST = "last.ckpt"  # what `--ckpt_path last` resumes from (qt/configs/base.yaml)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file that cannot be read, or that does not fit the config."""


def checkpoint_dir(save_dir: str | os.PathLike, experiment_id: str, run_id: str) -> Path:
    """The checkpoints of a fit logged to MLflow: `<save_dir>/<experiment id>/<run id>/
    checkpoints`, where Lightning's ModelCheckpoint writes under qt's MLFlowLogger."""
    return Path(save_dir) / experiment_id / run_id / "checkpoints"


def best_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The best iteration's checkpoint in `folder`: the newest `best-*.ckpt` (ModelCheckpoint
    keeps one; should a resumed fit leave two, its later best is the newer file)."""
    found = list(Path(folder).glob("best-*.ckpt"))
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write-then-rename checkpoints; `weights_only` loading with a clear error."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:
            pass

    def load_checkpoint(
        self,
        path: str | os.PathLike,
        map_location: Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def load_checkpoint(
    path: str | os.PathLike, map_location: Any = "cpu", weights_only: bool | None = None
) -> dict[str, Any]:
    """torch.load with `weights_only=True` unless told otherwise, and a one-sentence error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist: expected a .ckpt file there.")
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only is not False)
    except (
        OSError,
        RuntimeError,
        EOFError,
        pickle.UnpicklingError,
        zipfile.BadZipFile,
        ValueError,
    ) as err:
        if isinstance(err, pickle.UnpicklingError):
            # torch's text here suggests weights_only=False, which would run the file's code
            why = "its contents are not plain tensors and containers, or are corrupt"
        else:
            text = str(err).strip()
            why = text.splitlines()[0][:160] if text else type(err).__name__
        raise CheckpointError(
            f"Checkpoint {path} cannot be read ({why}): it is truncated, corrupt or not "
            "a checkpoint; resume from an earlier one."
        ) from None


__all__ = [
    "LAST",
    "AtomicCheckpointIO",
    "CheckpointError",
    "best_checkpoint",
    "checkpoint_dir",
    "load_checkpoint",
]

"""Checkpoints that survive faults.

- `AtomicCheckpointIO`: a checkpoint is written to a temporary file beside its destination,
  flushed to disk and renamed over it, so a crash while writing leaves the previous file whole.
  Loading is `weights_only` (plain tensors and containers; no code is unpickled) and a file
  that cannot be read (truncated, not a checkpoint) stops with one sentence naming it.
- Checksums: every checkpoint written here carries a SHA-256 of each of its top-level entries
  (`state_dict`, `optimizer_states`, ...) under `qt_checksums`, computed from the values
  themselves (each tensor's dtype, shape and bytes), and every load recomputes them. torch's zip
  reader does not check its CRCs, so a few bytes changed inside a tensor would otherwise load
  without a word and train on; here they stop with one sentence naming the entry. A file
  without checksums (written before them, or by plain `torch.save`) loads as before.
- Finite weights: no checkpoint whose model or optimiser state holds a NaN or an infinity is
  written or read (a diverged fit stops instead of overwriting `last.ckpt` with it). The
  callbacks' states may hold infinities legitimately (a best score not yet set is -inf).

`qt.callbacks.sigterm.SaveOnSigterm` writes `last.ckpt` through this IO when a fit is stopped by
SIGTERM.
"""

from __future__ import annotations

import hashlib
import math
import os
import pickle
import re
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


CHECKSUMS_KEY = "qt_checksums"
# the entries whose tensors must be finite: the weights and the optimisers' moments
FINITE_ENTRIES = ("state_dict", "optimizer_states")


def _digest(value: Any, h: Any) -> None:
    """Feed a canonical encoding of `value` (a checkpoint entry) into the hash `h`.

    The encoding is of the values, not of the file, so the same entry hashes the same after a
    save and a `weights_only` load: tensors by dtype, shape and bytes, containers item by item,
    plain scalars by type and repr.
    """
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key, item in value.items():
            _digest(key, h)
            _digest(item, h)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for item in value:
            _digest(item, h)
    elif isinstance(value, (bytes, bytearray)):
        h.update(b"B%d:" % len(value) + bytes(value))
    else:
        text = repr(value).encode()
        h.update(f"S{type(value).__name__}{len(text)}:".encode() + text)


def checksums(checkpoint: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of each top-level entry of `checkpoint` (the checksums key itself left out)."""
    out = {}
    for key, value in checkpoint.items():
        if key == CHECKSUMS_KEY:
            continue
        h = hashlib.sha256()
        _digest(value, h)
        out[str(key)] = h.hexdigest()
    return out


def _first_non_finite(value: Any, where: str) -> str | None:
    """The path of the first floating tensor (or float) in `value` holding a NaN or infinity."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            if not bool(torch.isfinite(value.detach()).all()):
                return where
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else where
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for key, item in items:
        found = _first_non_finite(item, f"{where}.{key}" if where else str(key))
        if found is not None:
            return found
    return None


def non_finite(checkpoint: dict[str, Any]) -> str | None:
    """Where the checkpoint's weights or optimiser state first hold a NaN or infinity, or None."""
    for entry in FINITE_ENTRIES:
        if entry in checkpoint:
            found = _first_non_finite(checkpoint[entry], entry)
            if found is not None:
                return found
    return None


def verify(checkpoint: dict[str, Any], path: str | os.PathLike) -> dict[str, Any]:
    """Check a loaded checkpoint's checksums and finiteness; return it without the checksums."""
    expected = checkpoint.pop(CHECKSUMS_KEY, None) if isinstance(checkpoint, dict) else None
    if expected is not None:
        found = checksums(checkpoint)
        changed = [k for k in expected if found.get(k) != expected[k]]
        changed += [k for k in found if k not in expected]
        if changed:
            raise CheckpointError(
                f"Checkpoint {path} is corrupt: its {', '.join(changed)} "
                f"{'differs' if len(changed) == 1 else 'differ'} from the checksum written "
                "with it; resume from an earlier checkpoint."
            )
    if isinstance(checkpoint, dict):
        bad = non_finite(checkpoint)
        if bad is not None:
            raise CheckpointError(
                f"Checkpoint {path} holds a NaN or infinity in {bad}: expected finite weights "
                "(the fit that wrote it had diverged); resume from an earlier checkpoint."
            )
    return checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write-then-rename checkpoints with checksums; checked `weights_only` loading."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None
    ) -> None:
        path = Path(path)
        bad = non_finite(checkpoint)
        if bad is not None:  # the previous file stays; the fit stops with one sentence
            raise CheckpointError(
                f"Not writing checkpoint {path}: {bad} holds a NaN or infinity (the fit has "
                "diverged); the previous checkpoint is kept."
            )
        checkpoint = {**checkpoint, CHECKSUMS_KEY: checksums(checkpoint)}
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except (OSError, RuntimeError) as err:  # a full disk: torch's "enforce fail" or ENOSPC
            tmp.unlink(missing_ok=True)
            text = re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", str(err).strip())
            why = text.splitlines()[-1][:160] if text else type(err).__name__
            raise CheckpointError(
                f"Could not write checkpoint {path} ({why}): is the disk full or read-only? "
                "The previous checkpoint is kept; free some space, then resume with "
                "--ckpt_path last."
            ) from err
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
    """torch.load with `weights_only=True` unless told otherwise, checksums and finiteness
    verified (`verify`), and a one-sentence error for any file that fails."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist: expected a .ckpt file there.")
    try:
        loaded = torch.load(path, map_location=map_location, weights_only=weights_only is not False)
    except Exception as err:  # a text file ends in KeyError, others in anything pickle meets
        if not zipfile.is_zipfile(path):  # torch's own text here can be a bare `101`
            why = "it is not a zip archive as torch writes them"
        elif isinstance(err, pickle.UnpicklingError):
            # torch's text here suggests weights_only=False, which would run the file's code
            why = "its contents are not plain tensors and containers, or are corrupt"
        else:
            text = str(err).strip()
            why = text.splitlines()[0][:160] if text else type(err).__name__
        raise CheckpointError(
            f"Checkpoint {path} cannot be read ({why}): it is truncated, corrupt or not "
            "a checkpoint; resume from an earlier one."
        ) from None
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"Checkpoint {path} holds a {type(loaded).__name__}, not a checkpoint's dictionary: "
            "expected a .ckpt file written by `cli.py fit`."
        )
    return verify(loaded, path)


__all__ = [
    "LAST",
    "AtomicCheckpointIO",
    "CheckpointError",
    "best_checkpoint",
    "checkpoint_dir",
    "checksums",
    "load_checkpoint",
    "non_finite",
    "verify",
]

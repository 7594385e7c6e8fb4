"""Where datasets live: one data root that `python -m qt.datagen` writes and the readers
search first.

The root is `$QT_DATA_DIR`, else `./data` (relative to the working directory, like `runs/`).
Under it, D4RL-format hdf5 files are in `d4rl/` (D4RL's file names) and Minari datasets in
`minari/` (a Minari root: `minari/qt/<name>`). The readers then look in the places D4RL and
Minari use themselves (`$D4RL_DATASET_DIR` or `~/.d4rl/datasets`; `$MINARI_DATASETS_PATH` or
`~/.minari/datasets`), so downloaded datasets are found too; `data.path` overrides all of it.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "QT_DATA_DIR"


def data_root() -> Path:
    """`$QT_DATA_DIR`, else `./data`."""
    env = os.environ.get(DATA_DIR_ENV)
    return Path(env).expanduser() if env else Path("data")


def hdf5_dir() -> Path:
    """D4RL-format hdf5 files that qt generates: `<data root>/d4rl`."""
    return data_root() / "d4rl"


def minari_dir() -> Path:
    """The Minari root that qt generates into: `<data root>/minari`."""
    return data_root() / "minari"


__all__ = ["DATA_DIR_ENV", "data_root", "hdf5_dir", "minari_dir"]

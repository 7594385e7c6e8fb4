"""Generate, then fit with no path given: `python -m qt.datagen` writes where `cli.py fit`
looks (./data, or $QT_DATA_DIR), in a directory that has nothing else."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    for key in ("MLFLOW_TRACKING_URI", "D4RL_DATASET_DIR", "MINARI_DATASETS_PATH"):
        env.pop(key, None)
    if "QT_DATA_DIR" not in extra:
        env.pop("QT_DATA_DIR", None)
    return env


def test_generate_then_fit_with_no_path(tmp_path):
    # ./data here; $QT_DATA_DIR's part is checked without a fit (test_make, test_readers)
    env = _env()
    gen = [sys.executable, "-m", "qt.datagen", "maze2d-umaze-v1", "--steps", "3000",
           "--ref-episodes", "1", "--max-episode-steps", "60"]  # fmt: skip
    done = subprocess.run(gen, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    root = tmp_path / "data"
    assert (root / "d4rl" / "maze2d-umaze-sparse-v1.hdf5").is_file()
    fit = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--trainer.max_epochs", "1"]  # fmt: skip
    done = subprocess.run(fit, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert str(root.resolve() / "d4rl" / "maze2d-umaze-sparse-v1.hdf5") in done.stdout + done.stderr
    assert sorted(tmp_path.glob("runs/*/*/checkpoints/last.ckpt"))

"""A tiny `cli.py fit` end to end on generated data: the behaviour-cloning loss falls well
below its start, the critic's stays finite, and a fixed seed gives the same parameters twice."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import torch

from qt.checkpointing import load_checkpoint
from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5

ROOT = Path(__file__).resolve().parents[1]


def _fit(data: Path, cwd: Path, seed: int) -> tuple[dict, dict]:
    cwd.mkdir()
    cmd = [
        sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--data.path", str(data), "--seed_everything", str(seed), "--trainer.max_epochs", "3",
        "--model.max_iters", "3", "--data.num_steps_per_iter", "100", "--data.batch_size", "16",
        "--model.hidden_size", "32", "--model.learning_rate", "1e-3",
        "--trainer.callbacks+=tests.support.probe.MetricsProbe",
    ]  # fmt: skip
    env = dict(os.environ, QT_PROBE_DIR=str(cwd), PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    [last] = cwd.glob("runs/*/*/checkpoints/last.ckpt")
    return load_checkpoint(last)["state_dict"], torch.load(cwd / "metrics.pt", weights_only=True)


def test_tiny_fit_learns_and_is_reproducible(tmp_path):
    ds = generate("maze2d-umaze-v1", steps=3000, seed=0, ref_episodes=1, max_episode_steps=60)
    data = write_d4rl_hdf5(ds, tmp_path / "maze2d-umaze-sparse-v1.hdf5")
    first, metrics = _fit(data, tmp_path / "a", seed=7)
    steps = metrics["steps"]
    assert len(steps) == 300 and int(first["train_steps"]) == 300
    bc = [s["train/bc_loss"] for s in steps]
    start, end = sum(bc[:5]) / 5, sum(bc[-20:]) / 20
    assert end < 0.5 * start, (start, end)
    assert all(math.isfinite(s["train/critic_loss"]) for s in steps)
    assert all(math.isfinite(s["train/target_q_mean"]) for s in steps)

    second, _ = _fit(data, tmp_path / "b", seed=7)
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key

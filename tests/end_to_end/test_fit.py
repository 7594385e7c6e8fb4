"""A tiny `cli.py fit` end to end on generated data: the behaviour-cloning loss falls well
below its start, the critic's stays finite, and a fixed seed gives the same parameters twice."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import h5py
import mlflow
import pytest
import torch

from qt.checkpointing import load_checkpoint
from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5

ROOT = Path(__file__).resolve().parents[2]


def _cli_fit(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`cli.py fit --config configs/tiny.yaml ARGS` in folder `cwd`, one thread; it must pass."""
    cmd = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / "configs" / "tiny.yaml"), *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _fit(data: Path, cwd: Path, seed: int) -> tuple[dict, dict]:
    cwd.mkdir()
    _cli_fit(
        cwd, "--data.path", str(data), "--seed_everything", str(seed), "--trainer.max_epochs", "3",
        "--model.max_iters", "3", "--data.num_steps_per_iter", "100", "--data.batch_size", "16",
        "--model.hidden_size", "32", "--model.learning_rate", "1e-3",
        "--trainer.callbacks+=tests.support.probe.MetricsProbe", QT_PROBE_DIR=str(cwd),
    )  # fmt: skip
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


def test_evaluating_every_second_iteration_keeps_the_best_of_the_evaluated_ones(tmp_path):
    """The project's callbacks (early stopping, the best checkpoint) wait for an evaluation
    instead of failing on the iterations without one."""
    ds = generate("maze2d-umaze-dense-v1", steps=2000, seed=0, ref_episodes=1, max_episode_steps=60)
    data = write_d4rl_hdf5(ds, tmp_path / "maze2d-umaze-dense-v1.hdf5")
    _cli_fit(
        tmp_path, "--data.task", "maze2d-umaze-dense-v1", "--data.path", str(data),
        "--trainer.max_epochs", "5", "--model.max_iters", "5",
        "--evaluation.eval_every_n_epochs", "2", "--evaluation.max_ep_len", "20",
    )  # fmt: skip

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("qt").experiment_id])
    history = client.get_metric_history(run.info.run_id, "eval/normalized_score")
    scores = {m.step: m.value for m in history}
    # iterations 2 and 4 (epochs 1 and 3) are evaluated, 1, 3 and 5 are not
    epochs = sorted(round(m.value) for m in client.get_metric_history(run.info.run_id, "epoch")
                    if m.step in scores)  # fmt: skip
    assert len(scores) == 2 and set(epochs) <= {1, 3}, (scores, epochs)
    [best] = (tmp_path / "runs").glob("*/*/checkpoints/best-epoch=*.ckpt")
    best_epoch = int(best.stem.split("=")[1])
    step_of_best = max(scores, key=scores.get)
    assert best_epoch in (1, 3)
    # metrics are logged at the iteration's last step index, the checkpoint counts steps done
    assert int(load_checkpoint(best)["state_dict"]["train_steps"]) == step_of_best + 1


def test_a_fit_stopped_by_max_time_evaluates_where_it_stopped(tmp_path):
    """`trainer.max_time` ends a fit mid-iteration (the GPU study's budget); that iteration is
    evaluated and checkpointed at the steps it trained, and the study report reads it there."""
    from qt.study.store import eval_history

    ds = generate("maze2d-umaze-dense-v1", steps=2000, seed=0, ref_episodes=1, max_episode_steps=60)
    data = write_d4rl_hdf5(ds, tmp_path / "maze2d-umaze-dense-v1.hdf5")
    # an iteration of 10^6 steps cannot end within 3 seconds: the stop falls inside the first
    _cli_fit(
        tmp_path, "--data.task", "maze2d-umaze-dense-v1", "--data.path", str(data),
        "--data.num_steps_per_iter", "1000000", "--trainer.max_time", "00:00:00:03",
        "--evaluation.max_ep_len", "20",
    )  # fmt: skip
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("qt").experiment_id])
    [best] = (tmp_path / "runs").glob("*/*/checkpoints/best-epoch=0.ckpt")
    trained = int(load_checkpoint(best)["state_dict"]["train_steps"])
    assert 0 < trained < 1_000_000
    steps, scores = eval_history(client, run, "maze2d-umaze-dense-v1")
    assert steps.tolist() == [trained] and len(scores) == 1
    # the fit scored its evaluation on D4RL's reference returns, as the report does, although
    # the file carries the (one-episode) reference returns it measured
    with h5py.File(data) as f:
        assert f.attrs["ref_min_score"] != 68.537689
    ret = run.data.metrics["eval/return_mean"]
    by_hand = 100 * (ret - 68.537689) / (193.66285642381482 - 68.537689)  # d4rl/infos.py
    # (Lightning logs metrics in float32: equal to its precision)
    assert run.data.metrics["eval/normalized_score"] == pytest.approx(by_hand, rel=1e-6)
    assert scores[0] == pytest.approx(by_hand, rel=1e-12)

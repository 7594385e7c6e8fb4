"""A user's bad input through `cli.py`: one line naming the input and what was expected, exit
status 2, no traceback unless QT_TRACEBACK=1; checks that can run before training do."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5
from qt.tasks import get_task

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env.pop("MLFLOW_TRACKING_URI", None)
    if "QT_TRACEBACK" not in extra:
        env.pop("QT_TRACEBACK", None)
    return env


def _cli(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "cli.py"), *args]
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True,
                          timeout=600)  # fmt: skip


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr[-3000:]
    return errors[0]


def _random_hdf5(path: Path, task: str, n: int = 400) -> Path:
    """A dataset with the task's state and action sizes (random numbers, episodes of 100)."""
    t = get_task(task)
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(n, t.state_dim)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, size=(n, t.act_dim)).astype(np.float32)
        f["rewards"] = rng.random(n).astype(np.float32)
        f["terminals"] = np.zeros(n, bool)
        f["timeouts"] = (np.arange(n) % 100) == 99
    return path


@pytest.fixture(scope="module")
def maze(tmp_path_factory):
    """A maze2d dataset and the last.ckpt of a one-iteration tiny fit on it."""
    where = tmp_path_factory.mktemp("maze")
    ds = generate("maze2d-umaze-v1", steps=3000, seed=0, ref_episodes=1, max_episode_steps=60)
    data = write_d4rl_hdf5(ds, where / "maze2d-umaze-sparse-v1.hdf5")
    done = _cli(where, "fit", "--config", str(TINY), "--data.path", str(data),
                "--trainer.max_epochs", "1")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    [last] = where.glob("runs/*/*/checkpoints/last.ckpt")
    return data, last


def test_a_corrupt_checkpoint_is_one_sentence_naming_it(tmp_path, maze):
    data, last = maze
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(last.read_bytes()[:5000])  # a truncated copy of a real one
    line = _one_error_line(_cli(tmp_path, "fit", "--config", str(TINY), "--data.path",
                                str(data), "--ckpt_path", str(bad)))  # fmt: skip
    assert line.startswith(f"error: Checkpoint {bad} cannot be read")
    assert "weights_only=False" not in line and "weights_only` set to `False" not in line


def test_a_checkpoint_of_another_task_is_one_sentence_naming_it(tmp_path, maze):
    _, last = maze  # maze2d: states of size 4, actions of size 2
    hopper = _random_hdf5(tmp_path / "hopper_medium-v2.hdf5", "hopper-medium-v2")
    done = _cli(tmp_path, "test", "--config", str(TINY), "--data.task", "hopper-medium-v2",
                "--data.path", str(hopper), "--ckpt_path", str(last))  # fmt: skip
    line = _one_error_line(done)
    assert line == (
        f"error: Checkpoint {last} is of a model with states of size 4 and actions of size "
        "2, but task 'hopper-medium-v2' (data.task) has 11 and 3: expected a checkpoint of "
        "this task."
    )
    assert "size mismatch" not in done.stderr


def test_bad_values_are_one_line_and_qt_traceback_shows_where(tmp_path, maze):
    data, _ = maze
    args = ("fit", "--config", str(TINY), "--data.path", str(data), "--data.K", "0")
    line = _one_error_line(_cli(tmp_path, *args))
    assert line == "error: data.K=0: expected a whole number >= 1."
    done = _cli(tmp_path, *args, QT_TRACEBACK="1")
    assert done.returncode == 2 and "Traceback" in done.stderr
    assert "qt/data/datamodule.py" in done.stderr
    assert done.stderr.strip().splitlines()[-1] == line
    assert not list(tmp_path.glob("runs/*/*/checkpoints/*.ckpt"))


def _mujoco_version() -> tuple[int, ...]:
    import mujoco

    return tuple(int(p) for p in mujoco.__version__.split(".")[:2])


@pytest.mark.skipif(_mujoco_version() < (3, 12), reason="FrankaKitchen-v1 builds under mujoco<3.12")
def test_a_kitchen_fit_stops_before_its_first_step_under_mujoco_3_12(tmp_path):
    task = get_task("kitchen-partial-v0")
    data = _random_hdf5(tmp_path / task.dataset_file, task.name)
    done = _cli(tmp_path, "fit", "--config", str(TINY), "--data.task", task.name,
                "--data.path", str(data), "--trainer.callbacks+=tests.support.probe.StepProbe",
                QT_PROBE_DIR=str(tmp_path))  # fmt: skip
    line = _one_error_line(done)
    assert "FrankaKitchen-v1 cannot be built with mujoco" in line and "mujoco<3.12" in line
    assert not (tmp_path / "stepped").exists()  # not one training step
    assert not list(tmp_path.glob("runs/*/*/checkpoints/*.ckpt"))

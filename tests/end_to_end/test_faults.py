"""Runs that survive faults: atomic checkpoints, clear errors for broken ones, weights_only
loading, SIGTERM saving a checkpoint, and a SIGKILLed fit resumed to the same parameters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from qt.checkpointing import AtomicCheckpointIO, CheckpointError, load_checkpoint
from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


# ---------------------------------------------------------------------------- checkpoint files
def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def dies_half_way(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process is stopped mid-write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    monkeypatch.undo()
    assert int(io.load_checkpoint(path)["step"]) == 1  # the old one, whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_a_truncated_checkpoint_gives_one_sentence_and_the_previous_still_loads(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.arange(10_000.0)}, tmp_path / "epoch1.ckpt")
    io.save_checkpoint({"w": torch.arange(10_000.0) * 2}, tmp_path / "epoch2.ckpt")
    data = (tmp_path / "epoch2.ckpt").read_bytes()
    (tmp_path / "epoch2.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"epoch2\.ckpt cannot be read .*truncated"):
        load_checkpoint(tmp_path / "epoch2.ckpt")
    assert torch.equal(load_checkpoint(tmp_path / "epoch1.ckpt")["w"], torch.arange(10_000.0))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere.ckpt")


class _Payload:
    def __reduce__(self):  # would run code when unpickled
        return (os.system, ("echo pwned",))


def test_loading_is_weights_only(tmp_path):
    torch.save({"w": torch.zeros(2), "x": _Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(CheckpointError, match="evil.ckpt cannot be read"):
        load_checkpoint(tmp_path / "evil.ckpt")


# ---------------------------------------------------------------------------- real fits
@pytest.fixture(scope="module")
def maze_file(tmp_path_factory):
    ds = generate("maze2d-umaze-v1", steps=3000, seed=0, ref_episodes=1, max_episode_steps=60)
    return write_d4rl_hdf5(ds, tmp_path_factory.mktemp("d4rl") / "maze2d-umaze-sparse-v1.hdf5")


def _fit_cmd(maze_file, *extra: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(TINY),
        "--data.path", str(maze_file), "--trainer.max_epochs", "3", "--model.max_iters", "3",
        "--model.dropout", "0.1", *extra,
    ]  # fmt: skip


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _last(cwd: Path) -> Path | None:
    found = sorted(cwd.glob("runs/*/*/checkpoints/last.ckpt"))
    return found[0] if found else None


def _wait_for(predicate, timeout: float = 120.0) -> None:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise TimeoutError("the fit did not get there in time")
        time.sleep(0.2)


def _logged(cwd: Path, key: str) -> int:
    """How many values of metric `key` the fit in `cwd` has sent to its MLflow store so far."""
    import sqlite3

    db = cwd / "runs" / "mlflow.db"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("select count(*) from metrics where key = ?", (key,)).fetchone()[0]
    except sqlite3.OperationalError:  # the store is being created or migrated
        return 0


def _weights(path: Path) -> dict[str, torch.Tensor]:
    ckpt = load_checkpoint(path)
    assert ckpt["state_dict"], "empty state dict"
    return ckpt["state_dict"]


def test_a_killed_fit_resumes_to_the_parameters_of_an_uninterrupted_one(tmp_path, maze_file):
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    whole.mkdir(), broken.mkdir()
    subprocess.run(_fit_cmd(maze_file), cwd=whole, env=_env(), check=True, capture_output=True)

    proc = subprocess.Popen(_fit_cmd(maze_file), cwd=broken, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        # kill -9 once the first iteration's checkpoint exists and its evaluation reached
        # MLflow (Lightning sends an iteration's metrics a moment after ModelCheckpoint writes),
        # mid-way through the second
        _wait_for(
            lambda: (
                (_last(broken) is not None and _logged(broken, "eval/return_mean") >= 1)
                or proc.poll() is not None
            )
        )
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the fit ended before it could be killed"
    epoch = load_checkpoint(_last(broken))["epoch"]
    assert epoch < 2  # it was stopped before the end
    subprocess.run(_fit_cmd(maze_file, "--ckpt_path", "last"), cwd=broken, env=_env(),
                   check=True, capture_output=True)  # fmt: skip

    a, b = _weights(_last(whole)), _weights(_last(broken))
    assert int(a["train_steps"]) == int(b["train_steps"]) == 30, (
        int(a["train_steps"]),
        int(b["train_steps"]),
        epoch,
    )
    assert a.keys() == b.keys() and any(k.startswith("ema_actor.") for k in a)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    assert int(b["train_steps"]) == 30  # 3 iterations of 10 steps, none repeated
    # the resumed fit logged into the same MLflow run, which ran all three iterations
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{broken / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("qt").experiment_id])
    assert len(runs) == 1
    steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "eval/return_mean")]
    assert len(steps) == 3
    # logged at steps trained - 1 across the resume, where the study report places them
    from qt.study.store import eval_history

    assert sorted(steps) == [9, 19, 29]
    assert eval_history(client, runs[0], "maze2d-umaze-v1")[0].tolist() == [10, 20, 30]


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, maze_file):
    cmd = _fit_cmd(maze_file, "--trainer.max_epochs", "200", "--model.max_iters", "200")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for(lambda: _last(tmp_path) is not None or proc.poll() is not None)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert "Stopped by SIGTERM; resume with --ckpt_path last." in err
    ckpt = load_checkpoint(_last(tmp_path))
    steps = int(ckpt["state_dict"]["train_steps"])
    assert steps >= 10 and ckpt["global_step"] >= 2 * 10  # two optimiser steps per batch
    # resume from it: the stream and the counters go on from there
    done = subprocess.run(
        _fit_cmd(maze_file, "--trainer.max_epochs", str(ckpt["epoch"] + 2), "--model.max_iters",
                 "200", "--ckpt_path", "last"),
        cwd=tmp_path, env=_env(), capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    after = int(load_checkpoint(_last(tmp_path))["state_dict"]["train_steps"])
    assert after > steps and after % 10 == 0
    assert np.isfinite(after)


def test_a_fit_stopped_in_its_first_iteration_keeps_writing_last_ckpt_after_the_resume(
    tmp_path, maze_file
):
    """SIGTERM before the first iteration ends: `last.ckpt` is SaveOnSigterm's, written before
    the iteration checkpoint ever wrote. After the resume the iteration checkpoint must go on
    writing `last.ckpt` (what the next resume reads), not a `last-v1.ckpt` beside a stale one."""
    long_first = ("--data.num_steps_per_iter", "600", "--trainer.max_epochs", "2")
    proc = subprocess.Popen(_fit_cmd(maze_file, *long_first), cwd=tmp_path, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:  # stop it once it trains, long before step 600
        _wait_for(lambda: _logged(tmp_path, "train/critic_loss") >= 1 or proc.poll() is not None)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    stopped = load_checkpoint(_last(tmp_path))
    assert stopped["epoch"] == 0 and int(stopped["state_dict"]["train_steps"]) < 600

    done = subprocess.run(_fit_cmd(maze_file, *long_first, "--ckpt_path", "last"), cwd=tmp_path,
                          env=_env(), capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    folder = _last(tmp_path).parent
    assert sorted(p.name for p in folder.glob("last*.ckpt")) == ["last.ckpt"]
    final = load_checkpoint(_last(tmp_path))
    assert (final["epoch"], int(final["state_dict"]["train_steps"])) == (1, 1200)

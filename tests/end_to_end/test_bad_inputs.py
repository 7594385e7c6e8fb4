"""Every bad input and every failing disk through the command line is one sentence and exit
status 2: no usage wall, no traceback, no run left behind where none should be."""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
import warnings
from pathlib import Path

import mlflow
import pytest
import torch

from qt import cli
from qt.checkpointing import load_checkpoint
from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    ds = generate("maze2d-umaze-v1", steps=1500, seed=0, ref_episodes=1, max_episode_steps=60)
    return write_d4rl_hdf5(ds, tmp_path_factory.mktemp("bad") / "maze2d-umaze-sparse-v1.hdf5")


def _run(cwd: Path, *args: str) -> int:
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.chdir(cwd)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        try:
            return cli.run(list(args))
        except SystemExit as stop:  # the parser's own exit
            return stop.code


def _fit(data: Path, *extra: str) -> tuple[str, ...]:
    return ("fit", "--config", TINY, "--data.path", str(data), *extra)


def _one_sentence(capsys) -> str:
    """The only line on stderr that is not Lightning's INFO, which must be `error: ...`."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("INFO")]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("error: ") and "Traceback" not in err, err[-3000:]
    return lines[0]


def _runs(cwd: Path) -> list:
    db = cwd / "runs" / "mlflow.db"
    if not db.exists():
        return []
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--model.eta", "five"), "error: --model.eta five: expected a number; "),
        (("--model.nope", "3"), "error: unrecognized arguments: --model.nope 3; "),
    ],
)
def test_a_bad_value_or_key_is_one_line_with_a_hint_to_help(tmp_path, data, capsys, args,
                                                            expected):  # fmt: skip
    assert _run(tmp_path, *_fit(data, *args)) == 2
    line = _one_sentence(capsys)
    assert line.startswith(expected) and line.endswith(" fit --help` lists the options.")


@pytest.mark.parametrize("sub", ["fit", "test"])
def test_a_text_file_as_a_checkpoint_is_one_sentence(tmp_path, data, capsys, sub):
    text = tmp_path / "notes.ckpt"
    text.write_text("my notes, not a checkpoint\n" * 20)
    args = (sub, "--config", TINY, "--data.path", str(data), "--ckpt_path", str(text))
    assert _run(tmp_path, *args) == 2
    assert _one_sentence(capsys) == (
        f"error: Checkpoint {text} cannot be read (it is not a zip archive as torch writes "
        "them): it is "
        "truncated, corrupt or not a checkpoint; resume from an earlier one."
    )
    assert _runs(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--data.K", "100"), "error: data.K=100: the longest trajectory of "),
        (("--model.eta", "-1"), "error: model.eta=-1.0: expected a number >= 0 "),
    ],
)
def test_settings_that_cannot_make_sense_are_refused_before_a_run(tmp_path, data, capsys, args,
                                                                  expected):  # fmt: skip
    assert _run(tmp_path, *_fit(data, *args)) == 2
    assert _one_sentence(capsys).startswith(expected)
    assert _runs(tmp_path) == []


def test_the_longest_trajectory_is_what_k_is_checked_against(tmp_path, data, capsys):
    import h5py

    with h5py.File(data, "r") as f:  # the longest episode, counted from the file's raw flags
        flags = f["timeouts"][()] | f["terminals"][()]
    ends = [i + 1 for i, t in enumerate(flags) if t]
    longest = max(b - a for a, b in zip([0, *ends[:-1]], ends))
    assert _run(tmp_path, *_fit(data, "--data.K", str(longest + 1))) == 2
    assert f"has {longest} steps: expected K <= {longest}" in _one_sentence(capsys)


def test_a_read_only_store_is_one_sentence(tmp_path, data, capsys, monkeypatch):
    runs = str(tmp_path / "runs")
    real_open, real_mkdir = os.open, os.mkdir

    def read_only(fn):  # what a read-only file system answers to a new file or folder
        def call(path, *args, **kwargs):
            if str(path).startswith(runs):
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return fn(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "open", read_only(real_open))
    monkeypatch.setattr(os, "mkdir", read_only(real_mkdir))
    assert _run(tmp_path, *_fit(data)) == 2
    assert _one_sentence(capsys) == (
        "error: runs/ (trainer.logger.init_args.save_dir) cannot be written (Read-only file "
        "system): expected a folder this user can write runs to; choose another with "
        "--trainer.logger.init_args.save_dir."
    )


def test_a_full_disk_before_the_fit_is_one_sentence(tmp_path, data, capsys, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=3 * 2**20))
    assert _run(tmp_path, *_fit(data)) == 2
    assert _one_sentence(capsys) == (
        "error: runs/ (trainer.logger.init_args.save_dir) has 3.0 MB free: expected at least "
        "64 MB for the run's store and checkpoints; free some space or choose another folder."
    )
    assert _runs(tmp_path) == []


def test_a_disk_that_fills_during_the_fit_is_one_sentence_and_the_last_checkpoint_stays(
    tmp_path, data, capsys, monkeypatch
):
    real_save, calls = torch.save, []

    def fills_up(obj, f, *args, **kwargs):  # the first iteration's two checkpoints fit
        calls.append(1)
        if len(calls) > 2:
            f.write(b"PK\x03\x04")
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed "
                "writing file data/3: file write failed"
            )
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", fills_up)
    assert _run(tmp_path, *_fit(data, "--trainer.max_epochs", "2")) == 2
    line = _one_sentence(capsys)
    assert line.startswith("error: Could not write checkpoint ") and line.endswith(
        "(PytorchStreamWriter failed writing file data/3: file write failed): is the disk full "
        "or read-only? The previous checkpoint is kept; free some space, then resume with "
        "--ckpt_path last."
    )
    [last] = tmp_path.glob("runs/*/*/checkpoints/last.ckpt")
    assert load_checkpoint(last)["epoch"] == 0  # the first iteration's, whole
    assert not list(last.parent.glob(".*.tmp"))


def test_a_store_that_fills_during_the_fit_is_one_sentence(tmp_path, data, capsys, monkeypatch):
    def full(self, *args, **kwargs):
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as err:
            raise mlflow.exceptions.MlflowException(f"(sqlite3.OperationalError) {err}") from err

    monkeypatch.setattr(mlflow.MlflowClient, "log_batch", full)
    assert _run(tmp_path, *_fit(data)) == 2
    assert _one_sentence(capsys) == (
        "error: Cannot write the run's store or checkpoints: the disk is full "
        "(MlflowException); free some space or choose another folder "
        "(trainer.logger.init_args.save_dir), then resume with --ckpt_path last."
    )

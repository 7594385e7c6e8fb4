"""Resuming never turns a finished run FAILED or makes empty runs: a finished run resumed says
so and exits 0 leaving it FINISHED, a fit of no iterations is refused before a run exists, and
a resume stays in its own experiment."""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
import pytest

from qt import cli
from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")


def _run(cwd: Path, *args: str) -> int:
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.chdir(cwd)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        return cli.run(list(args))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A tiny fit that ran its 2 iterations to the end: folder, data, fit arguments, run."""
    root = tmp_path_factory.mktemp("finished")
    ds = generate("maze2d-umaze-v1", steps=1500, seed=0, ref_episodes=1, max_episode_steps=60)
    data = write_d4rl_hdf5(ds, root / "maze2d-umaze-sparse-v1.hdf5")
    fit = ("fit", "--config", TINY, "--data.path", str(data))
    assert _run(root, *fit, "--trainer.max_epochs", "2") == 0
    return root, fit


def _client(root: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")


def _runs(root: Path, experiment: str = "qt") -> list:
    client = _client(root)
    exp = client.get_experiment_by_name(experiment)
    return [] if exp is None else client.search_runs([exp.experiment_id])


def _last_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_a_finished_run_resumed_says_so_and_stays_finished(finished, capsys):
    root, fit = finished
    [run] = _runs(root)
    evals = len(_client(root).get_metric_history(run.info.run_id, "eval/return_mean"))
    last = root / "runs" / run.info.experiment_id / run.info.run_id / "checkpoints" / "last.ckpt"
    before = last.stat().st_mtime_ns
    capsys.readouterr()
    # as many iterations as it ran, and fewer (Lightning's MisconfigurationException before)
    for epochs in ("2", "1"):
        assert _run(root, *fit, "--trainer.max_epochs", epochs, "--ckpt_path", "last") == 0
        assert _last_line(capsys) == (
            f"Nothing to train: {last.relative_to(root)} has trained 2 iterations (40 optimizer steps) and "
            f"trainer.max_epochs is {epochs}; the run is left as it is. To train on, raise "
            "--trainer.max_epochs."
        )
    # the same through the checkpoint file: no new (empty) run
    assert _run(root, *fit, "--trainer.max_epochs", "2", "--ckpt_path", str(last)) == 0
    assert "Nothing to train" in _last_line(capsys)
    [after] = _runs(root)
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    assert len(_client(root).get_metric_history(run.info.run_id, "eval/return_mean")) == evals
    assert last.stat().st_mtime_ns == before  # not rewritten


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--trainer.max_epochs", "0", "--trainer.max_epochs 0: expected a number of iterations"),
        ("--trainer.max_steps", "-5", "--trainer.max_steps -5: expected a number of optimizer"),
        ("--trainer.max_steps", "0", "--trainer.max_steps 0: expected a number of optimizer"),
    ],
)
def test_a_fit_of_nothing_is_refused_before_any_run_exists(tmp_path, finished, capsys, option,
                                                          value, expected):  # fmt: skip
    _, fit = finished
    assert _run(tmp_path, *fit, option, value) == 2
    line = _last_line(capsys)
    assert line.startswith(f"error: {expected}")
    assert not (tmp_path / "runs").exists()  # no store, no run


def test_a_resume_stays_in_its_own_experiment(finished, capsys):
    root, fit = finished
    [run] = _runs(root)
    other = ("--trainer.logger.init_args.experiment_name", "bob")
    assert _run(root, *fit, *other, "--trainer.max_epochs", "3",
                "--ckpt_path", f"run:{run.info.run_id}") == 2  # fmt: skip
    assert _last_line(capsys) == (
        f"error: --ckpt_path run:{run.info.run_id}: that run is in experiment 'qt', but this "
        "fit logs to experiment 'bob' (trainer.logger.init_args.experiment_name): expected a "
        "run of the same experiment (set experiment_name qt to resume it there)."
    )
    assert _runs(root, "bob") == [] and len(_runs(root)) == 1


def test_a_test_run_is_named_as_one_linked_to_its_fit_and_prints_one_table(finished, capsys):
    root, fit = finished
    [run] = _runs(root)
    [best] = (root / "runs" / run.info.experiment_id / run.info.run_id / "checkpoints").glob(
        "best-*.ckpt"
    )
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.MonkeyPatch.context() as mp:
            mp.chdir(root)
            mp.delenv("MLFLOW_TRACKING_URI", raising=False)
            assert cli.run(["test", *fit[1:], "--ckpt_path", str(best)]) == 0
    out = capsys.readouterr()
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    assert "dirpath has changed" not in out.err
    assert "Test metric" not in out.out and "DataLoader 0" not in out.out  # Lightning's table
    tests = [r for r in _runs(root) if r.info.run_id != run.info.run_id]
    [test] = tests
    assert test.info.run_name == "m2d-umaze/qt/s123/test"
    assert test.data.tags["qt.fit_run"] == run.info.run_id
    assert test.data.tags["mlflow.parentRunId"] == run.info.run_id

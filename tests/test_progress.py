"""Long work shows progress: a fit keeps its iteration, step, rate and latest score in a status
file when QT_STATUS_FILE names one, and the demo (and a study) print a line per running fit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import mlflow
import pytest

from qt import cli
from qt.callbacks.evaluation import Evaluation
from qt.console import STATUS_ENV, status_line, write_status
from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5

ROOT = Path(__file__).resolve().parents[1]


def test_a_status_line_says_iteration_step_rate_time_left_and_score(tmp_path):
    path = tmp_path / "fit.status.json"
    assert status_line(path) is None  # nothing written yet
    write_status(path, {"iteration": 1, "iterations": 2, "step": 640, "steps": 2000,
                        "rate": 10.0, "score": 45.06, "best": 50.0})  # fmt: skip
    # (2000 - 640) steps at 10 a second: 136 s
    assert status_line(path) == (
        "iteration 1/2, step 640/2,000, 10.0 steps/s, 2 min 16 s left, score 45.1 (best 50.0)"
    )
    write_status(path, {"iteration": 1, "iterations": 2, "step": 0, "steps": 2000,
                        "rate": None, "score": None, "best": None})  # fmt: skip
    assert status_line(path) == "iteration 1/2, step 0/2,000, no evaluation yet"
    # while it plays episodes, the line says so instead of a rate and a time left
    write_status(path, {"iteration": 2, "iterations": 2, "step": 2000, "steps": 2000,
                        "rate": 10.0, "score": 45.06, "best": 50.0,
                        "phase": "evaluating 5 episodes"})  # fmt: skip
    assert status_line(path) == (
        "iteration 2/2, step 2,000/2,000, evaluating 5 episodes, score 45.1 (best 50.0)"
    )
    write_status(path, {"phase": "testing 50 episodes"})  # `qt test`: no training fields
    assert status_line(path) == "testing 50 episodes"


def test_a_fit_keeps_its_progress_in_the_status_file(tmp_path, monkeypatch):
    ds = generate("maze2d-umaze-v1", steps=1500, seed=0, ref_episodes=1, max_episode_steps=60)
    data = write_d4rl_hdf5(ds, tmp_path / "maze2d-umaze-sparse-v1.hdf5")
    status = tmp_path / "fit.status.json"
    monkeypatch.setenv(STATUS_ENV, str(status))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    seen = []  # the status line at the start of each evaluation's episodes
    play = Evaluation.evaluate

    def watched(self, trainer, pl_module, seeds):
        seen.append((len(seeds), status_line(os.environ[STATUS_ENV])))
        return play(self, trainer, pl_module, seeds)

    monkeypatch.setattr(Evaluation, "evaluate", watched)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.run(["fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
                        "--data.path", str(data)]) == 0  # fmt: skip
    st = json.loads(status.read_text())
    # tiny.yaml: 2 iterations of 10 steps
    assert (st["iteration"], st["iterations"], st["step"], st["steps"]) == (2, 2, 20, 20)
    assert st["rate"] > 0
    assert st.get("phase") is None  # no evaluation runs now
    # each of the two evaluations showed itself, and no training rate, while it ran
    assert len(seen) == 2
    for n, line in seen:
        assert f"evaluating {n} episodes" in line and "steps/s" not in line, line
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("qt").experiment_id])
    assert st["score"] == pytest.approx(run.data.metrics["eval/normalized_score"])
    assert st["best"] == pytest.approx(run.data.metrics["eval/best_normalized_score"])
    # `qt test` of the checkpoint: its status file names the test while the episodes run
    [best] = (tmp_path / "runs").glob("*/*/checkpoints/best-*.ckpt")
    test_status = tmp_path / "test.status.json"
    monkeypatch.setenv(STATUS_ENV, str(test_status))
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.run(["test", "--config", str(ROOT / "configs" / "tiny.yaml"),
                        "--data.path", str(data), "--ckpt_path", str(best)]) == 0  # fmt: skip
    assert [line for _, line in seen] == [f"testing {seen[0][0]} episodes"]


def test_the_demo_shows_each_running_fit_while_it_runs(tmp_path, capsys):
    from qt import demo

    logs = {name: tmp_path / f"fit-{name}.log" for name in ("QT", "QT-no-Q")}
    body = ("import json, os, time; json.dump({'iteration': 1, 'iterations': 2, 'step': 500, "
            "'steps': 2000, 'rate': 5.0, 'score': 12.34, 'best': 12.34}, "
            "open(os.environ['QT_STATUS_FILE'], 'w')); time.sleep(2.5)")  # fmt: skip
    procs = {}
    for name, log in logs.items():  # stand-ins for the fits: each writes where _launch says
        env = dict(os.environ, **{STATUS_ENV: str(demo._status_file(log))})
        procs[name] = (subprocess.Popen([sys.executable, "-c", body], env=env), log)
    demo._wait(procs, every=1.0)
    out = capsys.readouterr().out
    for name in logs:
        assert (
            f"[demo] {name}: iteration 1/2, step 500/2,000, 5.0 steps/s, 5 min 00 s left, "
            "score 12.3 (best 12.3)"
        ) in out
    assert all(p.returncode == 0 for p, _ in procs.values())

"""The local MLflow store (qt/tracking.py): first use by many processes at once, run identity."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5
from qt.ui import experiment_urls

ROOT = Path(__file__).resolve().parents[1]

# A process that opens the store the way a fit does (qt's logger, its run, a metric, the end),
# after waiting for a common start signal so that all of them hit the fresh store together.
_OPEN_STORE = """
import sys, time
from pathlib import Path
from qt.tracking import MLFlowLogger
go = Path(sys.argv[1])
Path(f"{go}.ready-{sys.argv[2]}").touch()
while not go.exists():
    time.sleep(0.005)
logger = MLFlowLogger(save_dir="runs", run_name=f"proc-{sys.argv[2]}")
logger.log_metrics({"x": float(sys.argv[2])}, step=0)
logger.finalize("success")
print(logger.run_id)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _open_together(cwd: Path, n: int, first: int = 0) -> list[subprocess.CompletedProcess]:
    go = cwd / f"go-{first}"
    procs = [
        subprocess.Popen([sys.executable, "-c", _OPEN_STORE, str(go), str(first + i)], cwd=cwd,
                         env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(n)
    ]  # fmt: skip
    deadline = time.monotonic() + 300
    while len(list(cwd.glob(f"{go.name}.ready-*"))) < n and time.monotonic() < deadline:
        time.sleep(0.05)  # until all of them have imported and wait for the signal
    go.touch()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return out


def test_many_processes_open_a_fresh_store_at_once_and_later_ones_still_can(tmp_path):
    import mlflow

    done = _open_together(tmp_path, 4)
    assert [d.returncode for d in done] == [0] * 4, [d.stderr[-1500:] for d in done]
    later = _open_together(tmp_path, 1, first=4)
    assert [d.returncode for d in later] == [0], [d.stderr[-1500:] for d in later]

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [exp] = [e for e in client.search_experiments() if e.name == "qt"]
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # training view
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"proc-{i}" for i in range(5)]
    assert {r.info.run_id for r in runs} == {d.stdout.strip() for d in done + later}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert sorted(r.data.metrics["x"] for r in runs) == [float(i) for i in range(5)]
    # `make ui` prints the experiment's address in MLflow's model-training view
    assert experiment_urls(tmp_path / "runs" / "mlflow.db", "http://127.0.0.1:5000") == [
        f"qt: http://127.0.0.1:5000/#/experiments/{exp.experiment_id}?workflowType=machine_learning"
    ]


# ---------------------------------------------------------------------------- run identity
def test_variant_ids_tell_dt_from_qt_and_ignore_what_may_change_on_resume():
    import hashlib
    import json

    from qt.tracking import (
        VARIANT_OPTIONS,
        legacy_identities,
        run_identity,
        run_tags,
        variant_id,
        variant_label,
    )  # fmt: skip

    qt_model = {"eta": 1.0, "rtg_no_q": False, "infer_no_q": False, "K": 20, "hidden_size": 256}
    no_q = dict(qt_model, eta=0.0, rtg_no_q=True, infer_no_q=True)
    dt_model = dict(no_q, train_critic=False, next_state_loss=False)
    assert variant_label(qt_model) == "qt" and variant_label(no_q) == "qt-no-q"
    assert variant_label(dt_model) == "dt"
    # named by where Q is left out: eta 0 alone is not QT, nor the whole ablation
    assert variant_label(dict(qt_model, eta=0)) == "qt-no-q-loss"
    assert variant_label(dict(qt_model, eta=0, rtg_no_q=True)) == "qt-no-q-loss-rtg"
    assert variant_label(dict(qt_model, infer_no_q=True)) == "qt-no-q-acting"
    # and keeps finding its runs made under the name it had before (`qt`)
    mixed = dict(qt_model, eta=0, rtg_no_q=True)
    assert legacy_identities("t", 1, mixed) == [f"t/qt-{variant_id(mixed)[-8:]}/seed1"]

    # the hash of runs made before train_critic/next_state_loss existed is kept: the options
    # enter it only when they differ from the value those runs had
    def old_hash(model: dict) -> str:
        values = {k: model.get(k) for k in VARIANT_OPTIONS}
        values = {k: float(v) if type(v) in (int, float) else v for k, v in values.items()}
        return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]

    assert variant_id(qt_model) == f"qt-{old_hash(qt_model)}"
    assert variant_id(dict(qt_model, train_critic=True)) == variant_id(qt_model)
    assert variant_id(dt_model) != f"dt-{old_hash(dt_model)}"
    assert variant_id(dict(no_q, next_state_loss=False)) != variant_id(no_q)
    # the ablation's runs made when it was labelled `dt` are the same configuration
    assert legacy_identities("t", 3, no_q) == [f"t/dt-{old_hash(no_q)}/seed3"]
    assert run_identity("t", 3, no_q) == f"t/qt-no-q-{old_hash(no_q)}/seed3"
    assert legacy_identities("t", 3, qt_model) == legacy_identities("t", 3, dt_model) == []
    assert variant_id(qt_model) != variant_id(dict(qt_model, eta=2.0))
    assert variant_id(qt_model) != variant_id(dict(qt_model, max_q_backup=True))
    assert variant_id(qt_model) == variant_id(dict(qt_model, eta=1, learning_rate=1e-3))
    tags = run_tags("hopper-medium-v2", 7, dt_model, {"study": "s1", "seed": "own"})
    assert tags["task"] == "hopper-medium-v2" and tags["variant"] == "dt"
    assert run_tags("t", 7, no_q)["variant"] == "qt-no-q"
    assert tags["study"] == "s1" and tags["seed"] == "own"  # the user's tags win
    assert tags["qt.identity"] == f"hopper-medium-v2/{variant_id(dt_model)}/seed7"


@pytest.fixture(scope="module")
def maze_file(tmp_path_factory):
    ds = generate("maze2d-umaze-v1", steps=3000, seed=0, ref_episodes=1, max_episode_steps=60)
    return write_d4rl_hdf5(ds, tmp_path_factory.mktemp("d4rl") / "maze2d-umaze-sparse-v1.hdf5")


DT = ["--model.eta", "0", "--model.rtg_no_q", "true", "--model.infer_no_q", "true"]


def _fit(maze_file, cwd, *extra, wait=True):
    cmd = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--data.path", str(maze_file), *extra]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _snapshot(client, run_id):
    run = client.get_run(run_id)
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/return_mean")]
    files = sorted(a.path for a in client.list_artifacts(run_id))
    return run.info.status, run.info.end_time, run.data.params, run.data.tags, history, files


def test_last_resumes_the_run_of_the_same_variant_and_leaves_the_other_untouched(
    tmp_path, maze_file
):
    import mlflow

    # a DT fit and a QT fit of the same task and seed, side by side in one directory
    # (the DT fit is tagged from the command line, as a study does: its tags are kept)
    tags = ["--trainer.logger.init_args.tags", '{"study": "s1", "variant": "dt-baseline"}']
    dt = _fit(maze_file, tmp_path, *DT, *tags, wait=False)
    qt = _fit(maze_file, tmp_path, wait=False)
    for proc in (dt, qt):
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("qt")
    runs = {
        r.data.tags["qt.variant_id"].rsplit("-", 1)[0].replace("qt-no-q", "dt"): r
        for r in client.search_runs([exp.experiment_id])
    }
    assert sorted(runs) == ["dt", "qt"]
    assert runs["dt"].data.tags["study"] == "s1"
    assert (
        runs["dt"].data.tags["variant"] == "dt-baseline" and runs["qt"].data.tags["variant"] == "qt"
    )
    assert runs["dt"].info.run_name == "m2d-umaze/qt-no-q/s123"
    assert runs["qt"].info.run_name == "m2d-umaze/qt/s123"
    assert (
        runs["dt"].data.tags["task"] == "maze2d-umaze-v1" and runs["dt"].data.tags["seed"] == "123"
    )
    dt_id, qt_id = runs["dt"].info.run_id, runs["qt"].info.run_id
    dt_before = _snapshot(client, dt_id)
    assert dt_before[0] == "FINISHED" and len(dt_before[4]) == 2

    # QT, one more iteration, from "the last run": the QT run, never the newer-or-older DT one
    done = _fit(maze_file, tmp_path, "--trainer.max_epochs", "3", "--ckpt_path", "last")
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(client.search_runs([exp.experiment_id])) == 2  # no new run
    qt_after = _snapshot(client, qt_id)
    assert qt_after[0] == "FINISHED" and len(qt_after[4]) == 3  # one evaluation per iteration
    assert "config-resumed.yaml" in qt_after[5]
    assert _snapshot(client, dt_id) == dt_before  # status, params, tags, metrics, files

    # naming a run of another variant is refused before anything is touched
    done = _fit(maze_file, tmp_path, "--trainer.max_epochs", "3", "--ckpt_path", f"run:{dt_id}")
    assert done.returncode != 0
    assert f"--ckpt_path run:{dt_id}: that run is maze2d-umaze-v1/qt-no-q-" in done.stderr
    assert "expected a run of the same task, variant and seed" in done.stderr
    assert _snapshot(client, dt_id) == dt_before
    assert len(client.search_runs([exp.experiment_id])) == 2
    # and naming it with its own config resumes it, also when the run carries the identity of
    # the ablation's earlier name (`dt-<hash>`, before the published DT existed)
    legacy = runs["dt"].data.tags["qt.identity"].replace("/qt-no-q-", "/dt-")
    client.set_tag(dt_id, "qt.identity", legacy)
    done = _fit(
        maze_file, tmp_path, *DT, "--trainer.max_epochs", "3", "--ckpt_path", f"run:{dt_id}"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(_snapshot(client, dt_id)[4]) == 3
    done = _fit(maze_file, tmp_path, *DT, "--trainer.max_epochs", "4", "--ckpt_path", "last")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        len(_snapshot(client, dt_id)[4]) == 4 and len(client.search_runs([exp.experiment_id])) == 2
    )


@pytest.mark.parametrize("ended", ["FAILED", "KILLED", "FINISHED"])
def test_a_reopened_run_is_running_again_until_the_fit_ends_it(tmp_path, ended):
    """A resumed fit (`--ckpt_path last` hands the logger the run's id) marks the run RUNNING
    while it trains, whatever its interruption left (SIGTERM: FAILED; a study: KILLED), and
    Lightning's end of fit ends it again; a run opened afresh is created RUNNING as before."""
    import mlflow

    from qt.tracking import MLFlowLogger

    save_dir = str(tmp_path / "runs")
    first = MLFlowLogger(experiment_name="e", save_dir=save_dir)
    run_id = first.run_id
    client = first.experiment
    assert client.get_run(run_id).info.status == "RUNNING"
    client.set_terminated(run_id, ended)
    # an untouched run in the same store, which reopening the first must leave alone
    other = MLFlowLogger(experiment_name="e", save_dir=save_dir).run_id
    client.set_terminated(other, "FAILED")

    reopened = MLFlowLogger(experiment_name="e", save_dir=save_dir, run_id=run_id)
    fresh = mlflow.MlflowClient(reopened._tracking_uri)  # a second reader of the store
    assert fresh.get_run(run_id).info.status == ended  # nothing happens before first use
    assert reopened.experiment is not None  # first use: Lightning opens the run
    assert fresh.get_run(run_id).info.status == "RUNNING"
    assert fresh.get_run(other).info.status == "FAILED"
    reopened.finalize("success")
    assert fresh.get_run(run_id).info.status == "FINISHED"

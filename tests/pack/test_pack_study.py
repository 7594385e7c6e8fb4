"""`python -m qt.study run` packs a tiny study's compatible jobs (QT and DT, two seeds: one
task, one architecture) into one process, and its report has the runs, names, tags and
metrics of the same study run with `--no-pack`, one process per job."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5
from qt.study.packing import compatibility, pack_size, threads_for

ROOT = Path(__file__).resolve().parents[2]
TASK = "maze2d-umaze-dense-v1"


def _study(data: str) -> dict:
    return {
        "name": "tiny",
        "config": str(ROOT / "configs" / "tiny.yaml"),
        "tasks": {TASK: {"data.path": data}},
        "variants": {"qt": {},
                     "dt": {"model.eta": 0, "model.rtg_no_q": True, "model.infer_no_q": True}},
        "seeds": [0, 1],
        "overrides": {"trainer.max_epochs": 2, "model.max_iters": 2},
        "workers": 2,
        "test_episodes": 2,
        "bootstrap_reps": 200,
    }  # fmt: skip


def _env() -> dict[str, str]:
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(folder: Path, *args: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    env = _env()
    proc = subprocess.run([sys.executable, "-m", "qt.study", "run", "study.yaml", *args],
                          cwd=folder, env=env, capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack_study")
    ds = generate(TASK, steps=2000, seed=0, ref_episodes=1, max_episode_steps=60)
    data = str(write_d4rl_hdf5(ds, root / f"{TASK}.hdf5"))
    out = {}
    for name, args in (("packed", ["--pack", "--no-compile"]), ("separate", ["--no-pack"])):
        folder = root / name
        folder.mkdir()
        (folder / "study.yaml").write_text(yaml.safe_dump(_study(data), sort_keys=False))
        out[name] = (folder, _run(folder, *args))
    return out


def _runs(folder: Path) -> dict[tuple, object]:
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("study-tiny")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    return {(r.info.run_name, r.data.tags.get("qt.study.kind")): r for r in runs}


def test_a_study_packs_its_compatible_jobs_into_one_process(studies):
    folder, stdout = studies["packed"]
    logs = sorted(p.name for p in (folder / "results" / "tiny" / "logs").glob("*.log"))
    assert len(logs) == 1 and logs[0].startswith("pack-"), logs
    text = (folder / "results" / "tiny" / "logs" / logs[0]).read_text()
    # the machine's cores go to the one process that runs; one job at a time: half each
    assert "a pack of 4" in text and f"threads: torch {threads_for(1)}," in text
    assert "1 pack of 4 fits" in stdout
    # one log per job (beside each, the status file its progress line reads)
    separate_logs = list((studies["separate"][0] / "results" / "tiny" / "logs").glob("*.log"))
    assert len(separate_logs) == 4
    assert f"threads: torch {threads_for(2)}," in separate_logs[0].read_text()


def test_the_packed_study_reports_what_the_unpacked_one_does(studies):
    packed, separate = _runs(studies["packed"][0]), _runs(studies["separate"][0])
    assert packed.keys() == separate.keys() and len(packed) == 9  # parent, 4 fits, 4 tests
    for key, theirs in separate.items():
        mine = packed[key]
        assert mine.info.status == theirs.info.status == "FINISHED", key
        assert set(mine.data.metrics) == set(theirs.data.metrics), key
        assert mine.data.params.keys() == theirs.data.params.keys(), key
        skip = ("mlflow.parentRunId", "mlflow.source.name", "qt.study.fit_run", "qt.fit_run")
        assert {k: v for k, v in mine.data.tags.items() if k not in skip} == {
            k: v for k, v in theirs.data.tags.items() if k not in skip
        }, key
    reports = [(studies[n][0] / "results" / "tiny" / "report.md").read_text().splitlines()
               for n in ("packed", "separate")]  # fmt: skip
    # the same table rows (tasks, variants, scores' names); the numbers are the runs' own
    rows = [[line.split("|")[1:3] for line in r if line.startswith("|")] for r in reports]
    assert rows[0] == rows[1] and len(rows[0]) > 2


def test_packing_keys_and_sizes():
    """Jobs differing only in member settings share a key; anything else separates them."""
    base = ("--config", "c.yaml", "--data.task", TASK)
    qt = compatibility((*base, "--model.eta", "1.0"))
    dt = compatibility((*base, "--model.eta", "0", "--model.rtg_no_q", "true"))
    wide = compatibility((*base, "--model.hidden_size", "64"))
    assert qt == dt == base and wide != qt

    class C:
        class model:  # noqa: N801
            hidden_size, n_layer, critic_hidden_size, n_head = 64, 2, None, 2

        class data:  # noqa: N801
            batch_size, K = 64, 20

    assert pack_size(C, memory=1 << 40) == 16
    assert pack_size(C, limit=3, memory=1 << 40) == 3
    assert pack_size(C, memory=1) == 1


@pytest.mark.slow  # 100 s; a pack's own SIGTERM resume is tested fast in test_pack_faults.py
def test_a_killed_packed_study_resumes_its_pack(studies, tmp_path):
    """The study killed (SIGKILL, with its pack) once the pack wrote its last.ckpt: the same
    command re-forms the pack, resumes it in the members' own runs, and finishes the study."""
    import signal
    import time

    folder = tmp_path / "killed"
    folder.mkdir()
    source = studies["packed"][0] / "study.yaml"
    (folder / "study.yaml").write_text(source.read_text())
    env = _env()
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qt.study", "run", "study.yaml", "--no-compile"],
            cwd=folder, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    deadline = time.monotonic() + 900
    while not list((folder / "runs").glob("*/packs/*/last.ckpt")):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("no pack to interrupt: " + (tmp_path / "killed.log").read_text())
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    out = _run(folder, "--no-compile")
    assert "resumed from its last.ckpt" in out, out
    runs = _runs(folder)
    fits = [r for (_, kind), r in runs.items() if kind == "fit"]
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'runs' / 'mlflow.db'}")
    every = client.search_runs([fits[0].info.experiment_id], max_results=1000)
    assert len([r for r in every if r.data.tags.get("qt.study.kind") == "fit"]) == 4
    assert all(r.info.status == "FINISHED" for r in fits)
    for r in fits:  # two evaluations each, at the uninterrupted steps
        steps = {m.step for m in client.get_metric_history(r.info.run_id, "eval/return_mean")}
        assert steps == {9, 19}, steps
    assert "4 finished" in _run(folder, "--no-compile")

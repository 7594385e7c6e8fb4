"""A run is written by one process at a time: a second process gets one sentence naming the
holder, and a holder killed with SIGKILL does not keep the run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5
from qt.tracking import RUN_LOCK, RunHeldError, hold_run

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"

HOLDER = """
import sys, time
from qt.tracking import hold_run
hold_run(sys.argv[1], "abc")
print("held", flush=True)
time.sleep(60)
"""


def test_a_second_holder_is_named_and_a_killed_holder_keeps_nothing(tmp_path):
    folder = tmp_path / "runs" / "1" / "abc"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(RunHeldError) as err:
            hold_run(folder, "abc")
        assert str(err.value) == (
            f"Run abc is being written by process {proc.pid} on {socket.gethostname()} (it "
            f"holds {(folder / RUN_LOCK).resolve()}): wait for that process to end or stop "
            "it, then resume the run; two processes never write one run."
        )
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    hold_run(folder, "abc")  # the dead holder's lock went with it
    assert (folder / RUN_LOCK).read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    hold_run(folder, "abc")  # held already by this process: nothing to do


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def test_two_resumes_of_one_run_started_together_write_it_once(tmp_path):
    ds = generate("maze2d-umaze-v1", steps=1500, seed=0, ref_episodes=1, max_episode_steps=60)
    data = write_d4rl_hdf5(ds, tmp_path / "maze2d-umaze-sparse-v1.hdf5")
    fit = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(TINY),
           "--data.path", str(data), "--model.max_iters", "8"]  # fmt: skip
    subprocess.run([*fit, "--trainer.max_epochs", "1"], cwd=tmp_path, env=_env(), check=True,
                   capture_output=True)  # fmt: skip
    resume = [*fit, "--trainer.max_epochs", "8", "--ckpt_path", "last"]
    procs = [
        subprocess.Popen(
            resume,
            cwd=tmp_path,
            env=_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], [e[-1500:] for e in errs]
    [winner] = [p for p in procs if p.returncode == 0]
    [loser_err] = [e for p, e in zip(procs, errs) if p.returncode == 2]
    lines = loser_err.strip().splitlines()
    assert lines[-1].startswith("error: Run ") and f"by process {winner.pid} on " in lines[-1]
    assert not any("Traceback" in line for line in lines)

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("qt").experiment_id])
    assert run.info.status == "FINISHED"
    for key in ("train/bc_loss", "eval/return_mean"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), (key, sorted(steps))  # no step written twice
    evals = sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/return_mean"))
    assert evals == [10 * i - 1 for i in range(1, 9)]  # one evaluation per iteration, 8 in all

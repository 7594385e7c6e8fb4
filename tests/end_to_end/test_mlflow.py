"""A tiny fit against a real MLflow tracking server on 127.0.0.1, read back through MLflow's
client: params, metric histories and artifacts are what the training logged."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5

ROOT = Path(__file__).resolve().parents[2]
MLFLOW = Path(sys.executable).with_name("mlflow")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the MLflow server did not start")
            time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)


def test_a_fit_against_a_tracking_server_reads_back(server, tmp_path):
    ds = generate("maze2d-umaze-v1", steps=3000, seed=0, ref_episodes=1, max_episode_steps=60)
    data = write_d4rl_hdf5(ds, tmp_path / "maze2d-umaze-sparse-v1.hdf5")
    env = dict(os.environ, MLFLOW_TRACKING_URI=server, QT_PROBE_DIR=str(tmp_path),
               OMP_NUM_THREADS="1")  # fmt: skip
    cmd = [
        sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--data.path", str(data), "--trainer.callbacks+=tests.support.probe.MetricsProbe",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not (tmp_path / "runs" / "mlflow.db").exists()  # the user's URI won, no local store

    import mlflow

    client = mlflow.MlflowClient(server)
    [run] = client.search_runs([client.get_experiment_by_name("qt").experiment_id])
    assert run.info.run_name == "m2d-umaze/qt/s123" and run.info.status == "FINISHED"
    params = run.data.params
    assert params["config.model.hidden_size"] == "16" and params["config.data.K"] == "5"
    assert params["config.data.task"] == "maze2d-umaze-v1"
    assert params["config.trainer.max_epochs"] == "2"

    logged = torch.load(tmp_path / "metrics.pt", weights_only=True)
    # evaluation metrics: one value per iteration, equal to what the loop held
    for key in ("eval/normalized_score", "eval/return_mean", "eval/best_normalized_score"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.value for m in history] == pytest.approx([e[key] for e in logged["epochs"]])
    # per-step training metrics at the logging interval (tiny.yaml: every 5 steps, 20 in all)
    history = client.get_metric_history(run.info.run_id, "train/bc_loss")
    assert len(history) == 4
    assert [m.value for m in history] == pytest.approx(
        [logged["steps"][i]["train/bc_loss"] for i in (4, 9, 14, 19)], rel=1e-6
    )
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "plots"} <= names
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert "plots/normalized_score.png" in plots and "plots/losses.png" in plots
    ckpts = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "checkpoints")}
    assert "last.ckpt" in ckpts and any(n.startswith("best-epoch=") for n in ckpts), ckpts

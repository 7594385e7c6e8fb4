"""What a tiny `cli.py fit` says: losses and scores on the progress bar, one line per
evaluation with the values the loop logged, a closing summary naming the run, its best score
and checkpoint and how to open it, and none of the libraries' tips or deprecation notices."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5

ROOT = Path(__file__).resolve().parents[2]


def test_a_tiny_fit_says_what_it_does(tmp_path):
    import mlflow

    ds = generate("maze2d-umaze-v1", steps=3000, seed=0, ref_episodes=1, max_episode_steps=60)
    data = write_d4rl_hdf5(ds, tmp_path / "maze2d-umaze-sparse-v1.hdf5")
    cmd = [sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
           "--data.path", str(data), "--trainer.max_epochs", "3", "--model.max_iters", "3",
           "--trainer.enable_progress_bar", "true",
           "--trainer.callbacks+=tests.support.probe.MetricsProbe"]  # fmt: skip
    env = dict(os.environ, QT_PROBE_DIR=str(tmp_path), OMP_NUM_THREADS="1",
               COLUMNS="200")  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_LOGGING_LEVEL", None)
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout + done.stderr

    for noise in ("💡 Tip", "v_num", "deprecated", "INFO mlflow", "Creating initial MLflow"):
        assert noise not in out, noise
    # the bar: losses and the scores, by their short names
    for name in ("bc:", "critic:", "score:", "best:"):
        assert name in out, name

    # one line before and one after every evaluation, with what was logged
    epochs = torch.load(tmp_path / "metrics.pt", weights_only=True)["epochs"]
    scores = [e["eval/normalized_score"] for e in epochs]
    assert len(scores) == 3
    lines = [line for line in out.splitlines() if line.startswith("iteration ")]
    best, best_at = -float("inf"), 0
    for i, score in enumerate(scores, start=1):
        if score > best:
            best, best_at = score, i
        assert f"iteration {i}/3: evaluating 2 episodes ..." in lines
        [after] = [x for x in lines if x.startswith(f"iteration {i}/3: normalized score")]
        assert after.startswith(
            f"iteration {i}/3: normalized score {score:.2f} (best {best:.2f}, iteration {best_at}), "
            f"return {epochs[i - 1]['eval/return_mean']:.2f} ± "
        ), after

    # the closing summary: the run the store holds, the best checkpoint, how to open it
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("qt")
    [run] = client.search_runs([exp.experiment_id])
    rid = run.info.run_id
    assert f"run       m2d-umaze/qt/s123 (MLflow run {rid}, experiment qt)" in out
    [best_line] = [x for x in out.splitlines() if x.startswith("best      ")]
    match = re.fullmatch(
        r"best      eval/normalized_score (\S+) \(iteration (\d+)\): (\S+best-epoch=(\d+)\.ckpt)",
        best_line,
    )
    assert match, best_line
    assert float(match.group(1)) == float(f"{best:.4g}") and int(match.group(2)) == best_at
    assert int(match.group(4)) == best_at - 1 and (tmp_path / match.group(3)).is_file()
    [last_line] = [x for x in out.splitlines() if x.startswith("last      ")]
    assert f"(continue with --ckpt_path run:{rid})" in last_line
    assert (tmp_path / last_line.split()[1]).is_file()
    [open_line] = [x for x in out.splitlines() if x.startswith("open      ")]
    assert "make ui" in open_line
    assert open_line.endswith(
        f"/#/experiments/{exp.experiment_id}/runs/{rid}?workflowType=machine_learning"
    )

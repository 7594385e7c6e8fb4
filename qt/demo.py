"""`python -m qt.demo` (`make demo`): QT and QT without its Q term on maze2d-medium.

1. Generates the dataset of configs/demo.yaml's task (maze2d-medium-v1) by the D4RL protocol
   at D4RL's size (2M steps, 2-4 minutes), or reuses it: a Minari dataset and its D4RL
   hdf5 twin in qt's data root ($QT_DATA_DIR, else ./data).
2. Trains QT (configs/demo.yaml) and QT without Q (`qt-no-q`: `eta 0`, `rtg_no_q`, `infer_no_q`;
   docs/baselines.md; not the Decision Transformer as published) side by side, one process
   and one thread each, with `qt fit`; both log to MLflow. Both are evaluated after every
   second iteration (`--eval-every`; the demo's two iterations give one evaluation, at the
   end): QT's acting runs the transformer on 50 return-to-go candidates per step.
3. Tests each best checkpoint with `qt test` and prints a table: the dataset's average
   return, the evaluation episodes' returns and lengths, the normalised scores, and where the
   MLflow runs are.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import yaml

from qt.checkpointing import best_checkpoint, checkpoint_dir
from qt.console import STATUS_ENV, quiet, status_line
from qt.data.paths import hdf5_dir
from qt.data.readers import read_d4rl_hdf5
from qt.data.store import TrajectoryStore
from qt.datagen import make
from qt.errors import ArgumentParser
from qt.runtime import start_module
from qt.tasks import get_task
from qt.tracking import default_tracking_uri

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
TASK = yaml.safe_load(CONFIG.read_text())["data"]["task"]
EXPERIMENT = "qt-demo"
NO_Q_ARGS = ["--model.eta", "0", "--model.rtg_no_q", "true", "--model.infer_no_q", "true"]


def _ensure_dataset(steps: int | None) -> Path:
    root = make.default_minari_root()
    hdf5 = (hdf5_dir() / get_task(TASK).dataset_file).resolve()
    if hdf5.exists():
        print(f"[demo] reusing {hdf5}", flush=True)
        return hdf5
    argv = [TASK, "--out", str(root), "--d4rl-hdf5", "--hdf5-out", str(hdf5)]
    if steps is not None:
        argv += ["--steps", str(steps)]
    print(f"[demo] generating {TASK} by the D4RL protocol into {root} ...", flush=True)
    if make.main(argv) != 0:
        raise SystemExit("[demo] dataset generation failed (see the message above).")
    return hdf5


def _launch(name: str, args: list[str], log: Path) -> subprocess.Popen:
    """`qt ARGS` in a process of its own, one thread, its output in `log` (started afresh), its
    progress in `_status_file(log)` (which `_wait` shows)."""
    print(f"[demo] {name}: qt {' '.join(args)}  (log: {log})", flush=True)
    log.unlink(missing_ok=True)
    _status_file(log).unlink(missing_ok=True)
    status = {STATUS_ENV: str(_status_file(log))}
    return start_module(["qt", *args], log, threads=1, cwd=ROOT, extra_env=status)


def _status_file(log: Path) -> Path:
    return log.with_suffix(".status.json")


def _wait(procs: dict[str, tuple[subprocess.Popen, Path]], every: float = 15.0) -> None:
    """Wait for the processes, showing each running fit's progress every `every` seconds
    (iteration, step, rate, time left, latest score: `qt.console.status_line`)."""
    shown = time.monotonic()
    while any(proc.poll() is None for proc, _ in procs.values()):
        time.sleep(0.5)
        if time.monotonic() - shown < every:
            continue
        shown = time.monotonic()
        for name, (proc, log) in procs.items():
            line = status_line(_status_file(log)) if proc.poll() is None else "done"
            print(f"[demo] {name}: {line or 'starting'}", flush=True)
    failed = []
    for name, (proc, log) in procs.items():
        if proc.wait() != 0:
            failed.append(f"{name} (exit {proc.returncode}; log {log})")
    if failed:
        raise SystemExit(f"[demo] failed: {', '.join(failed)}")


def _run(client, name: str):
    runs = client.search_runs(
        [client.get_experiment_by_name(EXPERIMENT).experiment_id],
        filter_string=f"tags.mlflow.runName = '{name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise SystemExit(f"[demo] no MLflow run named {name!r} in experiment {EXPERIMENT!r}.")
    return runs[0]


def _best_checkpoint(run) -> Path:
    best = best_checkpoint(checkpoint_dir(ROOT / "runs", run.info.experiment_id, run.info.run_id))
    if best is None:
        raise SystemExit(f"[demo] run {run.info.run_name} left no best checkpoint.")
    return best


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m qt.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset-steps", type=int, default=None, help="default: D4RL's size")
    parser.add_argument("--epochs", type=int, default=None, help="default: configs/demo.yaml")
    parser.add_argument("--steps-per-epoch", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--eval-every", type=int, default=2, help="evaluate after every n-th iteration (default 2)"
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    quiet()  # no MLflow set-up lines when the demo creates the store
    t0 = time.perf_counter()

    hdf5 = _ensure_dataset(args.dataset_steps)
    traj = read_d4rl_hdf5(hdf5)
    store = TrajectoryStore(traj, scale=get_task(TASK).scale)
    ref_min, ref_max = get_task(TASK).ref_min_score, get_task(TASK).ref_max_score

    common = [
        "--config",
        str(CONFIG),
        "--data.path",
        str(hdf5),
        "--seed_everything",
        str(args.seed),
        "--evaluation.eval_every_n_epochs",
        str(args.eval_every),
    ]
    if args.epochs is not None:  # the learning-rate schedule (T_max) stays configs/demo.yaml's
        common += ["--trainer.max_epochs", str(args.epochs)]
    if args.steps_per_epoch is not None:
        common += ["--data.num_steps_per_iter", str(args.steps_per_epoch)]
    # Create the store and the experiment here: two fits creating a fresh SQLite store at
    # once race on its schema migration.
    uri = default_tracking_uri(ROOT / "runs")
    client = mlflow.MlflowClient(uri)
    if client.get_experiment_by_name(EXPERIMENT) is None:
        (ROOT / "runs").mkdir(exist_ok=True)
        client.create_experiment(
            EXPERIMENT, artifact_location=(ROOT / "runs" / "mlartifacts").as_uri()
        )
    logs = ROOT / "runs" / "demo"
    models = {"QT": [], "QT-no-Q": NO_Q_ARGS}
    fits = {
        name: _launch(
            f"fit {name}",
            ["fit", *common, *extra, "--trainer.logger.init_args.run_name", f"demo-{name}"],
            logs / f"fit-{name}.log",
        )
        for name, extra in models.items()
    }
    _wait({n: (p, logs / f"fit-{n}.log") for n, p in fits.items()})
    t_fit = time.perf_counter() - t0

    fit_runs = {name: _run(client, f"demo-{name}") for name in models}
    tests = {
        name: _launch(
            f"test {name}",
            [
                "test",
                *common,
                *models[name],
                "--ckpt_path",
                str(_best_checkpoint(fit_runs[name])),
                "--trainer.logger.init_args.run_name",
                f"demo-{name}-test",
            ],
            logs / f"test-{name}.log",
        )
        for name in models
    }
    _wait({n: (p, logs / f"test-{n}.log") for n, p in tests.items()})
    test_runs = {name: _run(client, f"demo-{name}-test") for name in models}

    def metric(run, key):
        value = run.data.metrics.get(key)
        return "n/a" if value is None else f"{value:.1f}"

    r = store.returns
    data_score = 100 * (r.mean() - ref_min) / (ref_max - ref_min)
    lines = [
        "",
        f"dataset  {TASK}: {store.num_steps:,} steps, {len(store):,} episodes; average return "
        f"{r.mean():.2f} (std {r.std():.2f}), normalised {data_score:.1f} "
        f"(D4RL's reference returns {ref_min:.2f} / {ref_max:.2f})",
        "",
        f"{'':<34}{'QT':>10}{'QT-no-Q':>10}",
    ]
    rows = [
        ("best evaluation score during fit", fit_runs, "eval/best_normalized_score"),
        ("test: normalised score", test_runs, "test/normalized_score"),
        ("test: return mean", test_runs, "test/return_mean"),
        ("test: return std", test_runs, "test/return_std"),
        ("test: episode length mean", test_runs, "test/length_mean"),
    ]
    for label, runs, key in rows:
        lines.append(f"{label:<34}" + "".join(f"{metric(runs[n], key):>10}" for n in models))
    lines += [
        "",
        f"time     {time.perf_counter() - t0:.0f} s in all ({t_fit:.0f} s to the end of both fits)",
        f"MLflow   {uri} (experiment {EXPERIMENT}; `make ui` serves it); runs: "
        + ", ".join(f"{n} {fit_runs[n].info.run_id}" for n in models),
        f"logs     {logs}",
    ]
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

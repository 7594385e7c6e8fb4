"""`python -m qt.study`: a 2-task x 2-variant x 2-seed study of tiny fits end to end, its report
against numbers recomputed from the MLflow metric histories (and rliable's interval against a
stratified bootstrap written out here), a killed study resumed to the same report, the Ray
backend on a local 2-CPU instance to the same report, and bad study files stopped before
anything runs."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml

from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5
from qt.study.spec import StudyError, load_study

ROOT = Path(__file__).resolve().parents[2]
TASKS = ("maze2d-umaze-dense-v1", "maze2d-open-dense-v0")  # dense: scores differ by seed
REPS = 500


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("study_data")
    paths = {}
    for task in TASKS:
        ds = generate(task, steps=2000, seed=0, ref_episodes=1, max_episode_steps=60)
        paths[task] = str(write_d4rl_hdf5(ds, root / f"{task}.hdf5"))
    return paths


def _study(data: dict[str, str], **extra) -> dict:
    return {
        "name": "tiny",
        "config": str(ROOT / "configs" / "tiny.yaml"),
        "tasks": {task: {"data.path": path} for task, path in data.items()},
        "variants": {
            "qt": {},
            "qt-no-q": {"model.eta": 0, "model.rtg_no_q": True, "model.infer_no_q": True},
        },
        "seeds": [0, 1],
        "overrides": {"trainer.max_epochs": 2, "model.max_iters": 2},
        "workers": 2,
        "threads_per_worker": 1,
        "test_episodes": 2,
        "bootstrap_reps": REPS,
        **extra,
    }


def _write(folder: Path, study: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def _cmd(*args: str) -> list[str]:
    # one process per job, as these tests read it (threads, start order, resume lines, the
    # same numbers from every backend); packed studies: tests/pack/test_pack_study.py
    more = ["--no-pack"] if args and args[0] == "run" and "--check" not in args else []
    return [sys.executable, "-m", "qt.study", *args, *more]


def _env() -> dict[str, str]:
    env = dict(os.environ, MPLBACKEND="Agg")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _run(folder: Path, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(_cmd(*args), cwd=folder, env=_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _client(folder: Path) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(f"sqlite:///{folder / 'runs' / 'mlflow.db'}")


def _without_wall_time(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.startswith("Wall time"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("study_whole")
    path = _write(folder, _study(data))
    proc = _run(folder, "run", str(path))
    return folder, proc.stdout


# ---------------------------------------------------------------------------- by hand
def _bootstrap(x: np.ndarray, func, reps: int, seed: int = 0) -> tuple[float, float]:
    """Stratified bootstrap: runs resampled with replacement within each task (column)."""
    n, m = x.shape
    np.random.seed(seed)  # noqa: NPY002 (numpy's global generator, which rliable draws from)
    stats = []
    for _ in range(reps):
        idx = np.random.choice(n, (n, m), replace=True)  # noqa: NPY002
        stats.append(func(x[idx, np.arange(m)[None, :]]))
    return tuple(np.percentile(stats, [2.5, 97.5]))


def _iqm(x: np.ndarray) -> float:
    v = np.sort(x.ravel())
    cut = int(0.25 * len(v))
    return float(v[cut : len(v) - cut].mean())


# D4RL's reference returns of TASKS (d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE), by hand
REFS = {"maze2d-umaze-dense-v1": (68.537689, 193.66285642381482),
        "maze2d-open-dense-v0": (11.17817, 27.166538620695782)}  # fmt: skip


def _score(task: str, ret: float) -> float:
    lo, hi = REFS[task]
    return 100 * (ret - lo) / (hi - lo)


def _from_histories(folder: Path) -> dict:
    """(task, variant, seed) -> {best, last, test}, straight from the MLflow store: the mean
    returns, normalised by D4RL's references (what the fits logged as normalised scores too)."""
    client = _client(folder)
    exp = client.get_experiment_by_name("study-tiny")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    out = {}
    for run in runs:
        tags = run.data.tags
        if tags.get("qt.study.kind") != "fit" or run.info.status != "FINISHED":
            continue
        task = tags["task"]
        history = client.get_metric_history(run.info.run_id, "eval/return_mean")
        by_step = {}
        for m in sorted(history, key=lambda m: m.timestamp):
            by_step[m.step] = _score(task, m.value)
        logged = client.get_metric_history(run.info.run_id, "eval/normalized_score")
        for m in logged:  # the fit's own scores: the same scale, to Lightning's float32
            assert m.value == pytest.approx(by_step[m.step], rel=1e-6, abs=1e-6)
        [test] = [
            r for r in runs
            if r.data.tags.get("qt.study.fit_run") == run.info.run_id and r.info.status == "FINISHED"
        ]  # fmt: skip
        key = (tags["task"], tags["variant"], int(tags["seed"]))
        assert key not in out
        out[key] = {
            "best": max(by_step.values()),
            "last": by_step[max(by_step)],
            "test": _score(task, test.data.metrics["test/return_mean"]),
        }
    return out


# ---------------------------------------------------------------------------- tests
def test_study_end_to_end_report_equals_the_mlflow_histories(uninterrupted):
    folder, out = uninterrupted
    # one progress line per job, with its scores, its time and what is left
    progress = [
        line for line in out.splitlines() if line.startswith("[study] ") and " ETA " in line
    ]
    assert len(progress) == 8, out
    assert all("best " in p and "test " in p and " s; " in p for p in progress)
    assert progress[-1].endswith("0 left, ETA 0 s")
    # every fit ran with its share of the cores: two workers at once, half the cores each
    n = max(1, len(os.sched_getaffinity(0)) // 2)
    for log in (folder / "results" / "tiny" / "logs").glob("*.log"):
        assert (
            f"[job] threads: torch {n}, OMP_NUM_THREADS {n}, MKL_NUM_THREADS {n}" in log.read_text()
        )

    values = _from_histories(folder)
    assert len(values) == 8
    report = json.loads((folder / "results" / "tiny" / "scores.json").read_text())
    assert report["missing"] == []
    cells = {(c["task"], c["variant"], c["score"]): c for c in report["cells"]}
    md = (folder / "results" / "tiny" / "report.md").read_text()
    for task in TASKS:
        for variant in ("qt", "qt-no-q"):
            for score in ("best", "last", "test"):
                x = np.array([[values[task, variant, s][score]] for s in (0, 1)])
                cell = cells[task, variant, score]
                np.testing.assert_allclose(cell["values"], x[:, 0], rtol=0, atol=1e-9)
                assert cell["mean"] == pytest.approx(x.mean(), abs=1e-9)
                lo, hi = _bootstrap(x, np.mean, REPS)
                assert (cell["lo"], cell["hi"]) == pytest.approx((lo, hi), abs=1e-9)
            row = next(
                line for line in md.splitlines() if line.startswith(f"| {task} | {variant} |")
            )
            best = cells[task, variant, "best"]
            assert f"{best['mean']:.1f} [{best['lo']:.1f}, {best['hi']:.1f}]" in row
    # the seeds give different scores, so the intervals are not trivial
    assert len({v["best"] for v in values.values()}) > 2

    aggs = {(a["variant"], a["score"], a["statistic"]): a for a in report["aggregates"]}
    for variant in ("qt", "qt-no-q"):
        for score in ("best", "last", "test"):
            x = np.array([[values[t, variant, s][score] for t in TASKS] for s in (0, 1)])
            iqm, mean = aggs[variant, score, "IQM"], aggs[variant, score, "mean"]
            assert iqm["value"] == pytest.approx(_iqm(x), abs=1e-9)
            assert mean["value"] == pytest.approx(x.mean(), abs=1e-9)
            assert (iqm["lo"], iqm["hi"]) == pytest.approx(_bootstrap(x, _iqm, REPS), abs=1e-9)
            assert (mean["lo"], mean["hi"]) == pytest.approx(_bootstrap(x, np.mean, REPS), abs=1e-9)

    # the budget, the plots, and the parent run holding the report and the child runs
    assert "Budget: 20 training steps (2 iterations x 10), batch 8, width 16" in md
    for name in ("learning_curves.png", "intervals.png"):
        assert (folder / "results" / "tiny" / name).stat().st_size > 10_000
    client = _client(folder)
    exp = client.get_experiment_by_name("study-tiny")
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    [parent] = [r for r in runs if r.data.tags.get("qt.study.kind") == "study"]
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/learning_curves.png", "report/intervals.png"} <= artifacts
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) == 16  # a fit and a test per (task, variant, seed)
    assert {(r.data.tags["variant"], r.data.tags["seed"]) for r in children} == {
        (v, s) for v in ("qt", "qt-no-q") for s in ("0", "1")
    }

    # `report NAME` reads the same numbers back
    again = _run(folder, "report", "tiny")
    assert md in again.stdout
    assert (folder / "results" / "tiny" / "report.md").read_text() == md
    assert json.loads((folder / "results" / "tiny" / "scores.json").read_text()) == report


def _running_fit_with_last_ckpt(folder: Path) -> bool:
    """A fit of the study that has written last.ckpt and is still running."""
    from qt.tracking import store_lock

    ckpts = list((folder / "runs").glob("*/*/checkpoints/last.ckpt"))
    if not ckpts:
        return False
    with store_lock(f"sqlite:///{folder / 'runs' / 'mlflow.db'}"):  # never a first use here
        client = _client(folder)
        return any(client.get_run(c.parents[1].name).info.status == "RUNNING" for c in ckpts)


def _assert_same_report(here: Path, whole: Path) -> None:
    """Two studies' results folders hold the same scores and report (wall time aside)."""
    assert json.loads((here / "scores.json").read_text()) == json.loads(
        (whole / "scores.json").read_text()
    )
    assert _without_wall_time((here / "report.md").read_text()) == _without_wall_time(
        (whole / "report.md").read_text()
    )


def test_the_fits_start_seed_by_seed(uninterrupted):
    """Every variant and task of one seed starts before the next seed: a study stopped part-way
    leaves seeds paired across variants."""
    folder, _ = uninterrupted
    client = _client(folder)
    exp = client.get_experiment_by_name("study-tiny")
    fits = [
        r for r in client.search_runs([exp.experiment_id], max_results=1000)
        if r.data.tags.get("qt.study.kind") == "fit"
    ]  # fmt: skip
    order = [int(r.data.tags["seed"]) for r in sorted(fits, key=lambda r: r.info.start_time)]
    # two workers: the first two fits start together, as do the last two; variant by variant
    # (the file's order) would start qt seeds 0 and 1 first
    assert sorted(order) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert order[:2] == [0, 0] and order[-2:] == [1, 1], order


def _point(m) -> tuple:
    return m.step, m.timestamp, m.value


def test_a_study_split_across_two_machines_merges_into_the_same_report(
    tmp_path, data, uninterrupted
):
    """Seed 0 runs here (`run --seeds 0`), seed 1 comes from another machine's store (`merge`;
    the uninterrupted study's store plays that machine): the report is the uninterrupted one's."""
    folder = tmp_path / "split"
    path = _write(folder, _study(data))
    here = _run(folder, "run", str(path), "--seeds", "0")
    assert (
        "8 runs (2 tasks x 2 variants x 2 seeds), 4 of them here (seeds 0); 0 finished"
        in here.stdout
    )
    client = _client(folder)
    exp_id = client.get_experiment_by_name("study-tiny").experiment_id

    def fits() -> list:
        runs = client.search_runs([exp_id], max_results=1000)
        return [r for r in runs if r.data.tags.get("qt.study.kind") == "fit"]

    assert sorted(int(r.data.tags["seed"]) for r in fits()) == [0, 0, 0, 0]
    parent = client.search_runs([exp_id], "tags.`qt.study.kind` = 'study'")[0]
    assert parent.info.status == "FINISHED"  # this machine's share is done

    # the other machine's store, with a finished fit of an older version of the study file
    shutil.copytree(
        uninterrupted[0] / "runs", tmp_path / "there", ignore=shutil.ignore_patterns("*.lock")
    )
    other = str(tmp_path / "there" / "mlflow.db")
    source = mlflow.MlflowClient(f"sqlite:///{other}")
    src_exp = source.get_experiment_by_name("study-tiny").experiment_id
    old = source.create_run(
        src_exp, tags={"study": "tiny", "qt.study.kind": "fit", "qt.study.key": "0123456789abcdef"}
    )
    source.set_terminated(old.info.run_id, "FINISHED")
    # and here, a seed-1 fit that finished untested after the other machine's fit had started
    src_fit = next(
        r for r in source.search_runs([src_exp], "tags.seed = '1' and tags.`qt.study.kind` = 'fit'")
    )
    late = client.create_run(exp_id, start_time=src_fit.info.start_time + 60_000,
                             tags={**{k: v for k, v in src_fit.data.tags.items() if not k.startswith("mlflow.")}})  # fmt: skip
    client.set_terminated(late.info.run_id, "FINISHED")

    merged = _run(folder, "merge", "tiny", str(tmp_path / "there"))  # the folder holding mlflow.db
    assert (
        "copied 4 jobs" in merged.stdout and "(4 were done here already" in merged.stdout
        and "1 finished fits there are of another version of the study file, left there" in merged.stdout
    )  # fmt: skip
    copied = [
        r for r in fits() if r.data.tags["seed"] == "1" and "qt.study.source_run" in r.data.tags
    ]
    assert len(copied) == 4
    for run in copied:  # every metric's whole history, the times and the parameters come over
        original = source.get_run(run.data.tags["qt.study.source_run"])
        assert run.info.status == "FINISHED" and run.data.params == original.data.params
        assert (run.info.start_time, run.info.end_time) == (
            original.info.start_time,
            original.info.end_time,
        )
        for key in original.data.metrics:
            mine = client.get_metric_history(run.info.run_id, key)
            theirs = source.get_metric_history(original.info.run_id, key)
            assert sorted(map(_point, mine)) == sorted(map(_point, theirs)), key
    _run(folder, "report", "tiny")
    _assert_same_report(folder / "results" / "tiny", uninterrupted[0] / "results" / "tiny")
    again = _run(folder, "merge", "tiny", other)  # nothing left to copy: nothing is replaced
    assert "copied 0 jobs" in again.stdout and "(8 were done here already" in again.stdout
    assert len(fits()) == 9  # 4 made here, 1 made here and never tested, 4 copied


def test_a_merge_of_another_study_file_stops_before_writing(tmp_path, data, uninterrupted):
    """A store whose finished fit is not a job of the study (another config, say) is refused in
    one sentence, and the destination is left as it was; so is a source that does not exist."""
    other = tmp_path / "other"
    other.mkdir()
    source = mlflow.MlflowClient(f"sqlite:///{other / 'mlflow.db'}")
    exp_id = source.create_experiment("study-tiny")
    stranger = source.create_run(exp_id, tags={"study": "tiny", "qt.study.kind": "fit",
                                               "qt.study.key": "0123456789abcdef"})  # fmt: skip
    source.set_terminated(stranger.info.run_id, "FINISHED")
    dest = uninterrupted[0]
    before = len(
        _client(dest).search_runs(
            [_client(dest).get_experiment_by_name("study-tiny").experiment_id]
        )
    )
    (other / "notes.txt").write_text("not a store")
    (other / "empty").mkdir()
    for src, message in [
        (str(other / "mlflow.db"), "error: merge source '{src}' holds no finished fit of study 'tiny' as it ran here (its 1 have other keys, e.g. 0123456789abcdef)"),
        (str(other / "nowhere.db"), "error: merge source '{src}': expected another machine's MLflow store"),
        (str(other / "notes.txt"), "error: merge source '{src}': expected another machine's MLflow store"),
        (str(other / "empty"), "error: merge source '{src}': expected another machine's MLflow store"),
    ]:  # fmt: skip
        proc = subprocess.run(_cmd("merge", "tiny", src), cwd=dest, env=_env(), capture_output=True,
                              text=True)  # fmt: skip
        assert proc.returncode != 0
        [line] = proc.stderr.strip().splitlines()
        assert line.startswith(message.format(src=src)) and line.endswith("."), line
    after = len(
        _client(dest).search_runs(
            [_client(dest).get_experiment_by_name("study-tiny").experiment_id]
        )
    )
    assert after == before


@pytest.mark.slow  # a second study of 8 fits (about a minute on 2 idle cores): make test-all
def test_a_killed_study_resumes_to_the_same_report(tmp_path, data, uninterrupted):
    folder = tmp_path / "killed"
    path = _write(folder, _study(data))
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen(_cmd("run", str(path)), cwd=folder, env=_env(),
                                start_new_session=True, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    deadline = time.monotonic() + 600
    while not _running_fit_with_last_ckpt(folder):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError("no fit to interrupt: " + (tmp_path / "killed.log").read_text())
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the study and its fits, at once
    proc.wait()

    resumed = _run(folder, "run", str(path))
    assert "resuming fit run" in resumed.stdout
    _assert_same_report(folder / "results" / "tiny", uninterrupted[0] / "results" / "tiny")
    # running it once more finds everything finished
    third = _run(folder, "run", str(path))
    assert "8 runs (2 tasks x 2 variants x 2 seeds); 8 finished" in third.stdout


@pytest.mark.slow  # a third study of 8 fits, and Ray's start-up: make test-all
def test_the_ray_backend_gives_the_same_report(tmp_path, data, uninterrupted):
    pytest.importorskip("ray")
    folder = tmp_path / "ray"
    path = _write(folder, _study(data))
    # --backend ray without an address starts a local instance: 2 workers x 1 CPU
    proc = _run(folder, "run", str(path), "--backend", "ray")
    assert "backend ray" in proc.stdout
    _assert_same_report(folder / "results" / "tiny", uninterrupted[0] / "results" / "tiny")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tasks": {"maze2d-umaz-v1": None}}, r"Unknown task 'maze2d-umaz-v1'"),
        ({"variant": {"qt": {}}}, r"unknown key 'variant'; expected one of name, config"),
        ({"variants": {"dt": {"model.etaa": 0}}}, r"variant 'dt'.*rejects the overrides: unrecognized arguments: --model.etaa 0"),
        ({"variants": {"dt": {"model.eta": "abc"}}}, r"rejects the overrides: --model\.eta abc: expected a number\.$"),
        ({"overrides": {"seed_everything": 3}}, r"shared overrides: override 'seed_everything' is set by the study itself"),
        ({"seeds": [1, 1]}, r"study key 'seeds': expected a list of distinct whole numbers"),
        ({"workers": 0}, r"study key 'workers': expected a whole number >= 1"),
        ({"tasks": {"maze2d-umaze-dense-v1": {"data.path": "nowhere.hdf5"}}}, r"data.path nowhere.hdf5 does not exist"),
    ],
)  # fmt: skip
def test_a_bad_study_file_stops_with_one_sentence(tmp_path, data, change, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path / "bad", {**_study(data), **change})
    with pytest.raises(StudyError, match=message) as err:
        load_study(path)
    text = str(err.value.code)
    assert text.startswith("error: ") and "\n" not in text and text[-1] in ".?"
    assert not (tmp_path / "runs").exists()


def test_the_command_stops_before_anything_runs(tmp_path, data):
    path = _write(tmp_path, _study(data, variants={"qt": {"model.n_layerz": 2}}))
    proc = subprocess.run(_cmd("run", str(path)), cwd=tmp_path, env=_env(), capture_output=True,
                          text=True)  # fmt: skip
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: task 'maze2d-umaze-dense-v1', variant 'qt': `cli.py fit` rejects the overrides: "
        "unrecognized arguments: --model.n_layerz 2."
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["study.yaml"]  # no store, no results


def test_a_second_process_of_the_same_study_stops(tmp_path, data, monkeypatch):
    import fcntl

    from qt.study.runner import run

    monkeypatch.chdir(tmp_path)
    study = load_study(_write(tmp_path, _study(data)))
    (tmp_path / "runs").mkdir()
    with open(tmp_path / "runs" / ".study-tiny.lock", "a") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)  # the study running elsewhere
        with pytest.raises(StudyError, match=r"study 'tiny' is already running in another process"):
            run(study)
    assert not (tmp_path / "runs" / "mlflow.db").exists()


@pytest.mark.parametrize(
    "path", sorted((ROOT / "configs" / "studies").glob("*.yaml")), ids=lambda p: p.name
)
def test_the_study_files_of_the_repository_parse(path, monkeypatch):
    from qt.study.spec import fit_args, parse_fit

    monkeypatch.chdir(ROOT)
    study = load_study(path, check=False)  # without their data, which may not be generated yet
    assert len(study.jobs()) == len(study.tasks) * len(study.variants) * len(study.seeds)
    for task, over in study.tasks.items():
        for variant, var_over in study.variants.items():
            args = fit_args(study, task, {**study.overrides, **over, **var_over})
            config = parse_fit(args, f"{path.name}: {task}, {variant}")
            assert config.data.task == task
            for key, value in {**study.overrides, **over, **var_over}.items():
                node = config
                for part in key.split("."):
                    node = node[part]
                assert node == value, key


@pytest.mark.parametrize("seeds", [[7], [0, 0]])
def test_seeds_outside_the_study_file_stop_with_one_sentence(tmp_path, data, monkeypatch, seeds):
    monkeypatch.chdir(tmp_path)
    study = load_study(_write(tmp_path, _study(data)))
    given = " ".join(map(str, seeds))
    with pytest.raises(StudyError) as err:
        study.select_seeds(seeds)
    assert str(err.value.code) == (
        f"error: --seeds {given}: expected distinct seeds of the study file's [0, 1]."
    )
    assert study.selected is None and len([j for j in study.jobs() if study.runs_here(j)]) == 8


@pytest.mark.parametrize(
    ("name", "maze", "eta"),
    [
        ("maze2d-medium-cpu-w64-3way", "maze2d-medium", 5.0),
        ("maze2d-medium-cpu-w64-3way-12k", "maze2d-medium", 5.0),
        ("maze2d-large-cpu-w64-3way", "maze2d-large", 4.0),
    ],
)
def test_the_three_way_studies_dt_is_the_published_recipe_at_the_regimes_sizes(
    name, maze, eta, monkeypatch
):
    """Each variant of the three-way studies, parsed as its fits are: `dt` is exactly
    configs/dt/<maze>-w64.yaml (but for the study's budget), with the published recipe's
    numbers (docs/baselines.md); qt and qt-no-q are the regime's QT trainer, qt with the
    maze's published eta (docs/algorithm.md: medium 5, large 4)."""
    from qt.study.spec import fit_args, parse_fit

    monkeypatch.chdir(ROOT)
    study = load_study(ROOT / "configs" / "studies" / f"{name}.yaml", check=False)
    assert list(study.variants) == ["qt", "dt", "qt-no-q"] and study.seeds == [0, 1, 2, 3, 4]
    assert study.test_episodes == 50
    task = f"{maze}-v1"
    assert list(study.tasks) == [task]
    parsed = {
        v: parse_fit(fit_args(study, task, {**study.overrides, **study.tasks[task], **over}), v)
        for v, over in study.variants.items()
    }
    dt_config = parse_fit(["--config", f"configs/dt/{maze}-w64.yaml"], "dt config")
    dt = parsed["dt"]
    for section in ("model", "data", "evaluation", "targets"):
        assert dt[section] == dt_config[section], section
    steps = dt.trainer.max_epochs * dt.data.num_steps_per_iter
    assert steps == (12_000 if name.endswith("12k") else 3000)
    assert parsed["qt"].trainer.max_epochs == dt.trainer.max_epochs
    m = dt.model
    assert (m.train_critic, m.next_state_loss, m.optimizer, m.lr_decay) == (
        False,
        False,
        "adamw",
        False,
    )
    assert (m.learning_rate, m.weight_decay, m.warmup_steps, m.grad_norm) == (
        1e-4,
        1e-4,
        10_000,
        0.25,
    )
    assert (m.eta, m.rtg_no_q, m.infer_no_q, m.dropout, dt.data.K, dt.data.batch_size) == (
        0,
        True,
        True,
        0.1,
        20,
        64,
    )
    # the same network for all three; QT's trainer for qt and qt-no-q
    for v in ("qt", "qt-no-q"):
        q = parsed[v].model
        assert (q.hidden_size, q.n_layer, q.n_head) == (m.hidden_size, m.n_layer, m.n_head)
        assert q.train_critic and q.next_state_loss and q.optimizer == "adam" and q.lr_decay
    assert parsed["qt"].model.eta == eta and parsed["qt-no-q"].model.eta == 0

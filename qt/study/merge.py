"""One study, several machines: `python -m qt.study merge NAME SOURCE` copies the finished runs
of study NAME from another MLflow store (SOURCE: its `mlflow.db`, or a tracking URI) into this
one, so that `python -m qt.study report NAME` reports them beside the runs made here.

A job is the same job on both machines when its key is: the key hashes the fit's arguments, the
seed, the test episodes and the fit config's text, so only a study run from the same study file
(the seeds and workers aside) can be merged. The usual way to split a study:

    python -m qt.study run STUDY.yaml --seeds 0 1        # here
    python -m qt.study run STUDY.yaml --seeds 2 3 4      # on the other machine
    python -m qt.study merge NAME OTHER/runs/mlflow.db   # here, with that machine's store

A job is copied only when the source has it done (its fit finished and the test of that fit
finished) and this store does not: a job done here is never replaced. A copied run keeps its
name, tags, parameters, every metric's whole history and its start and end times; its
`mlflow.parentRunId` becomes this study's parent run, and the tags `qt.study.merged_from` (the
source) and `qt.study.source_run` (its id there) say where it came from. Artifacts stay where
they are (checkpoints are not copied). Everything is checked before anything is written, and a
copy that fails part-way deletes the runs it created.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import mlflow
from mlflow.entities import Metric, Param

from qt.study import store
from qt.study.runner import lock_study
from qt.study.spec import StudyError

BATCH = {"metrics": 1000, "params": 100}  # MLflow's log_batch limits


def source_uri(source: str) -> str:
    """SOURCE as a tracking URI. A file (or a folder holding `mlflow.db`) must be an MLflow
    SQLite store, checked read-only: MLflow would otherwise create its tables in it."""
    if "://" in source and not source.startswith("sqlite:"):
        return source  # a tracking server: MLflow says itself when it cannot reach it
    path = Path(source.removeprefix("sqlite:///") if source.startswith("sqlite:") else source)
    if path.is_dir():
        path = path / "mlflow.db"
    expected = (
        "expected another machine's MLflow store: the path of its mlflow.db file (or of "
        "the folder holding it) or a tracking URI"
    )
    if not path.is_file():
        raise StudyError(f"merge source {source!r}: {expected}, and {str(path)!r} does not exist.")
    if not _is_mlflow_store(path):
        raise StudyError(f"merge source {source!r}: {expected}, and {str(path)!r} is not one.")
    return f"sqlite:///{path.resolve()}"


def _is_mlflow_store(path: Path) -> bool:
    try:
        with sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True) as con:
            names = {
                r[0] for r in con.execute("select name from sqlite_master where type = 'table'")
            }
    except sqlite3.DatabaseError:  # not SQLite at all
        return False
    return {"experiments", "runs", "metrics", "params", "tags"} <= names


def merge(name: str, source: str, save_dir: str = "runs") -> dict[str, int]:
    """Copy study `name`'s done jobs from `source` into the store under `save_dir`.

    Returns counts: `copied` jobs, `here` (done here already, left alone), `absent` (not done
    in the source either), `other` (finished fits in the source that are not jobs of this study,
    left there). Raises StudyError (one sentence) before writing anything when the source is
    not an MLflow store, does not hold the study, or holds none of its jobs.
    """
    study = store.study_from_store(name, save_dir)  # the study as it last ran here
    client, uri = store.client_for(study)
    src_uri = source_uri(source)
    if src_uri == uri:
        raise StudyError(f"merge source {source!r} is this study's own store ({uri}).")
    lock = lock_study(study)  # noqa: F841 (no `run` of the study here while runs are copied)
    src = mlflow.MlflowClient(src_uri)
    src_exp = src.get_experiment_by_name(study.experiment)
    if src_exp is None:
        raise StudyError(
            f"merge source {source!r} has no experiment {study.experiment!r}: it never ran study {name!r}."
        )
    keys = {job.key for job in study.jobs()}
    fits = {
        r.data.tags.get("qt.study.key", "?")
        for r in store.study_runs(src, src_exp.experiment_id, name)
        if r.data.tags.get("qt.study.kind") == "fit" and r.info.status == "FINISHED"
    }
    strangers = sorted(fits - keys)
    if fits and not fits & keys:
        raise StudyError(
            f"merge source {source!r} holds no finished fit of study {name!r} as it ran here (its "
            f"{len(fits)} have other keys, e.g. {', '.join(strangers[:3])}): the two machines "
            "ran different study files (config, overrides or test episodes), so nothing was merged."
        )

    exp_id = client.get_experiment_by_name(study.experiment).experiment_id
    parent = store.parent_run(client, exp_id, name)
    here = {s.job.key: s for s in store.job_states(client, exp_id, study)}
    there = store.job_states(src, src_exp.experiment_id, study)
    todo = [s for s in there if s.done and not here[s.job.key].done]
    counts = {
        "copied": len(todo),
        "here": sum(s.done for s in here.values()),
        "absent": sum(not s.done and not here[s.job.key].done for s in there),
        "other": len(strangers),
    }

    created: list[str] = []
    try:
        for state in todo:
            extra = {"mlflow.parentRunId": parent.info.run_id, "qt.study.merged_from": src_uri}
            fit_id = _copy_run(src, client, state.fit, exp_id, extra, created, finish=False)
            _copy_run(
                src, client, state.test, exp_id, {**extra, "qt.study.fit_run": fit_id}, created
            )
            # the fit is finished last: a merge killed before this leaves a RUNNING fit without
            # checkpoints, which `run` marks KILLED and starts afresh, and `merge` copies again
            client.set_terminated(fit_id, state.fit.info.status, end_time=state.fit.info.end_time)
    except BaseException:
        for run_id in created:  # a half-merged job would read as a fit to resume
            client.delete_run(run_id)
        raise
    return counts


def _copy_run(
    src, dst, run, exp_id: str, extra: dict, created: list[str], finish: bool = True
) -> str:
    tags = {k: v for k, v in run.data.tags.items() if k != "mlflow.runName"}
    tags.update(extra, **{"qt.study.source_run": run.info.run_id})
    new = dst.create_run(
        exp_id, start_time=run.info.start_time, tags=tags, run_name=run.info.run_name
    )
    run_id = new.info.run_id
    created.append(run_id)
    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), BATCH["params"]):
        dst.log_batch(run_id, params=params[i : i + BATCH["params"]])
    metrics = [
        Metric(m.key, m.value, m.timestamp, m.step)
        for key in run.data.metrics
        for m in src.get_metric_history(run.info.run_id, key)
    ]
    for i in range(0, len(metrics), BATCH["metrics"]):
        dst.log_batch(run_id, metrics=metrics[i : i + BATCH["metrics"]])
    if finish:
        dst.set_terminated(run_id, run.info.status, end_time=run.info.end_time)
    return run_id

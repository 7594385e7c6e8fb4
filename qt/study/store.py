"""What a study's MLflow store knows: its runs, each job's newest fit and test run, a fit's
evaluation history and a finished job's scores, and the study as it last ran. The runner reads
it to plan (what each job still needs), `merge` to copy what another store has done, and the
report to compute its numbers.

Scores are D4RL-normalised here, from the mean returns the runs logged and D4RL's published
reference returns of the task (`qt.tasks`), so that runs scored on another scale when they ran
(before the project used D4RL's references for generated datasets too) are read on one scale:
- best: the best evaluation score during the fit (the paper's protocol), the maximum over the
  fit run's `eval/return_mean` history;
- last: its last evaluation score;
- test: the `test/return_mean` of the test run of the fit's best checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np

from qt.study.spec import Job, Study, StudyError, load_study
from qt.tasks import get_task
from qt.tracking import default_tracking_uri


def client_for(study: Study):
    uri = default_tracking_uri(study.save_dir)
    return mlflow.MlflowClient(uri), uri


def study_runs(client, experiment_id: str, name: str) -> list:
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.study = '{name}'",
        max_results=50_000,
        order_by=["attributes.start_time DESC"],
    )


@dataclass
class JobState:
    """What MLflow knows of one job: its newest fit and test runs of the job's key."""

    job: Job
    fit: object | None = None  # mlflow Run
    test: object | None = None

    @property
    def fit_finished(self) -> bool:
        return self.fit is not None and self.fit.info.status == "FINISHED"

    @property
    def done(self) -> bool:
        return (
            self.fit_finished
            and self.test is not None
            and self.test.info.status == "FINISHED"
            and "test/return_mean" in self.test.data.metrics
        )


def job_states(client, experiment_id: str, study: Study) -> list[JobState]:
    runs = study_runs(client, experiment_id, study.name)
    states = []
    for job in study.jobs():
        mine = [r for r in runs if r.data.tags.get("qt.study.key") == job.key]
        fits = [r for r in mine if r.data.tags.get("qt.study.kind") == "fit"]
        tests = {
            r.data.tags.get("qt.study.fit_run"): r
            for r in reversed(mine)
            if r.data.tags.get("qt.study.kind") == "test" and r.info.status == "FINISHED"
        }
        finished = [r for r in fits if r.info.status == "FINISHED"]
        # a finished fit with a finished test if there is one (a job merged from another store
        # keeps its start time, so it may be older than a fit made here), else the newest
        # finished fit, else the newest fit (runs are newest first)
        fit = next((r for r in finished if r.info.run_id in tests), None)
        fit = fit or next(iter(finished), fits[0] if fits else None)
        states.append(JobState(job, fit, tests.get(fit.info.run_id) if fit else None))
    return states


def eval_history(client, run, task: str) -> tuple[np.ndarray, np.ndarray]:
    """(training steps, D4RL-normalised score) of a fit run of `task`, one point per evaluation.

    A resumed fit may log an iteration twice (killed after its evaluation was logged, before
    its last.ckpt was written); both values are the same, and the later one is kept.
    An evaluation is logged at step = steps trained - 1, at the end of a whole iteration, of one
    cut short by `trainer.max_time`, and across a resume alike (tests/end_to_end/test_fit.py,
    tests/end_to_end/test_faults.py pin this), so the metric's own step gives the training steps.
    """
    normalized = get_task(task).normalized_score
    returns = {
        m.step: m.value
        for m in sorted(
            client.get_metric_history(run.info.run_id, "eval/return_mean"),
            key=lambda m: m.timestamp,
        )
    }
    steps = sorted(returns)
    scores = [normalized(returns[s]) for s in steps]
    return np.array(steps, dtype=float) + 1, np.array(scores, dtype=float)


@dataclass
class Result:
    job: Job
    best: float
    last: float
    test: float
    steps: np.ndarray
    curve: np.ndarray
    params: dict
    seconds: float  # fit run + test run durations
    start_ms: int
    end_ms: int


def read_result(client, state: JobState) -> Result:
    steps, curve = eval_history(client, state.fit, state.job.task)
    fit, test = state.fit.info, state.test.info
    return Result(
        job=state.job,
        best=float(curve.max()),
        last=float(curve[-1]),
        test=get_task(state.job.task).normalized_score(state.test.data.metrics["test/return_mean"]),
        steps=steps,
        curve=curve,
        params=state.fit.data.params,
        seconds=((fit.end_time - fit.start_time) + (test.end_time - test.start_time)) / 1000,
        start_ms=min(fit.start_time, test.start_time),
        end_ms=max(fit.end_time, test.end_time),
    )


def parent_run(client, experiment_id: str, name: str):
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.study = '{name}' and tags.`qt.study.kind` = 'study'",
        order_by=["attributes.start_time ASC"],
        max_results=1,
    )
    return runs[0] if runs else None


def study_from_store(name: str, save_dir: str = "runs", results: str | None = None) -> Study:
    """The study a parent run was last started with (`study.json`, an artifact of the parent)."""
    uri = default_tracking_uri(save_dir)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(f"study-{name}")
    parent = None if exp is None else parent_run(client, exp.experiment_id, name)
    if parent is None:
        raise StudyError(
            f"no study named {name!r} in {uri}: run it first with `python -m qt.study run`."
        )
    # the study as it last ran: its file, and its jobs' keys (config files may have changed since)
    spec = json.loads(mlflow.artifacts.load_text(f"{parent.info.artifact_uri}/study.json"))
    study = load_study(Path(f"{name}.yaml"), check=False, text=spec["source"])
    study.name, study.config, study.save_dir = name, spec["config"], save_dir
    study.keys = spec["keys"]
    if results is not None:
        study.results = results
    return study

"""Running a study: one MLflow parent run, one job per (task, variant, seed), resumable.

A job is a process (`python -m qt.study.job`) that runs `qt fit` and `qt test` of the
fit's best checkpoint. Before anything starts, MLflow says what each job still needs:
nothing (its test run finished), the test (its fit finished), the fit resumed from its
`last.ckpt` in the same MLflow run (an interrupted fit), or everything.

Backends: `local` (default) keeps `workers` job processes running at once; `ray` submits each
job as a Ray task asking for `threads_per_worker` CPUs (and `gpus_per_worker` GPUs).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from pathlib import Path

from qt.checkpointing import LAST, checkpoint_dir
from qt.console import STATUS_ENV, status_line
from qt.runtime import start_module
from qt.study import store
from qt.study.report import report
from qt.study.spec import Study, StudyError
from qt.tracking import open_experiment, store_lock


def _say(message: str) -> None:
    print(f"[study] {message}", flush=True)


def _start(spec: dict, log: str, cwd: str) -> subprocess.Popen:
    """One job's process (qt.study.job), dying with this one."""
    spec = dict(spec, parent_pid=os.getpid())
    Path(_status_file(log)).unlink(missing_ok=True)
    status = {STATUS_ENV: _status_file(log)}  # the fit's progress, which `_local` shows
    return start_module(["qt.study.job", json.dumps(spec)], log, spec["threads"], cwd, status)


def run_job_process(spec: dict, cwd: str, log: str) -> tuple[int, float]:
    """Run one job process to its end; (exit status, seconds). The body of a Ray task."""
    t0 = time.perf_counter()
    returncode = _start(spec, log, cwd).wait()
    return returncode, time.perf_counter() - t0


# ---------------------------------------------------------------------------- the store
def open_store(study: Study):
    """The MLflow client, the study's experiment (created here, before any worker opens the
    store, so that workers never race on creating it) and the study's parent run."""
    Path(study.save_dir).mkdir(parents=True, exist_ok=True)
    uri = store.client_for(study)[1]
    location = None
    if uri.startswith("sqlite:///") and not os.environ.get("MLFLOW_TRACKING_URI"):
        location = (Path(study.save_dir).resolve() / "mlartifacts").as_uri()
    with store_lock(uri):  # the first use of a fresh store creates its tables
        client = store.client_for(study)[0]
        experiment_id = open_experiment(client, study.experiment, location)
    spec = {"source": study.source, "config": study.config, "keys": [j.key for j in study.jobs()]}
    parent = store.parent_run(client, experiment_id, study.name)
    if parent is None:
        parent = client.create_run(
            experiment_id, run_name=study.name, tags={"study": study.name, "qt.study.kind": "study"}
        )
    else:
        client.update_run(parent.info.run_id, status="RUNNING")
    client.log_text(parent.info.run_id, json.dumps(spec, indent=1), "study.json")
    return client, uri, experiment_id, parent.info.run_id


def _spec(study: Study, state: store.JobState, experiment_id: str, parent_id: str) -> dict:
    job = state.job
    spec = {
        "fit_args": list(job.fit_args),
        "seed": job.seed,
        "run_name": job.run_name,
        "experiment": study.experiment,
        "experiment_id": experiment_id,
        "save_dir": study.save_dir,
        "threads": study.threads_per_worker,
        "test_episodes": study.test_episodes,
        "tags": {
            "study": study.name,
            "task": job.task,
            "variant": job.variant,
            "seed": str(job.seed),
            "qt.study.key": job.key,
            "mlflow.parentRunId": parent_id,
        },
    }
    if state.fit_finished:
        spec.update(fit_finished=True, fit_run_id=state.fit.info.run_id)
    elif state.fit is not None:
        run = state.fit.info
        last = checkpoint_dir(study.save_dir, experiment_id, run.run_id) / LAST
        if last.is_file():
            spec.update(fit_run_id=run.run_id, resume=str(last))
    return spec


def _plan(study: Study, client, experiment_id: str) -> list[store.JobState]:
    states = store.job_states(client, experiment_id, study)
    # Seed by seed (each seed's variants side by side): a study stopped part-way leaves whole
    # seeds, paired across variants, rather than every seed of the first variant alone.
    todo = (s for s in states if not s.done and study.runs_here(s.job))
    return sorted(todo, key=lambda s: study.seeds.index(s.job.seed))


# ---------------------------------------------------------------------------- progress
class Progress:
    def __init__(self, study: Study, client, todo: int, total: int) -> None:
        self.study, self.client = study, client
        self.todo, self.total, self.finished, self.times = todo, total, 0, []
        self.t0 = time.perf_counter()

    def job_done(
        self, state: store.JobState, rc: int, seconds: float, log: str, exp_id: str
    ) -> bool:
        self.finished += 1
        self.times.append(seconds)
        left = self.todo - self.finished
        workers = max(1, min(self.study.workers, left))
        eta = sum(self.times) / len(self.times) * -(-left // workers) if left else 0.0
        head = f"{self.finished}/{self.todo} {state.job.label}"
        tail = f"{seconds:.0f} s; {left} left, ETA {_minutes(eta)}"
        if rc != 0:
            _say(f"{head}: FAILED (exit {rc}; log {log}); {tail}")
            return False
        [now] = [s for s in store.job_states(self.client, exp_id, self.study) if s.job == state.job]
        if not now.done:
            _say(f"{head}: no finished test run in MLflow (log {log}); {tail}")
            return False
        r = store.read_result(self.client, now)
        _say(f"{head}: best {r.best:.1f}, last {r.last:.1f}, test {r.test:.1f}; {tail}")
        return True


STATUS_EVERY_S = 30.0  # how often the local backend shows its running fits' progress


def _status_file(log: str) -> str:
    return str(Path(log).with_suffix(".status.json"))


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


# ---------------------------------------------------------------------------- backends
def _local(study, units, todo, logs, progress, exp_id, threads: int) -> int:
    """Run the units (a job alone, or a pack of jobs) `study.workers` processes at a time."""
    pending = list(range(len(units)))
    running: dict[int, tuple[subprocess.Popen, float]] = {}
    failed = 0
    shown = time.monotonic()
    try:
        while pending or running:
            while pending and len(running) < study.workers:
                u = pending.pop(0)
                spec = dict(units[u].spec, threads=threads)
                running[u] = (_start(spec, logs[u], os.getcwd()), time.perf_counter())
            time.sleep(0.2)
            if time.monotonic() - shown >= STATUS_EVERY_S:  # each running fit's progress
                shown = time.monotonic()
                for u in running:
                    line = status_line(_status_file(logs[u]))
                    names = ", ".join(todo[i].job.label for i in units[u].indices)
                    _say(f"{names}: {line or 'running'}")
            for u, (proc, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[u]
                seconds = time.perf_counter() - t0
                for i in units[u].indices:  # a pack's members: each one's outcome in MLflow
                    rc = proc.returncode
                    if units[u].is_pack and rc in (0, 1):
                        rc = 0  # 1: some member failed its test; MLflow says which
                    failed += not progress.job_done(todo[i], rc, seconds, logs[u], exp_id)
    except KeyboardInterrupt:
        for proc, _ in running.values():
            proc.terminate()  # SIGTERM: the fit saves last.ckpt (qt.callbacks.sigterm.SaveOnSigterm)
        for proc, _ in running.values():
            proc.wait()
        raise
    return failed


def _ray(study, todo, specs, logs, progress, exp_id, address: str | None) -> int:
    try:
        import ray
    except ImportError:
        raise SystemExit(
            "error: --backend ray needs Ray: pip install -e '.[ray]' (or pip install ray)."
        ) from None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:  # a local instance with the CPUs the study's workers would use
        ray.init(
            num_cpus=study.workers * study.threads_per_worker,
            include_dashboard=False,
            log_to_driver=False,
        )
    try:
        task = ray.remote(
            num_cpus=study.threads_per_worker, num_gpus=study.gpus_per_worker, max_retries=0
        )(run_job_process)
        refs = {task.remote(specs[i], os.getcwd(), logs[i]): i for i in range(len(todo))}
        failed = 0
        while refs:
            [ready], _ = ray.wait(list(refs), num_returns=1)
            i = refs.pop(ready)
            try:
                rc, seconds = ray.get(ready)
            except ray.exceptions.RayError as err:
                _say(f"{todo[i].job.label}: Ray task failed ({type(err).__name__}; log {logs[i]})")
                rc, seconds = 1, 0.0
            failed += not progress.job_done(todo[i], rc, seconds, logs[i], exp_id)
        return failed
    finally:
        ray.shutdown()


def lock_study(study: Study):
    """One process per study at a time: the lock dies with its process, even by SIGKILL."""
    path = Path(study.save_dir) / f".study-{study.name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a")  # noqa: SIM115 (held until this process ends)
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StudyError(
            f"study {study.name!r} is already running in another process (it holds {path}): "
            "wait for it, or stop it and run the study again to resume."
        ) from None
    return handle


def _close_stale_runs(client, exp_id: str, study: Study, specs: list[dict]) -> None:
    """Runs left RUNNING by a killed study (none can be alive: this process holds the study's
    lock) are marked KILLED, except the fits about to be resumed; with `--seeds`, only runs of
    the seeds run here (a shared tracking server may hold other machines' live runs)."""
    resumed = {spec.get("fit_run_id") for spec in specs if "resume" in spec}
    mine = {j.key for j in study.jobs_here()}  # other seeds: other machines'
    for run in store.study_runs(client, exp_id, study.name):
        kind = run.data.tags.get("qt.study.kind")
        if (
            kind in ("fit", "test")
            and run.info.status == "RUNNING"
            and run.info.run_id not in resumed
            and run.data.tags.get("qt.study.key") in mine
        ):
            client.set_terminated(run.info.run_id, "KILLED")


# ---------------------------------------------------------------------------- entry point
def run(
    study: Study,
    backend: str = "local",
    address: str | None = None,
    pack: bool | None = None,
    pack_limit: int | None = None,
    compile: bool | None = None,
) -> int:
    """Run (or resume) the study. `pack`: compatible jobs' fits train as packs (local backend;
    `qt.study.packing`), at most `pack_limit` members each (None: where a GPU is,
    `packing.pack_by_default`); `compile`: the packs' step compiled (None: on a GPU only)."""
    lock = lock_study(study)  # noqa: F841 (held to the end of the process)
    client, uri, exp_id, parent_id = open_store(study)
    jobs = study.jobs_here()
    todo = _plan(study, client, exp_id)
    specs = [_spec(study, s, exp_id, parent_id) for s in todo]
    _close_stale_runs(client, exp_id, study, specs)
    resumed = sum("resume" in spec for spec in specs)
    tests_only = sum(s.fit_finished for s in todo)
    from qt.study import packing

    pack = (packing.pack_by_default() if pack is None else pack) and backend == "local"
    units = packing.plan(todo, specs, pack, pack_limit, _config_of)
    for unit in units:
        if unit.is_pack:
            unit.spec = {"pack": [specs[i] for i in unit.indices], "pack_dir": unit.pack_dir,
                         "resume": unit.resume, "experiment_id": exp_id,
                         "module_options": None if compile is None else {"compile": compile}}  # fmt: skip
        else:
            unit.spec = specs[unit.indices[0]]
    concurrent = min(study.workers, max(1, len(units)))
    threads = packing.threads_for(concurrent) if backend == "local" else study.threads_per_worker
    packs = [u for u in units if u.is_pack]
    _say(
        f"{study.name}: {len(study.jobs())} runs ({len(study.tasks)} tasks x {len(study.variants)} "
        f"variants x {len(study.seeds)} seeds){_here(study, len(jobs))}; {len(jobs) - len(todo)} finished, "
        f"{resumed} to resume from last.ckpt, {tests_only} to test, "
        f"{len(todo) - resumed - tests_only} to start; backend {backend}, "
        f"{concurrent} processes at once x {threads} threads"
        f"{_packs(packs)}; MLflow {uri}, "
        f"experiment {study.experiment}, parent run {parent_id}"
    )
    out = Path(study.results) / study.name
    logs = [
        str(out / "logs" / (f"pack-{Path(u.pack_dir).name}.log" if u.is_pack
                            else f"{todo[u.indices[0]].job.run_name}.log"))
        for u in units
    ]  # fmt: skip
    for u in units:
        if u.is_pack:
            names = ", ".join(todo[i].job.label for i in u.indices)
            _say(
                f"pack {Path(u.pack_dir).name} ({'resumed from its last.ckpt' if u.resume else 'new'}): {names}"
            )
            continue
        s, spec = todo[u.indices[0]], specs[u.indices[0]]
        if "resume" in spec:
            _say(f"{s.job.label}: resuming fit run {spec['fit_run_id']} from {spec['resume']}")
    progress = Progress(study, client, len(todo), len(jobs))
    t0 = time.perf_counter()
    try:
        if backend == "ray":
            job_logs = [logs[k] for k, _ in enumerate(units)]
            failed = _ray(study, todo, specs, job_logs, progress, exp_id, address)
        else:
            failed = _local(study, units, todo, logs, progress, exp_id, threads)
    except KeyboardInterrupt:
        client.set_terminated(parent_id, "KILLED")
        _say("interrupted: running the same command again resumes the study.")
        return 130
    _say(f"jobs done in {_minutes(time.perf_counter() - t0)}; {failed} failed")
    result, path = report(study)
    print(result.markdown(), flush=True)
    _say(
        f"report: {path}/ (report.md, scores.json, learning_curves.png, intervals.png); "
        f"also artifacts of MLflow run {parent_id}"
    )
    missing = [j for j in result.missing if study.runs_here(j)]  # other seeds: other machines
    client.set_terminated(parent_id, "FAILED" if failed or missing else "FINISHED")
    return 1 if failed or missing else 0


def _packs(packs: list) -> str:
    if not packs:
        return ""
    sizes = ", ".join(str(len(u.indices)) for u in packs)
    return f"; {len(packs)} pack{'s' if len(packs) > 1 else ''} of {sizes} fits"


def _config_of(job):
    """A job's parsed fit config (the pack size follows from its sizes)."""
    from qt.study.spec import parse_fit

    return parse_fit(list(job.fit_args), job.label)


def _here(study: Study, n: int) -> str:
    if study.selected is None:
        return ""
    return f", {n} of them here (seeds {', '.join(map(str, study.selected))})"

"""MLflow tracking with a local store by default: no server needed to train.

`MLFLOW_TRACKING_URI`, when the user sets it, wins; otherwise runs go to a SQLite store
`<save_dir>/mlflow.db` with artifacts under `<save_dir>/mlartifacts` (MLflow 3 no longer
accepts a bare folder as a store). `make ui` serves the same store.

First use is safe when many processes start at once: MLflow creates a SQLite store's tables
(alembic migrations) and the experiment on first use, and two processes doing that together
break the store for good. Every process therefore opens the store (MLflow's client does on
construction), its experiment and its run while holding an exclusive lock on `<db>.lock`
beside the database; after that, SQLite's own locking is enough.

The experiment is tagged as a model-training experiment (`qt.ui.EXPERIMENT_KIND_TAG`), so
MLflow 3's UI opens it on its runs table.

A run is written by one process at a time: the process that creates or reopens it holds an
exclusive `flock` on `run.lock` in the run's folder (`<save_dir>/<experiment id>/<run id>/`)
until it exits, and writes its pid and host there. A second process that would write the same
run (two `--ckpt_path last` resumes started together) stops with one sentence naming the
holder. The kernel releases the lock when its holder dies, even by SIGKILL, so a dead holder
never keeps a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import mlflow
from lightning.pytorch.loggers import MLFlowLogger as _MLFlowLogger
from mlflow.exceptions import MlflowException

from qt.checkpointing import LAST, checkpoint_dir
from qt.errors import UserError
from qt.ui import EXPERIMENT_KIND_TAG


def default_tracking_uri(save_dir: str | os.PathLike = "runs") -> str:
    """The tracking URI in force: the user's `MLFLOW_TRACKING_URI`, else the local store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(save_dir).resolve() / 'mlflow.db'}"


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` URI (None for other stores or in-memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


@contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold an exclusive lock on a local SQLite store (`<db>.lock`); no-op for other stores."""
    db = _sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (first use by several processes is then unsafe)
        fcntl = None
    if db is None or fcntl is None:
        yield
        return
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def open_experiment(client, name: str, artifact_location: str | None = None) -> str:
    """The id of experiment `name` (created when missing, tagged as model training).

    Call it under `store_lock`: it is the first use of the store, which creates its tables.
    """
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage == "deleted":
        try:
            exp_id = client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:  # created meanwhile by another process (remote stores)
            found = client.get_experiment_by_name(name)
            if found is None:
                raise
            exp_id = found.experiment_id
        exp = client.get_experiment(exp_id)
    key, value = EXPERIMENT_KIND_TAG
    if exp.tags.get(key) != value:
        client.set_experiment_tag(exp.experiment_id, key, value)
    return exp.experiment_id


class RunHeldError(UserError):
    """Another live process is writing the run."""


RUN_LOCK = "run.lock"
_held: dict[Path, int] = {}  # lock file -> open descriptor, for the life of the process


def run_dir(save_dir: str | os.PathLike, experiment_id: str, run_id: str) -> Path:
    """The folder of a run's checkpoints and lock: `<save_dir>/<experiment id>/<run id>`."""
    return Path(save_dir) / str(experiment_id) / str(run_id)


def hold_run(folder: str | os.PathLike, run_id: str) -> None:
    """Hold the run whose folder is `folder` for the rest of this process (see the module's
    docstring); raise RunHeldError naming the holder when another live process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return

    path = (Path(folder) / RUN_LOCK).resolve()
    if path in _held:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = ""
        for _ in range(20):  # the holder writes its name just after it takes the lock
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip()
            if holder:
                break
            time.sleep(0.05)
        os.close(fd)
        pid, _, host = holder.partition(" ")
        who = f"process {pid} on {host}" if pid and host else "another process"
        raise RunHeldError(
            f"Run {run_id} is being written by {who} (it holds {path}): wait for that process "
            "to end or stop it, then resume the run; two processes never write one run."
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    _held[path] = fd


class MLFlowLogger(_MLFlowLogger):
    """Lightning's MLflow logger with qt's defaults (local store, experiment `qt`)."""

    def __init__(
        self,
        experiment_name: str = "qt",
        run_name: str | None = None,
        save_dir: str = "runs",
        tracking_uri: str | None = None,
        tags: dict[str, str] | None = None,
        log_model: bool = False,
        artifact_location: str | None = None,
        run_id: str | None = None,
    ) -> None:
        uri = tracking_uri or default_tracking_uri(save_dir)
        if (
            artifact_location is None
            and uri.startswith("sqlite:///")
            and not os.environ.get("MLFLOW_TRACKING_URI")
        ):
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            artifact_location = (Path(save_dir).resolve() / "mlartifacts").as_uri()
        with store_lock(uri):  # MLflow's client opens (and on first use creates) the store
            super().__init__(
                experiment_name=experiment_name,
                run_name=run_name,
                tracking_uri=uri,
                tags=tags,
                log_model=log_model,
                artifact_location=artifact_location,
                run_id=run_id,
            )
        self._qt_save_dir = save_dir

    @property
    def save_dir(self) -> str | None:
        return self._qt_save_dir

    def _hold(self, experiment_id: str) -> None:
        """Hold this run (`hold_run`) for as long as this process lives."""
        hold_run(run_dir(self._qt_save_dir, experiment_id, self._run_id), self._run_id)

    @property
    def experiment(self):
        if self._initialized:
            return self._mlflow_client
        # mlflow.set_tracking_uri, which Lightning's logger calls, also exports the URI as
        # MLFLOW_TRACKING_URI; put the variable back, so that a later logger in this process
        # (or a child process) honours only what the user set.
        before = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            with store_lock(self._tracking_uri):
                if self._run_id is None and self._experiment_id is None:
                    self._experiment_id = open_experiment(
                        self._mlflow_client, self._experiment_name, self._artifact_location
                    )
                reopened = self._run_id is not None
                if reopened:  # before anything is written to it
                    self._hold(self._mlflow_client.get_run(self._run_id).info.experiment_id)
                client = super().experiment
                if not reopened:
                    self._hold(self._experiment_id)
                if reopened and client.get_run(self._run_id).info.status != "RUNNING":
                    # a resumed fit continues a run that its interruption ended (FAILED or
                    # KILLED): it is running again until this fit ends it
                    client.update_run(self._run_id, status="RUNNING")
                return client
        finally:
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before


# ---------------------------------------------------------------------------- run identity
# Model options that change the algorithm (what is learnt, how it acts) or the network's shape.
# Two fits that differ in any of them are different variants: their runs are named and tagged
# apart, and `--ckpt_path last` never resumes one from the other. Options a user may change
# when continuing a run (learning rates, dropout, max_iters, ...) are not part of it.
VARIANT_OPTIONS = (
    "eta",
    "eta2",
    "lambda_",
    "discount",
    "k_rewards",
    "use_discount",
    "max_q_backup",
    "rtg_no_q",
    "infer_no_q",
    "num_candidates",
    "ema_dropout",
    "sar",
    "K",
    "hidden_size",
    "n_layer",
    "n_head",
)
# Options added later, with the value every earlier run had: they enter the hash only when they
# differ from it, so that runs made before they existed keep their variant ids.
LATER_VARIANT_OPTIONS = {"train_critic": True, "next_state_loss": True}
# Earlier names of a label: a run tagged `dt-<hash>` before the published Decision Transformer
# existed is the QT-without-Q ablation now called `qt-no-q` (docs/baselines.md).
LEGACY_LABELS = {"qt-no-q": "dt"}


def variant_label(model: dict) -> str:
    """What a model is, from what its settings do (docs/baselines.md): `dt`, the Decision
    Transformer as published (no critic trained: `train_critic` false); `qt`, Q in all three
    places QT puts it (the actor's loss: eta > 0; the return-to-go targets: not rtg_no_q;
    acting: not infer_no_q); `qt-no-q`, Q in none of them; else `qt-no-q-` and the places
    without it, e.g. `qt-no-q-loss-rtg` for eta 0 and rtg_no_q with Q still used in acting."""
    if not model.get("train_critic", True):
        return "dt"
    without = [
        place
        for place, off in (
            ("loss", float(model.get("eta", 1.0)) == 0.0),
            ("rtg", bool(model.get("rtg_no_q"))),
            ("acting", bool(model.get("infer_no_q"))),
        )
        if off
    ]
    if not without:
        return "qt"
    return "qt-no-q" if len(without) == 3 else "qt-no-q-" + "-".join(without)


# short forms of task names in run names, so the MLflow runs table shows the seed
_SHORT_TASK = (("maze2d-", "m2d-"), ("antmaze-", "ant-"), ("halfcheetah-", "cheetah-"),
               ("walker2d-", "walker-"), ("medium-replay", "mr"), ("medium-expert", "me"))  # fmt: skip


def run_name(task: str, seed: object, model: dict, kind: str = "") -> str:
    """A run's name, short enough for the runs table: `m2d-umaze/qt/s123` (task without its
    version, variant, seed); `kind` adds a suffix (`/test` for a test run)."""
    import re

    short = re.sub(r"-v\d+$", "", str(task))
    for long, abbrev in _SHORT_TASK:
        short = short.replace(long, abbrev)
    return f"{short}/{variant_label(model)}/s{seed}" + (f"/{kind}" if kind else "")


def _variant_hash(model: dict) -> str:

    values = {k: model.get(k) for k in VARIANT_OPTIONS}
    for k, default in LATER_VARIANT_OPTIONS.items():
        if model.get(k, default) != default:
            values[k] = model[k]
    for k, v in values.items():  # 1 and 1.0 are one value; bools stay bools
        if isinstance(v, int | float) and not isinstance(v, bool):
            values[k] = float(v)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:8]


def variant_id(model: dict) -> str:
    """`<label>-<8 hex digits>`: the label and a hash of every option in VARIANT_OPTIONS."""
    return f"{variant_label(model)}-{_variant_hash(model)}"


def legacy_variant_ids(model: dict) -> list[str]:
    """The ids the same model had under the labels' earlier names (`dt-<hash>` for `qt-no-q`)."""
    label = variant_label(model)
    # labels named by what the model does; these models were `qt` before
    old = LEGACY_LABELS.get(label, "qt" if label.startswith("qt-no-q-") else None)
    return [] if old is None else [f"{old}-{_variant_hash(model)}"]


def run_identity(task: str, seed: object, model: dict) -> str:
    """What makes two fits the same configuration: `<task>/<variant id>/seed<seed>`."""
    return f"{task}/{variant_id(model)}/seed{seed}"


def legacy_identities(task: str, seed: object, model: dict) -> list[str]:
    """Identities of the same configuration as runs made before a label was renamed carry."""
    return [f"{task}/{old}/seed{seed}" for old in legacy_variant_ids(model)]


IDENTITY_TAG = "qt.identity"


def run_tags(task: str, seed: object, model: dict, user_tags: dict | None = None) -> dict:
    """Tags of a run: `task`, `variant`, `seed` (a user's own tags of these names win) and
    `qt.variant_id`, `qt.identity` (always qt's: `--ckpt_path last` searches by them)."""
    tags = {"task": str(task), "variant": variant_label(model), "seed": str(seed)}
    tags.update({str(k): str(v) for k, v in (user_tags or {}).items()})
    tags["qt.variant_id"] = variant_id(model)
    tags[IDENTITY_TAG] = run_identity(task, seed, model)
    return tags


# ---------------------------------------------------------------------------- resuming
def resume_checkpoint(init_args, ckpt: str, named: bool, earlier: Sequence[str] = ()) -> str:
    """`--ckpt_path last` or `run:<run_id>`: the last.ckpt of an earlier MLflow run to continue.

    `last` is the newest run of the same configuration (task, variant, seed: the
    `qt.identity` tag; and the same run name when the config names the run) that left a
    last.ckpt; `run:<run_id>` is that run, which must be of the same configuration (`earlier`:
    the identities this configuration had under a variant's earlier name). Its run
    id goes to the logger, so the resumed fit logs into the same MLflow run and
    ModelCheckpoint keeps writing to the same folder (`<save_dir>/<experiment>/<run>/`).
    """
    save_dir = Path(init_args.get("save_dir") or "runs")
    uri = init_args.get("tracking_uri") or default_tracking_uri(save_dir)
    experiment = init_args.get("experiment_name") or "qt"
    identity, name = init_args["tags"][IDENTITY_TAG], init_args["run_name"]
    with store_lock(uri):
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)

    def last_of(run) -> Path:
        return checkpoint_dir(save_dir, run.info.experiment_id, run.info.run_id) / LAST

    if ckpt.startswith("run:"):
        run_id = ckpt[len("run:") :]
        try:
            run = client.get_run(run_id)
        except mlflow.exceptions.MlflowException:
            raise UserError(
                f"--ckpt_path {ckpt}: no run {run_id!r} in {uri}: expected the id of an "
                "earlier fit's MLflow run (the runs table of `make ui`, or the fit's last lines)."
            ) from None
        if exp is None or run.info.experiment_id != exp.experiment_id:
            theirs_exp = client.get_experiment(run.info.experiment_id).name
            raise UserError(
                f"--ckpt_path {ckpt}: that run is in experiment {theirs_exp!r}, but this fit "
                f"logs to experiment {experiment!r} (trainer.logger.init_args.experiment_name): "
                f"expected a run of the same experiment (set experiment_name {theirs_exp} to "
                "resume it there)."
            )
        theirs = run.data.tags.get(IDENTITY_TAG)
        if theirs != identity and theirs not in earlier:
            raise UserError(
                f"--ckpt_path {ckpt}: that run is {theirs or 'not a qt fit'}, this config "
                f"is {identity}: expected a run of the same task, variant and seed."
            )
        if not last_of(run).is_file():
            raise UserError(
                f"--ckpt_path {ckpt}: the run left no {last_of(run)}: expected the "
                "last.ckpt of a fit that ran at least one iteration."
            )
        hold_run(last_of(run).parents[1], run.info.run_id)  # one writer per run
        init_args["run_id"] = run.info.run_id
        return str(last_of(run))

    runs = []
    for each in (identity, *earlier):
        query = f"tags.`{IDENTITY_TAG}` = '{each}'"
        if named:
            query += f" and tags.mlflow.runName = '{name}'"
        runs += (
            []
            if exp is None
            else client.search_runs(
                [exp.experiment_id],
                filter_string=query,
                order_by=["attributes.start_time DESC"],
                max_results=50,
            )
        )
    runs.sort(key=lambda run: run.info.start_time, reverse=True)
    for run in runs:
        if last_of(run).is_file():
            hold_run(last_of(run).parents[1], run.info.run_id)  # one writer per run
            init_args["run_id"] = run.info.run_id
            return str(last_of(run))
    which = f"named {name!r} and " if named else ""
    raise UserError(
        f"--ckpt_path last: no run {which}of this configuration ({identity}) in "
        f"experiment {experiment!r} of {uri} left a last.ckpt under {save_dir}: expected an "
        "earlier fit of the same task, variant and seed (or name a run: --ckpt_path run:<run_id>)."
    )

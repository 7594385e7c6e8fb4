"""A study file: tasks x variants x seeds of `cli.py fit`, each followed by `cli.py test`.

```yaml
name: maze2d-umaze-cpu            # default: the file's stem; names the MLflow parent run
config: configs/demo.yaml         # the fit config (qt/configs/base.yaml is always read first)
tasks:                            # a list of task names, or task: {its own overrides}
  maze2d-umaze-v1: {data.path: data/d4rl/maze2d-umaze-sparse-v1.hdf5}
variants:                         # name: overrides of `cli.py fit` ({} = the config as is)
  qt: {}
  qt-no-q: {model.eta: 0, model.rtg_no_q: true, model.infer_no_q: true}
seeds: [0, 1, 2]
overrides: {trainer.max_epochs: 8}  # shared by every fit
workers: 2                        # fits at once (local backend)
threads_per_worker: 1             # torch/OMP/MKL threads of each fit (and Ray CPUs per fit)
test_episodes: 10                 # `cli.py test --episodes` of each best checkpoint
```

An override is `cli.py fit --KEY VALUE`; they apply in the order shared, task, variant. Every
(task, variant) combination is parsed by the real `cli.py` parser before anything runs.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from jsonargparse import Namespace, dict_to_namespace

from qt.cli import resolved_config
from qt.tasks import get_task

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
KEYS = {
    "name": "a name of letters, digits, '.', '_' or '-'",
    "config": "the path of a fit config",
    "tasks": "a list of task names or a mapping task: overrides",
    "variants": "a mapping variant: overrides",
    "seeds": "a list of distinct whole numbers",
    "overrides": "a mapping of `cli.py fit` keys to values",
    "workers": "a whole number >= 1",
    "threads_per_worker": "a whole number >= 1",
    "gpus_per_worker": "a number >= 0",
    "test_episodes": "a whole number >= 1",
    "bootstrap_reps": "a whole number >= 100",
    "save_dir": "the folder of the MLflow store and checkpoints",
    "results": "the folder that receives results/<name>/",
}
# Keys the study sets itself: an override of them would silently break the bookkeeping.
RESERVED = ("seed_everything", "ckpt_path", "trainer.logger", "data.task", "episodes", "config")


class StudyError(SystemExit):
    """A bad study file: one sentence, raised before anything runs."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


@dataclass(frozen=True)
class Job:
    """One (task, variant, seed): a fit and a test of its best checkpoint."""

    task: str
    variant: str
    seed: int
    fit_args: tuple[str, ...]  # after `cli.py fit`, without the study's logger arguments
    key: str  # hash of everything that decides the result: a changed study is a new job

    @property
    def label(self) -> str:
        return f"{self.task} {self.variant} seed {self.seed}"

    @property
    def run_name(self) -> str:
        return f"{self.task}-{self.variant}-seed{self.seed}"


@dataclass
class Study:
    name: str
    tasks: dict[str, dict]
    variants: dict[str, dict]
    seeds: list[int]
    config: str | None = None
    overrides: dict = field(default_factory=dict)
    workers: int = 1
    threads_per_worker: int = 1
    gpus_per_worker: float = 0
    test_episodes: int = 10
    bootstrap_reps: int = 10_000
    save_dir: str = "runs"
    results: str = "results"
    source: str = ""  # the study file's text, kept with the parent run
    keys: list[str] | None = None  # the jobs' keys as the study last ran (a report by name)
    selected: list[int] | None = None  # `run --seeds`: the seeds this machine runs (None: all)

    @property
    def experiment(self) -> str:
        return f"study-{self.name}"

    def select_seeds(self, seeds: list[int]) -> None:
        """Run only `seeds` here; the study (its jobs, keys and report) stays the whole file's."""
        strangers = [s for s in seeds if s not in self.seeds]
        if strangers or len(set(seeds)) != len(seeds):
            raise StudyError(
                f"--seeds {' '.join(map(str, seeds))}: expected distinct seeds of the study "
                f"file's {self.seeds}."
            )
        self.selected = list(seeds)

    def runs_here(self, job: Job) -> bool:
        return self.selected is None or job.seed in self.selected

    def jobs_here(self) -> list[Job]:
        """The jobs of the seeds this machine runs (all of them without `select_seeds`)."""
        return [job for job in self.jobs() if self.runs_here(job)]

    def jobs(self) -> list[Job]:
        config_text = _config_text(self.config) if self.keys is None else ""
        keys = iter(self.keys or [])
        jobs = []
        for task, task_over in self.tasks.items():
            for variant, var_over in self.variants.items():
                args = fit_args(self, task, {**self.overrides, **task_over, **var_over})
                for seed in self.seeds:
                    what = json.dumps([args, seed, self.test_episodes, config_text])
                    key = hashlib.sha256(what.encode()).hexdigest()[:16]
                    if self.keys is not None:
                        key = next(keys)
                    jobs.append(Job(task, variant, seed, tuple(args), key))
        return jobs


def _config_text(config: str | None) -> str:
    return "" if config is None else Path(config).read_text()


def _value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def fit_args(study: Study, task: str, overrides: dict) -> list[str]:
    args = [] if study.config is None else ["--config", study.config]
    args += ["--data.task", task]
    for key, value in overrides.items():
        args += [f"--{key}", _value(value)]
    return args


def _mapping(value, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise StudyError(
            f"{where}: expected a mapping of `cli.py fit` keys to values, got {value!r}."
        )
    for key in value:
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
            raise StudyError(f"{where}: override key {key!r} is not a dotted `cli.py fit` key.")
        if any(key == r or key.startswith(r + ".") for r in RESERVED):
            raise StudyError(
                f"{where}: override {key!r} is set by the study itself (tasks, seeds, "
                "test_episodes and its MLflow runs); remove it."
            )
    return dict(value)


def _whole(data: dict, key: str, default, least: float, kind=int):
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise StudyError(f"study key {key!r}: expected {KEYS[key]}, got {value!r}.")
    if value < least:
        raise StudyError(f"study key {key!r}: expected {KEYS[key]}, got {value!r}.")
    return value


def _resolve(path: str, base: Path) -> str:
    """A path as written if it exists from here, else relative to the study file."""
    for candidate in (Path(path), base / path):
        if candidate.exists():
            return str(candidate)
    return path


def load_study(path: str | Path, check: bool = True, text: str | None = None) -> Study:
    """Read and validate a study file; `check` also parses every combination with cli.py.

    `text`: the file's content when it is not read from `path` (a study kept in MLflow).
    """
    path = Path(path)
    if text is None:
        if not path.is_file():
            raise StudyError(f"study file {path} does not exist.")
        text = path.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        first = str(err).splitlines()[0]
        raise StudyError(f"study file {path} is not valid YAML ({first}).") from None
    if not isinstance(data, dict):
        raise StudyError(f"study file {path}: expected a mapping with the keys {', '.join(KEYS)}.")
    for key in data:
        if key not in KEYS:
            raise StudyError(
                f"study file {path}: unknown key {key!r}; expected one of {', '.join(KEYS)}."
            )
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise StudyError(f"study key 'name': expected {KEYS['name']}, got {name!r}.")

    raw_tasks = data.get("tasks")
    if isinstance(raw_tasks, list):
        raw_tasks = {t: None for t in raw_tasks}
    if not isinstance(raw_tasks, dict) or not raw_tasks:
        raise StudyError(f"study key 'tasks': expected {KEYS['tasks']}, got {raw_tasks!r}.")
    tasks = {}
    for task, over in raw_tasks.items():
        try:
            get_task(task)
        except ValueError as err:
            raise StudyError(f"study key 'tasks': {err}") from None
        tasks[task] = _mapping(over, f"task {task!r}")

    raw_variants = data.get("variants")
    if not isinstance(raw_variants, dict) or not raw_variants:
        raise StudyError(
            f"study key 'variants': expected {KEYS['variants']}, got {raw_variants!r}."
        )
    variants = {}
    for variant, over in raw_variants.items():
        if not isinstance(variant, str) or not _NAME.match(variant):
            raise StudyError(
                f"variant name {variant!r}: expected letters, digits, '.', '_' or '-'."
            )
        variants[variant] = _mapping(over, f"variant {variant!r}")

    seeds = data.get("seeds")
    if (
        not isinstance(seeds, list)
        or not seeds
        or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds)
        or len(set(seeds)) != len(seeds)
    ):
        raise StudyError(f"study key 'seeds': expected {KEYS['seeds']}, got {seeds!r}.")

    config = data.get("config")
    if config is not None:
        if not isinstance(config, str) or (
            check and not Path(_resolve(config, path.parent)).is_file()
        ):
            raise StudyError(f"study key 'config': {config!r} is not a file.")
        config = _resolve(config, path.parent)
    for key in ("save_dir", "results"):
        if key in data and not isinstance(data[key], str):
            raise StudyError(f"study key {key!r}: expected {KEYS[key]}, got {data[key]!r}.")

    study = Study(
        name=name,
        tasks=tasks,
        variants=variants,
        seeds=list(seeds),
        config=config,
        overrides=_mapping(data.get("overrides"), "shared overrides"),
        workers=_whole(data, "workers", 1, 1),
        threads_per_worker=_whole(data, "threads_per_worker", 1, 1),
        gpus_per_worker=_whole(data, "gpus_per_worker", 0, 0, kind=float),
        test_episodes=_whole(data, "test_episodes", 10, 1),
        bootstrap_reps=_whole(data, "bootstrap_reps", 10_000, 100),
        save_dir=data.get("save_dir", "runs"),
        results=data.get("results", "results"),
        source=text,
    )
    if check:
        check_with_cli(study)
    return study


def check_with_cli(study: Study) -> None:
    """Parse every (task, variant) with cli.py's own parser, instantiating nothing."""
    for task, task_over in study.tasks.items():
        for variant, var_over in study.variants.items():
            args = fit_args(study, task, {**study.overrides, **task_over, **var_over})
            config = parse_fit(args, f"task {task!r}, variant {variant!r}")
            data = config.data
            if data.source == "d4rl-hdf5" and data.path and not Path(data.path).exists():
                raise StudyError(
                    f"task {task!r}, variant {variant!r}: data.path {data.path} does not exist "
                    "(generate it with `python -m qt.datagen`)."
                )


def parse_fit(args: list[str], where: str) -> Namespace:
    """`cli.py fit ARGS` resolved by the real parser (nothing instantiated or run)."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            config = resolved_config(["fit", *args])
    except SystemExit:
        text = err.getvalue()
        message = text.rsplit("error:", 1)[-1] if "error:" in text else text
        lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
        reason = " ".join(lines[:2]).split("; `", 1)[0].rstrip(".") or "rejected"
        raise StudyError(f"{where}: `cli.py fit` rejects the overrides: {reason}.") from None
    return dict_to_namespace(config)

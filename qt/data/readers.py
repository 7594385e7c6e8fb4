"""Dataset readers: D4RL hdf5 (h5py), Minari (local store) and the legacy `d4rl` package.

Each reader returns `Trajectories`: the kept trajectories of a dataset concatenated into flat
arrays with episode offsets, split exactly as docs/algorithm.md §1 (and the authors' conversion script)
say. Nothing here needs `gym`, `mujoco-py` or `d4rl` except `read_d4rl_package`, which imports
them lazily and explains what is missing when they cannot be imported.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from qt.data.paths import DATA_DIR_ENV, hdf5_dir, minari_dir
from qt.errors import MissingInputError, UserError
from qt.tasks import Task, get_task

D4RL_KEYS = ("observations", "actions", "rewards", "terminals")
NO_TIMEOUTS_LIMIT = 1000  # without `timeouts`, a trajectory also ends after this many steps
log = logging.getLogger(__name__)


@dataclass
class Trajectories:
    """Trajectories of one dataset, concatenated.

    observations (N, S) float32, actions (N, A) float32, rewards (N,) float32 (as stored, no
    reward tuning), terminals (N,) float32; trajectory i is rows offsets[i]:offsets[i+1].
    `ref_min_score`/`ref_max_score` are the dataset's own reference returns when it carries
    them (datasets generated here do, as a check of the environment), else None; scores are
    always normalised by D4RL's published ones (`qt.tasks`).
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    offsets: np.ndarray
    source: str = ""
    ref_min_score: float | None = None
    ref_max_score: float | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1


def trajectory_ends(terminals: np.ndarray, timeouts: np.ndarray | None) -> np.ndarray:
    """Exclusive end index of every finished trajectory of a flat D4RL stream.

    A trajectory ends at each step flagged terminal or timeout. Without timeouts, the authors'
    conversion script also ends one when its step counter reaches 999; the counter restarts at
    1 (not 0) after each end, so the first such trajectory has 1000 steps and later ones 999.
    Steps after the last end are an unfinished trajectory and are not returned.
    """
    terminals = np.asarray(terminals).astype(bool)
    if timeouts is not None:
        return np.flatnonzero(terminals | np.asarray(timeouts).astype(bool)) + 1
    # A Python loop over terminals and cuts only (not over steps): between two terminals the
    # counter-driven ends are an arithmetic sequence. `counter` is the counter's value at `pos`.
    ends: list[int] = []
    pos, counter, n = 0, 0, len(terminals)
    for term in [*np.flatnonzero(terminals).tolist(), n]:
        while (cut := pos + (NO_TIMEOUTS_LIMIT - 1 - counter)) < term:
            ends.append(cut + 1)
            pos, counter = cut + 1, 1
        if term < n:
            ends.append(term + 1)
            pos, counter = term + 1, 1
    return np.asarray(ends, dtype=np.int64)


def split_d4rl(arrays: dict, source: str = "") -> Trajectories:
    """Flat D4RL arrays (`observations, actions, rewards, terminals`, optional `timeouts`) ->
    `Trajectories`, after checking keys, lengths, shapes and finiteness."""
    missing = [k for k in D4RL_KEYS if k not in arrays]
    if missing:
        raise UserError(
            f"Dataset {source} lacks the keys {missing}: expected at least {list(D4RL_KEYS)} "
            "(and optionally 'timeouts')."
        )
    obs = np.asarray(arrays["observations"], dtype=np.float32)
    act = np.asarray(arrays["actions"], dtype=np.float32)
    rew = np.asarray(arrays["rewards"], dtype=np.float32).reshape(-1)
    term = np.asarray(arrays["terminals"]).reshape(-1)
    timeouts = arrays.get("timeouts")
    timeouts = None if timeouts is None else np.asarray(timeouts).reshape(-1)
    n = len(rew)
    if obs.ndim != 2 or act.ndim != 2:
        raise UserError(
            f"Dataset {source} has observations of shape {obs.shape} and actions of shape "
            f"{act.shape}: expected 2-d arrays (steps, size)."
        )
    lens = {"observations": len(obs), "actions": len(act), "terminals": len(term)}
    if timeouts is not None:
        lens["timeouts"] = len(timeouts)
    bad = {k: v for k, v in lens.items() if v != n}
    if bad:
        raise UserError(f"Dataset {source}: arrays {bad} differ in length from rewards ({n}).")
    for name, a in (("observations", obs), ("actions", act), ("rewards", rew)):
        if not np.isfinite(a).all():
            row = int(np.flatnonzero(~np.isfinite(a.reshape(n, -1)).all(axis=1))[0])
            raise UserError(
                f"Dataset {source} has a non-finite value in '{name}' at step {row}: "
                "expected finite numbers."
            )
    ends = trajectory_ends(term, timeouts)
    if len(ends) == 0:
        raise UserError(
            f"Dataset {source} has no finished trajectory ({n} steps, no terminal or timeout): "
            "expected at least one."
        )
    if timeouts is None:
        # the authors' rule, but it cuts at every 1000 steps: a user whose file lost its
        # timeouts (or never had them) must know that the episodes are not the file's own
        log.warning(
            "Dataset %s has no 'timeouts': split at terminals and every %d steps (the D4RL "
            "conversion rule) into %d trajectories; add 'timeouts' to keep its own episodes.",
            source or "(arrays)",
            NO_TIMEOUTS_LIMIT,
            len(ends),
        )
    keep = int(ends[-1])
    return Trajectories(
        observations=obs[:keep],
        actions=act[:keep],
        rewards=rew[:keep],
        terminals=term[:keep].astype(np.float32),
        offsets=np.concatenate([[0], ends]).astype(np.int64),
        source=source,
    )


# ---------------------------------------------------------------------------- D4RL hdf5
def d4rl_dataset_dir() -> Path:
    """Where D4RL hdf5 files are looked up by name: $D4RL_DATASET_DIR, else ~/.d4rl/datasets."""
    env = os.environ.get("D4RL_DATASET_DIR")
    return Path(env).expanduser() if env else Path.home() / ".d4rl" / "datasets"


def resolve_d4rl_path(task: Task, path: str | os.PathLike | None) -> Path:
    """The hdf5 file of `task`: `path` itself (a file, or a directory holding the D4RL file
    name), else the D4RL file name in qt's data root (`<root>/d4rl`, see `qt.data.paths`),
    then in `d4rl_dataset_dir()`."""
    if path is None:
        places = [hdf5_dir(), d4rl_dataset_dir()]
        for place in places:
            if (place / task.dataset_file).is_file():
                return (place / task.dataset_file).resolve()
        raise MissingInputError(
            f"D4RL dataset file {task.dataset_file!r} for task {task.name!r} is in none of "
            f"{', '.join(str(p) for p in places)}: expected it in one of them (or give "
            f"data.path, or set {DATA_DIR_ENV}); generate it with "
            f"`python -m qt.datagen {task.name}`."
        )
    candidate = Path(path).expanduser()
    if candidate.is_dir():
        candidate = candidate / task.dataset_file
    if not candidate.is_file():
        raise MissingInputError(
            f"D4RL dataset file {candidate} for task {task.name!r} does not exist: expected the "
            f"D4RL hdf5 file {task.dataset_file!r} there (data.path)."
        )
    return candidate


def read_d4rl_hdf5(path: str | os.PathLike) -> Trajectories:
    """A D4RL-format hdf5 file -> `Trajectories` (extra keys are ignored)."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"Dataset file {path} is not a readable hdf5 file ({err}).") from None
    with f:
        arrays = {k: f[k][()] for k in (*D4RL_KEYS, "timeouts") if k in f}
        attrs = dict(f.attrs)
    traj = split_d4rl(arrays, source=str(path))
    if "ref_min_score" in attrs and "ref_max_score" in attrs:
        traj.ref_min_score = float(attrs["ref_min_score"])
        traj.ref_max_score = float(attrs["ref_max_score"])
    if "qt_metadata" in attrs:
        traj.metadata = json.loads(attrs["qt_metadata"])
    return traj


# ---------------------------------------------------------------------------- Minari
def minari_root() -> Path:
    """The local Minari store: $MINARI_DATASETS_PATH, else ~/.minari/datasets."""
    env = os.environ.get("MINARI_DATASETS_PATH")
    return Path(env).expanduser() if env else Path.home() / ".minari" / "datasets"


def read_minari(dataset_id: str, root: str | os.PathLike | None = None) -> Trajectories:
    """A Minari dataset of the local store -> `Trajectories`.

    Episodes are laid end to end as a flat D4RL stream (each episode's observations without
    its final one, `terminations` as terminals, `truncations` as timeouts) and split by the
    same rule as a D4RL file, so both formats of one dataset give the same trajectories.
    """
    import minari

    root = Path(root).expanduser() if root is not None else minari_root()
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        try:
            dataset = minari.load_dataset(dataset_id)
        except (FileNotFoundError, ValueError) as err:
            raise MissingInputError(
                f"Minari dataset {dataset_id!r} is not in the local store {root} ({err}): "
                "expected it there (set MINARI_DATASETS_PATH or data.path), or generate it with "
                "`python -m qt.datagen NAME`."
            ) from None
        parts: dict[str, list[np.ndarray]] = {k: [] for k in (*D4RL_KEYS, "timeouts")}
        for ep in dataset.iterate_episodes():
            if not isinstance(ep.observations, np.ndarray):
                raise UserError(
                    f"Minari dataset {dataset_id!r} has {type(ep.observations).__name__} "
                    "observations: expected flat array (Box) observations."
                )
            parts["observations"].append(ep.observations[:-1])
            parts["actions"].append(ep.actions)
            parts["rewards"].append(ep.rewards)
            parts["terminals"].append(ep.terminations)
            parts["timeouts"].append(ep.truncations)
        meta = dataset.storage.metadata
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    if not parts["rewards"]:
        raise UserError(f"Minari dataset {dataset_id!r} has no episodes: expected at least one.")
    traj = split_d4rl({k: np.concatenate(v) for k, v in parts.items()}, source=dataset_id)
    if meta.get("ref_min_score") is not None and meta.get("ref_max_score") is not None:
        traj.ref_min_score = float(meta["ref_min_score"])
        traj.ref_max_score = float(meta["ref_max_score"])
    if "qt_metadata" in meta:
        traj.metadata = json.loads(meta["qt_metadata"])
    return traj


# ---------------------------------------------------------------------------- d4rl package
def read_d4rl_package(name: str) -> Trajectories:
    """`gym.make(name).get_dataset()` of the legacy `d4rl` package -> `Trajectories`."""
    try:
        import d4rl  # noqa: F401
        import gym
    except Exception as err:  # ImportError, or mujoco-py failing to build or find MuJoCo 2.1
        raise ImportError(
            f"Source 'd4rl-package' needs the legacy packages gym, d4rl and mujoco-py with a "
            f"MuJoCo 2.1 binary, which cannot be imported here ({type(err).__name__}: {err}); "
            "use source 'd4rl-hdf5', which reads D4RL's hdf5 files with h5py and needs none "
            "of them."
        ) from None
    arrays = gym.make(name).get_dataset()
    return split_d4rl(arrays, source=f"d4rl:{name}")


SOURCES = ("d4rl-hdf5", "minari", "d4rl-package")


def read_task(task: str | Task, source: str = "d4rl-hdf5", path: str | None = None) -> Trajectories:
    """The dataset of `task` from `source`; `path` is the hdf5 file (or its directory) for
    d4rl-hdf5, the Minari dataset id or a Minari root directory for minari (default id
    `qt/<task>`), and unused for d4rl-package."""
    task = get_task(task) if isinstance(task, str) else task
    if source == "d4rl-hdf5":
        return read_d4rl_hdf5(resolve_d4rl_path(task, path))
    if source == "minari":
        if path is not None and Path(path).expanduser().is_dir():
            return read_minari(f"qt/{task.name}", root=path)
        dataset_id = path or f"qt/{task.name}"
        # qt's data root first, then Minari's own store
        for root in (minari_dir(), minari_root()):
            if (root / dataset_id).is_dir():
                return read_minari(dataset_id, root=root)
        raise MissingInputError(
            f"Minari dataset {dataset_id!r} is in none of {minari_dir()}, {minari_root()}: "
            f"expected it in one of them (or give data.path, or set {DATA_DIR_ENV}); generate "
            f"qt's with `python -m qt.datagen {task.name}`."
        )
    if source == "d4rl-package":
        return read_d4rl_package(task.name)
    raise UserError(f"Unknown data source {source!r}: expected one of {', '.join(SOURCES)}.")


__all__ = [
    "SOURCES",
    "Trajectories",
    "d4rl_dataset_dir",
    "minari_root",
    "read_d4rl_hdf5",
    "read_d4rl_package",
    "read_minari",
    "read_task",
    "resolve_d4rl_path",
    "split_d4rl",
    "trajectory_ends",
]

"""Writers for generated datasets: Minari (through Minari's own API) and D4RL-format hdf5.

Both are atomic: the dataset is written into a temporary sibling and renamed into place
only once complete, so a generation stopped at any point leaves no dataset that loads;
`write_dataset` writes both copies of one dataset and renames them into place together. The
temporary is named after the writing process (`.<name>.writing-<pid>-*`): the next write of
the same dataset removes those whose process is gone (a generation killed while writing). An
existing dataset is replaced only when `force=True` (the old one is kept until the new one
is in place).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np

import qt.envs.maze2d  # noqa: F401  (registers the maze ids)
from qt.datagen.generated import D4RL_KEYS, GeneratedDataset, arrays_digest, as_written
from qt.envs import make_env

AUTHOR = "qt"
AUTHOR_EMAIL = "qt@users.noreply.github.com"
CODE_PERMALINK = "https://github.com/qt-offline-rl/qt"
log = logging.getLogger(__name__)


def minari_id(name: str) -> str:
    """The Minari dataset id of a qt dataset: `qt/<name>`."""
    return f"qt/{name}"


def episode_bounds(terminals: np.ndarray, timeouts: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each episode: one ends at every step flagged terminal or timeout.

    Steps after the last flagged one form a trailing episode too (the writer keeps every
    step; readers drop unfinished trailing episodes as docs/algorithm.md §1 says).
    """
    ends = np.flatnonzero(np.asarray(terminals, bool) | np.asarray(timeouts, bool)) + 1
    n = len(terminals)
    if len(ends) == 0 or ends[-1] != n:
        ends = np.append(ends, n)
    starts = np.concatenate([[0], ends[:-1]])
    return [(int(s), int(e)) for s, e in zip(starts, ends) if e > s]


def _eval_env_spec(env_id: str) -> gym.envs.registration.EnvSpec | None:
    """The gymnasium spec of a qt task's evaluation env, when one can be had.

    Maze tasks have registered ids (`qt/maze2d-umaze-v1`); other families ask the env
    factory `qt.envs.make_env` (its env's spec, e.g. `Hopper-v4`). None when neither works:
    the dataset then names its task in the `qt_metadata` entry only.
    """
    try:
        return gym.spec(f"qt/{env_id}")
    except gym.error.Error:
        pass
    try:
        env = make_env(env_id)
    except (ImportError, ValueError, gym.error.Error):
        return None
    spec = env.spec
    env.close()
    return _serialisable(spec)


def _serialisable(spec: gym.envs.registration.EnvSpec | None):
    """`spec`, without the wrappers whose arguments Minari cannot store as JSON (a float32
    observation cast holds a function), or None when even that cannot be stored."""
    if spec is None:
        return None
    for candidate in (spec, dataclasses.replace(spec, additional_wrappers=())):
        try:
            candidate.to_json()
            return candidate
        except (TypeError, ValueError, gym.error.Error):
            continue
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_writes(parent: Path, name: str) -> list[Path]:
    """Remove `.<name>.writing-*` / `.<name>.old-*` left in `parent` by writes whose process
    is gone; return what was removed. One without a pid in its name (written before pids were
    recorded) counts as gone once it is an hour old."""
    removed = []
    for path in sorted(parent.glob(f".{name}.writing-*")) + sorted(parent.glob(f".{name}.old-*")):
        tail = path.name.split(".writing-" if ".writing-" in path.name else ".old-", 1)[1]
        pid_text = tail.split("-", 1)[0]
        try:
            live = _alive(int(pid_text))
        except ValueError:
            live = time.time() - path.stat().st_mtime < 3600
        if live:
            continue
        size = (
            sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            if path.is_dir()
            else path.stat().st_size
        )
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        log.warning("removed %s (%.0f MB), left by a stopped generation", path, size / 2**20)
        removed.append(path)
    return removed


@contextmanager
def _atomic_dir(final: Path, scratch_parent: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory in `scratch_parent` (outside any dataset root, on the same
    file system) and remove it when the caller fails; the caller moves its result into place."""
    if final.exists() and not force:
        raise FileExistsError(
            f"Dataset {final} already exists: pass force=True (--force) to replace it."
        )
    scratch_parent.mkdir(parents=True, exist_ok=True)
    remove_stale_writes(scratch_parent, final.name)
    if final.parent.is_dir():
        remove_stale_writes(final.parent, final.name)  # a swap stopped half-way
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.writing-{os.getpid()}-", dir=scratch_parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(src: Path, final: Path) -> None:
    """Rename src to final; an existing final is moved aside first and removed after."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(src, final)
    if old is not None and old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    elif old is not None:
        old.unlink()


def _minari_buffers(ds: GeneratedDataset) -> list:
    """`ds` as Minari episode buffers: episodes split at terminals|timeouts, each episode's
    final observation the stream's next one (the last one repeats when the stream ends)."""
    import minari

    obs = np.asarray(ds.arrays["observations"], dtype=np.float32)
    act = np.asarray(ds.arrays["actions"], dtype=np.float32)
    rew = np.asarray(ds.arrays["rewards"], dtype=np.float32)
    term = np.asarray(ds.arrays["terminals"], dtype=bool)
    tout = np.asarray(ds.arrays["timeouts"], dtype=bool)
    n = len(rew)
    buffers = []
    for k, (s, e) in enumerate(episode_bounds(term, tout)):
        nxt = obs[e] if e < n else obs[e - 1]
        buffers.append(
            minari.data_collector.EpisodeBuffer(
                id=k,
                observations=np.concatenate([obs[s:e], nxt[None]]),  # (T+1, S)
                actions=act[s:e],
                rewards=rew[s:e],
                terminations=term[s:e],
                truncations=tout[s:e],
                infos={},
            )
        )
    return buffers


def _build_minari(ds: GeneratedDataset, tmp: Path, root: Path, description: str | None) -> Path:
    """Write `ds` as Minari dataset `qt/<name>` under the scratch root `tmp`; return its folder."""
    import minari

    obs_shape = np.asarray(ds.arrays["observations"]).shape[1:]
    act_shape = np.asarray(ds.arrays["actions"]).shape[1:]
    spec = _eval_env_spec(ds.env_id)
    obs_space = gym.spaces.Box(-np.inf, np.inf, shape=obs_shape, dtype=np.float32)
    act_space = gym.spaces.Box(-1.0, 1.0, shape=act_shape, dtype=np.float32)
    meta = dict(ds.metadata, qt_task=ds.env_id)
    # Minari would estimate a missing ref_min_score itself; store both or neither
    has_no_refs = not (np.isfinite(ds.ref_min_score) and np.isfinite(ds.ref_max_score))
    text = description or (
        f"{ds.name}: generated by qt with {ds.algorithm_name}; evaluation env: qt task {ds.env_id}."
    )
    previous = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(tmp)
    try:
        dataset = minari.create_dataset_from_buffers(
            dataset_id=minari_id(ds.name),
            buffer=_minari_buffers(ds),
            env=spec,
            eval_env=spec,
            algorithm_name=ds.algorithm_name,
            author=AUTHOR,
            author_email=AUTHOR_EMAIL,
            code_permalink=CODE_PERMALINK,
            action_space=act_space,
            observation_space=obs_space,
            ref_min_score=None if has_no_refs else ds.ref_min_score,
            ref_max_score=None if has_no_refs else ds.ref_max_score,
            description=text,
        )
        dataset.storage.update_metadata({"qt_metadata": json.dumps(meta, sort_keys=True)})
    finally:
        if previous is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = previous
    (root / "qt").mkdir(parents=True, exist_ok=True)
    # Minari's namespace metadata, so `minari list local` shows the namespace
    ns_meta = tmp / "qt" / "namespace_metadata.json"
    if ns_meta.exists() and not (root / "qt" / ns_meta.name).exists():
        shutil.copy2(ns_meta, root / "qt" / ns_meta.name)
    return tmp / "qt" / ds.name


def write_minari(
    ds: GeneratedDataset,
    root: str | os.PathLike,
    *,
    force: bool = False,
    description: str | None = None,
) -> Path:
    """Write `ds` as the Minari dataset `qt/<name>` under the Minari root `root`; return its path."""
    return write_dataset(ds, root, None, force=force, description=description)[0]


def _hdf5_scratch(path: Path, force: bool) -> Path:
    """A fresh temporary file beside `path` (stale ones of stopped writes removed first)."""
    if path.exists() and not force:
        raise FileExistsError(
            f"Dataset file {path} already exists: pass force=True (--force) to replace it."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_writes(path.parent, path.name)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.writing-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    return Path(tmp_name)


def _build_hdf5(ds: GeneratedDataset, tmp: Path) -> None:
    """Write `ds` into the file `tmp` in D4RL's format (flat arrays; metadata as datasets)."""
    with h5py.File(tmp, "w") as f:
        for key, value in ds.arrays.items():
            # no timestamps in the objects' headers: the same arrays, the same file bytes
            f.create_dataset(
                key, data=as_written(key, value), compression="gzip", track_times=False
            )
        # D4RL files keep metadata as scalar datasets under metadata/; attrs for convenience
        for key, value in (
            ("name", ds.name),
            ("env_id", ds.env_id),
            ("ref_min_score", ds.ref_min_score),
            ("ref_max_score", ds.ref_max_score),
            ("algorithm_name", ds.algorithm_name),
        ):
            f.attrs[key] = value
            f[f"metadata/{key}"] = value
        f.attrs["qt_metadata"] = json.dumps(ds.metadata, sort_keys=True)
        f.attrs["qt_arrays_sha256"] = arrays_digest(ds.arrays)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; a dataset is not


def write_d4rl_hdf5(ds: GeneratedDataset, path: str | os.PathLike, *, force: bool = False) -> Path:
    """Write `ds` as a D4RL-format hdf5 file (flat arrays; reference scores as attributes)."""
    return write_dataset(ds, None, path, force=force)[1]


def write_dataset(
    ds: GeneratedDataset,
    minari_root: str | os.PathLike | None,
    hdf5_path: str | os.PathLike | None,
    *,
    force: bool = False,
    description: str | None = None,
) -> tuple[Path | None, Path | None]:
    """Write `ds` as a Minari dataset under `minari_root` and/or a D4RL hdf5 at `hdf5_path`
    (None: not that copy); return the two paths.

    Both copies are written in full to temporaries first and renamed into place one right
    after the other, so the two copies of one dataset are replaced together: a generation
    stopped while writing leaves the old pair (or nothing), never a new file beside an old one
    but for the instant between the two renames.
    """
    minari_final = None if minari_root is None else Path(minari_root) / "qt" / ds.name
    h5_final = None if hdf5_path is None else Path(hdf5_path)
    for final in (minari_final, h5_final):  # before minutes of writing, not after
        if final is not None and final.exists() and not force:
            raise FileExistsError(
                f"Dataset {final} already exists: pass force=True (--force) to replace it."
            )
    with ExitStack() as stack:
        built = []
        if minari_final is not None:
            root = Path(minari_root)
            tmp = stack.enter_context(_atomic_dir(minari_final, root.resolve().parent, force))
            built.append((_build_minari(ds, tmp, root, description), minari_final, tmp))
        if h5_final is not None:
            h5_tmp = _hdf5_scratch(h5_final, force)
            stack.callback(h5_tmp.unlink, missing_ok=True)  # gone once renamed; removed if not
            _build_hdf5(ds, h5_tmp)
            built.append((h5_tmp, h5_final, None))
        for src, final, _ in built:  # the two renames, back to back
            _swap_into_place(src, final)
        for _, _, scratch in built:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
    return minari_final, h5_final


__all__ = [
    "D4RL_KEYS",
    "episode_bounds",
    "minari_id",
    "remove_stale_writes",
    "write_d4rl_hdf5",
    "write_dataset",
    "write_minari",
]

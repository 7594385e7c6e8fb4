"""Readers: trajectory splitting as the authors' conversion script does it, the D4RL hdf5 and
Minari readers on files written here, and the clear errors of each."""

from __future__ import annotations

import builtins

import h5py
import numpy as np
import pytest

from qt.data import readers
from qt.data.readers import read_d4rl_hdf5, read_minari, read_task, split_d4rl, trajectory_ends
from qt.datagen import writers
from qt.datagen.generated import GeneratedDataset


def _reference_split(arrays: dict) -> list[dict]:
    """The authors' D4RL/create_dataset.py, written out step by step."""
    n = len(arrays["rewards"])
    use_timeouts = "timeouts" in arrays
    episode_step, paths, data = 0, [], {k: [] for k in readers.D4RL_KEYS}
    for i in range(n):
        done_bool = bool(arrays["terminals"][i])
        final = arrays["timeouts"][i] if use_timeouts else episode_step == 1000 - 1
        for k in data:
            data[k].append(arrays[k][i])
        if done_bool or final:
            episode_step = 0
            paths.append({k: np.array(v) for k, v in data.items()})
            data = {k: [] for k in readers.D4RL_KEYS}
        episode_step += 1
    return paths


def _random_arrays(n: int, seed: int, timeouts: bool, p_term: float = 0.001) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "observations": rng.normal(size=(n, 3)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": rng.random(n) < p_term,
    }
    if timeouts:
        arrays["timeouts"] = rng.random(n) < 0.01
    return arrays


def _check_same_as_reference(arrays: dict) -> None:
    traj = split_d4rl(arrays)
    paths = _reference_split(arrays)
    assert len(traj) == len(paths)
    for i, path in enumerate(paths):
        s, e = traj.offsets[i], traj.offsets[i + 1]
        for key, flat in (("observations", traj.observations), ("actions", traj.actions),
                          ("rewards", traj.rewards), ("terminals", traj.terminals)):  # fmt: skip
            np.testing.assert_array_equal(flat[s:e], path[key].astype(flat.dtype))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_without_timeouts_follows_the_reference_counter(seed):
    # 3500 steps, a few terminals: counter-driven ends (1000 steps, then 999) and terminals mix
    arrays = _random_arrays(3500, seed, timeouts=False)
    _check_same_as_reference(arrays)


def test_split_without_timeouts_on_hand_made_cases():
    term = np.zeros(2500, bool)
    # no terminal: ends after 1000 steps, then every 999 (the reference's counter restarts at 1)
    assert trajectory_ends(term, None).tolist() == [1000, 1999]
    term[9] = True  # a terminal at step 9 restarts the count: 999 more steps end at 1009+...
    assert trajectory_ends(term, None).tolist() == [10, 1009, 2008]
    term[:] = False
    term[999] = True  # terminal on the counter's own end: one trajectory, not two
    assert trajectory_ends(term, None).tolist() == [1000, 1999]


@pytest.mark.parametrize("seed", [0, 1])
def test_split_with_timeouts_follows_the_reference(seed):
    _check_same_as_reference(_random_arrays(2000, seed, timeouts=True, p_term=0.005))


def test_trailing_unfinished_steps_are_dropped():
    arrays = _random_arrays(50, 0, timeouts=True)
    arrays["terminals"][:] = False
    arrays["timeouts"][:] = False
    arrays["timeouts"][[9, 29]] = True
    traj = split_d4rl(arrays)
    assert traj.offsets.tolist() == [0, 10, 30] and len(traj.rewards) == 30


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("actions"), "lacks the keys ['actions']"),
        (lambda a: a.__setitem__("rewards", a["rewards"][:-1]), "differ in length from rewards"),
        (lambda a: a["observations"].__setitem__((7, 1), np.nan), "'observations' at step 7"),
        (lambda a: a["timeouts"].__setitem__(slice(None), False), "no finished trajectory"),
    ],
)
def test_bad_arrays_get_one_clear_sentence(change, message):
    arrays = _random_arrays(40, 0, timeouts=True, p_term=0.0)
    change(arrays)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        split_d4rl(arrays, source="x.hdf5")


def _generated(arrays: dict) -> GeneratedDataset:
    return GeneratedDataset(
        name="maze2d-umaze-v1", arrays=arrays, env_id="maze2d-umaze-v1", ref_min_score=1.5,
        ref_max_score=99.0, algorithm_name="test",
    )  # fmt: skip


def test_hdf5_and_minari_round_trips_give_the_same_trajectories(tmp_path):
    rng = np.random.default_rng(3)
    n = 300
    timeouts = np.zeros(n, bool)
    timeouts[[49, 120, 199]] = True
    terminals = np.zeros(n, bool)
    terminals[260] = True
    arrays = {
        "observations": rng.normal(size=(n, 4)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
        "rewards": (rng.random(n) < 0.1).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
    }
    ds = _generated(arrays)
    h5 = writers.write_d4rl_hdf5(ds, tmp_path / "d4rl" / "maze2d-umaze-sparse-v1.hdf5")
    writers.write_minari(ds, tmp_path / "minari")
    from_h5 = read_d4rl_hdf5(h5)
    from_minari = read_minari("qt/maze2d-umaze-v1", root=tmp_path / "minari")
    expected = split_d4rl(arrays)
    assert expected.offsets.tolist() == [0, 50, 121, 200, 261]  # the 39 steps after 260: dropped
    for traj in (from_h5, from_minari):
        for key in ("observations", "actions", "rewards", "terminals", "offsets"):
            np.testing.assert_array_equal(getattr(traj, key), getattr(expected, key))
        assert (traj.ref_min_score, traj.ref_max_score) == (1.5, 99.0)
    # and by task name, through the lookups of each source
    by_dir = read_task("maze2d-umaze-v1", "d4rl-hdf5", str(tmp_path / "d4rl"))
    by_root = read_task("maze2d-umaze-v1", "minari", str(tmp_path / "minari"))
    np.testing.assert_array_equal(by_dir.observations, by_root.observations)


def test_hdf5_lookup_by_name_and_extra_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    arrays = _random_arrays(30, 1, timeouts=True)
    arrays["timeouts"][:] = False
    arrays["timeouts"][[14, 29]] = True
    with h5py.File(tmp_path / "hopper_medium-v2.hdf5", "w") as f:
        for k, v in arrays.items():
            f[k] = v
        f["infos/qpos"] = np.zeros((30, 2))  # extra keys are ignored
        f["next_observations"] = arrays["observations"]
    traj = read_task("hopper-medium-v2")  # default source d4rl-hdf5, file from the env var
    assert traj.offsets.tolist() == [0, 15, 30] and traj.ref_min_score is None


def test_missing_files_and_sources_are_explained(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    with pytest.raises(
        FileNotFoundError, match=r"hopper_medium-v2\.hdf5.*python -m qt\.datagen hopper-medium-v2"
    ):
        read_task("hopper-medium-v2")
    (tmp_path / "hopper_medium-v2.hdf5").write_text("not hdf5")
    with pytest.raises(ValueError, match="is not a readable hdf5 file"):
        read_task("hopper-medium-v2")
    with pytest.raises(FileNotFoundError, match="is in none of"):
        read_task("hopper-medium-v2", "minari", "qt/nowhere")
    with pytest.raises(ValueError, match="Unknown data source 'zarr'"):
        read_task("hopper-medium-v2", "zarr")


def test_the_data_root_is_searched_first_and_named_when_empty(tmp_path, monkeypatch):
    root, d4rl_dir = tmp_path / "root", tmp_path / "d4rl-home"
    monkeypatch.setenv("QT_DATA_DIR", str(root))
    monkeypatch.setenv("D4RL_DATASET_DIR", str(d4rl_dir))
    with pytest.raises(FileNotFoundError) as err:
        read_task("hopper-medium-v2")
    assert str(root / "d4rl") in str(err.value) and str(d4rl_dir) in str(err.value)
    assert "QT_DATA_DIR" in str(err.value) and "\n" not in str(err.value)
    for place, n in ((d4rl_dir, 30), (root / "d4rl", 20)):  # D4RL's place, then qt's root
        arrays = _random_arrays(n, 1, timeouts=True)
        arrays["timeouts"][:] = False
        arrays["timeouts"][-1] = True
        place.mkdir(parents=True)
        with h5py.File(place / "hopper_medium-v2.hdf5", "w") as f:
            for k, v in arrays.items():
                f[k] = v
        assert read_task("hopper-medium-v2").offsets.tolist() == [0, n]  # qt's root wins


def test_a_file_without_timeouts_is_split_with_one_warning(caplog):
    arrays = _random_arrays(2500, 3, timeouts=False, p_term=0.0)
    with caplog.at_level("WARNING", logger="qt.data.readers"):
        traj = split_d4rl(arrays, source="d.hdf5")
    [record] = caplog.records
    message = record.getMessage()
    assert "d.hdf5 has no 'timeouts'" in message and "\n" not in message
    assert f"into {len(traj)} trajectories" in message and len(traj) == 2  # 1000 + 999 steps
    caplog.clear()
    split_d4rl(_random_arrays(2500, 3, timeouts=True), source="e.hdf5")
    assert not caplog.records


def test_d4rl_package_source_says_what_is_missing(monkeypatch):
    real_import = builtins.__import__

    def no_d4rl(name, *args, **kwargs):
        if name in ("d4rl", "gym", "mujoco_py"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_d4rl)
    with pytest.raises(ImportError, match="needs the legacy packages.*needs none of them"):
        read_task("hopper-medium-v2", "d4rl-package")

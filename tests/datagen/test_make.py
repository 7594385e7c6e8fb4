"""Writers and the `qt.datagen.make` CLI: Minari and D4RL-hdf5 round trips, atomicity, --force."""

import json
import os
import subprocess
import sys

import h5py
import numpy as np
import pytest

from qt.datagen import make, writers
from qt.datagen.generated import GeneratedDataset
from qt.datagen.maze2d import generate
from tests.support.minari_store import load as load_store


@pytest.fixture(scope="module")
def small():
    return generate("maze2d-umaze-v1", steps=2500, seed=1, ref_episodes=2, max_episode_steps=50)


def load(root, name="maze2d-umaze-v1"):
    return load_store(root, name)


def flat_from_minari(ds):
    keys = ("observations", "actions", "rewards", "terminations", "truncations")
    parts = {k: [] for k in keys}
    for ep in ds.iterate_episodes():
        assert len(ep.observations) == len(ep.rewards) + 1
        parts["observations"].append(ep.observations[:-1])
        for k in keys[1:]:
            parts[k].append(getattr(ep, k))
    return {k: np.concatenate(v) for k, v in parts.items()}


def test_episode_bounds_against_a_loop():
    rng = np.random.default_rng(0)
    term, tout = rng.random(300) < 0.02, rng.random(300) < 0.03
    expect, start = [], 0
    for t in range(300):
        if term[t] or tout[t]:
            expect.append((start, t + 1))
            start = t + 1
    if start < 300:
        expect.append((start, 300))
    assert writers.episode_bounds(term, tout) == expect


def test_minari_round_trip(tmp_path, small):
    path = writers.write_minari(small, tmp_path / "minari")
    assert path == tmp_path / "minari" / "qt" / "maze2d-umaze-v1"
    ds = load(tmp_path / "minari")
    flat = flat_from_minari(ds)
    a = small.arrays
    np.testing.assert_array_equal(flat["observations"], a["observations"])
    np.testing.assert_array_equal(flat["actions"], a["actions"])
    np.testing.assert_array_equal(flat["rewards"], a["rewards"])
    np.testing.assert_array_equal(flat["terminations"], a["terminals"])
    np.testing.assert_array_equal(flat["truncations"], a["timeouts"])
    assert ds.total_steps == len(a["rewards"])
    assert ds.total_episodes == int(a["timeouts"].sum()) + (not a["timeouts"][-1])
    meta = ds.storage.metadata
    assert meta["ref_min_score"] == pytest.approx(small.ref_min_score)
    assert meta["ref_max_score"] == pytest.approx(small.ref_max_score)
    assert meta["algorithm_name"] == small.algorithm_name
    assert meta["author"] == {"qt"}
    assert json.loads(meta["qt_metadata"])["qt_task"] == "maze2d-umaze-v1"
    env = ds.recover_environment(eval_env=True)
    assert env.spec.max_episode_steps == 300 and env.observation_space.shape == (4,)
    # no scratch directories left beside or inside the root
    assert sorted(p.name for p in tmp_path.iterdir()) == ["minari"]


def test_d4rl_hdf5_round_trip(tmp_path, small):
    path = writers.write_d4rl_hdf5(small, tmp_path / "d4rl" / "maze2d-umaze-sparse-v1.hdf5")
    with h5py.File(path, "r") as f:
        for key, value in small.arrays.items():
            np.testing.assert_array_equal(f[key][()], value)
        assert f["terminals"].dtype == bool and f["timeouts"].dtype == bool
        assert f.attrs["ref_min_score"] == pytest.approx(small.ref_min_score)
        assert f["metadata/ref_max_score"][()] == pytest.approx(small.ref_max_score)
    assert os.listdir(tmp_path / "d4rl") == ["maze2d-umaze-sparse-v1.hdf5"]


def test_a_stopped_minari_write_leaves_nothing_that_loads(tmp_path, small, monkeypatch):
    from minari.dataset._storages import hdf5_storage

    real = hdf5_storage.HDF5Storage.update_episodes

    def crash(self, episodes):
        real(self, list(episodes)[:5])  # some episodes are on disk already
        raise KeyboardInterrupt("stopped")

    monkeypatch.setattr(hdf5_storage.HDF5Storage, "update_episodes", crash)
    with pytest.raises(KeyboardInterrupt):
        writers.write_minari(small, tmp_path / "minari")
    with pytest.raises(Exception):  # noqa: B017 (Minari raises its own errors)
        load(tmp_path / "minari")
    assert not (tmp_path / "minari" / "qt" / "maze2d-umaze-v1").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_stopped_hdf5_write_leaves_no_file(tmp_path, small, monkeypatch):
    calls = {"n": 0}
    real = h5py.Group.create_dataset

    def crash(self, name, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("stopped")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", crash)
    target = tmp_path / "x.hdf5"
    with pytest.raises(KeyboardInterrupt):
        writers.write_d4rl_hdf5(small, target)
    assert os.listdir(tmp_path) == []


def test_existing_datasets_are_replaced_only_with_force(tmp_path, small):
    root = tmp_path / "minari"
    writers.write_minari(small, root)
    other = GeneratedDataset(
        name=small.name,
        arrays={k: v[:100] for k, v in small.arrays.items()},
        env_id=small.env_id,
        ref_min_score=1.0,
        ref_max_score=2.0,
        algorithm_name="other",
    )
    with pytest.raises(FileExistsError, match="--force"):
        writers.write_minari(other, root)
    assert load(root).total_steps == 2500
    writers.write_minari(other, root, force=True)
    assert load(root).total_steps == 100
    h5 = tmp_path / "d.hdf5"
    writers.write_d4rl_hdf5(small, h5)
    with pytest.raises(FileExistsError, match="--force"):
        writers.write_d4rl_hdf5(other, h5)
    writers.write_d4rl_hdf5(other, h5, force=True)
    with h5py.File(h5, "r") as f:
        assert len(f["rewards"]) == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.hdf5", "minari"]


def test_cli_writes_both_formats_and_a_second_run_keeps_them(tmp_path, capsys):
    root = tmp_path / "data" / "minari"
    args = ["maze2d-umaze-v1", "--steps", "1500", "--out", str(root), "--ref-episodes", "2"]
    assert make.main(args) == 0
    captured = capsys.readouterr()
    assert "steps          1500" in captured.out
    # the references it measured, and D4RL's (d4rl/infos.py), by which scores are normalised
    assert "ref scores     measured: min " in captured.out
    assert "; scores use D4RL's 23.85 / 161.86" in captured.out
    # after the bar: what it is doing, line by line
    assert "reference scores: 2 episodes" in captured.err
    assert "writing Minari dataset qt/maze2d-umaze-v1" in captured.err
    assert "writing D4RL hdf5" in captured.err
    h5 = tmp_path / "data" / "d4rl" / "maze2d-umaze-sparse-v1.hdf5"  # written by default
    with h5py.File(h5, "r") as f:
        rewards = f["rewards"][()]
        timeouts = f["timeouts"][()]
    flat = flat_from_minari(load(root))
    np.testing.assert_array_equal(flat["rewards"], rewards)
    np.testing.assert_array_equal(flat["truncations"], timeouts)
    before = h5.stat().st_mtime_ns, (root / "qt" / "maze2d-umaze-v1").stat().st_mtime_ns
    # again (`make data` twice): nothing to do, nothing touched, success
    assert make.main(args) == 0
    assert "already there" in capsys.readouterr().out
    assert (h5.stat().st_mtime_ns, (root / "qt" / "maze2d-umaze-v1").stat().st_mtime_ns) == before
    # a missing format is written beside the one that is there, which is kept
    h5.unlink()
    assert make.main(args) == 0
    assert "wrote D4RL hdf5" in capsys.readouterr().out
    with h5py.File(h5, "r") as f:
        np.testing.assert_array_equal(f["rewards"][()], rewards)
    assert (root / "qt" / "maze2d-umaze-v1").stat().st_mtime_ns == before[1]
    assert make.main(["maze2d-huge-v1", "--out", str(root)]) == 2
    assert make.main(["ant-medium-v2", "--out", str(root)]) == 2


def test_the_default_root_is_qt_data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QT_DATA_DIR", str(tmp_path / "elsewhere"))
    assert make.main(["maze2d-umaze-v1", "--steps", "800", "--ref-episodes", "1"]) == 0
    assert (tmp_path / "elsewhere" / "d4rl" / "maze2d-umaze-sparse-v1.hdf5").is_file()
    assert (tmp_path / "elsewhere" / "minari" / "qt" / "maze2d-umaze-v1").is_dir()


def test_a_killed_generations_scratch_is_removed_by_the_next(tmp_path, small):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs
    root = tmp_path / "minari"
    stale_dir = tmp_path / f".maze2d-umaze-v1.writing-{dead.pid}-abc"
    (stale_dir / "qt" / "maze2d-umaze-v1" / "data").mkdir(parents=True)
    (stale_dir / "qt" / "maze2d-umaze-v1" / "data" / "main_data.hdf5").write_bytes(b"x" * 4096)
    live_dir = tmp_path / f".maze2d-umaze-v1.writing-{os.getpid()}-def"  # a write going on
    live_dir.mkdir()
    h5_dir = tmp_path / "d4rl"
    h5_dir.mkdir()
    stale_h5 = h5_dir / f".maze2d-umaze-sparse-v1.hdf5.writing-{dead.pid}-ghi"
    stale_h5.write_bytes(b"half")
    writers.write_minari(small, root)
    writers.write_d4rl_hdf5(small, h5_dir / "maze2d-umaze-sparse-v1.hdf5")
    assert not stale_dir.exists() and not stale_h5.exists()
    assert live_dir.is_dir()
    assert sorted(p.name for p in h5_dir.iterdir()) == ["maze2d-umaze-sparse-v1.hdf5"]


def test_extra_options_are_parsed_for_the_generators():
    assert make._parse_extra(["--sac-steps", "300000", "--lr", "3e-4", "--tag", "x", "--flag"]) == {
        "sac_steps": 300000,
        "lr": 3e-4,
        "tag": "x",
        "flag": True,
    }
    with pytest.raises(ValueError, match="expected --option"):
        make._parse_extra(["stray"])


def test_locomotion_names_go_to_the_locomotion_generator(tmp_path, monkeypatch, small):
    import sys
    import types

    seen = {}

    def fake_generate(name, *, steps, work_dir, seed, sac_steps=0):
        seen.update(name=name, steps=steps, work_dir=work_dir, seed=seed, sac_steps=sac_steps)
        return GeneratedDataset(
            name=name,
            arrays={k: v[:300] for k, v in small.arrays.items() if "/" not in k},
            env_id=name,
            ref_min_score=-20.0,
            ref_max_score=3234.3,
            algorithm_name="fake SAC",
        )

    module = types.ModuleType("qt.datagen.locomotion")
    module.generate = fake_generate
    monkeypatch.setitem(sys.modules, "qt.datagen.locomotion", module)
    import qt.datagen

    monkeypatch.setattr(qt.datagen, "locomotion", module, raising=False)
    root = tmp_path / "data" / "minari"
    argv = ["hopper-medium-v2", "--steps", "300", "--out", str(root), "--seed", "4"]
    assert make.main(argv + ["--sac-steps", "1000", "--work-dir", str(tmp_path / "w")]) == 0
    assert seen == dict(
        name="hopper-medium-v2", steps=300, work_dir=tmp_path / "w", seed=4, sac_steps=1000
    )
    assert load(root, "hopper-medium-v2").total_steps == 300
    assert make.main(argv + ["--force", "--bogus", "1"]) == 2  # option the generator lacks


def test_a_generated_name_that_is_not_a_registered_task_still_gets_its_summary(tmp_path, capsys):
    # maze2d-umaze-v0: D4RL's older name, which the generator makes but no task registers
    args = ["maze2d-umaze-v0", "--steps", "300", "--out", str(tmp_path / "minari"),
            "--ref-episodes", "1"]  # fmt: skip
    assert make.main(args) == 0
    out = capsys.readouterr().out
    assert "ref scores     measured: min " in out and "D4RL's" not in out


# ---------------------------------------------------------------------------- one dataset, two copies
def _copies(tmp_path):
    """The (Minari, hdf5) step counts on disk, None for a copy that is not there."""
    minari_dir = tmp_path / "minari" / "qt" / "maze2d-umaze-v1"
    h5 = tmp_path / "d4rl" / "maze2d-umaze-sparse-v1.hdf5"
    m = load(tmp_path / "minari").total_steps if minari_dir.exists() else None
    if h5.exists():
        with h5py.File(h5, "r") as f:
            return m, len(f["rewards"])
    return m, None


def _gen(tmp_path, *extra):
    return make.main(["maze2d-umaze-v1", "--out", str(tmp_path / "minari"), "--ref-episodes",
                      "1", *extra])  # fmt: skip


def test_a_request_of_another_size_or_seed_is_refused_without_force(tmp_path, capsys):
    assert _gen(tmp_path, "--steps", "600") == 0
    assert _copies(tmp_path) == (600, 600)
    capsys.readouterr()
    h5 = tmp_path / "d4rl" / "maze2d-umaze-sparse-v1.hdf5"
    assert _gen(tmp_path, "--steps", "900") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"error: maze2d-umaze-v1: the dataset on disk ({tmp_path / 'minari' / 'qt' / 'maze2d-umaze-v1'})"
        " holds 600 steps from seed 0, but this request is for 900 steps from seed 0: pass "
        "--force to replace it, or ask for what is there."
    ]
    # the default size (D4RL's 1,000,000 for umaze), as `make data` asks
    assert _gen(tmp_path) == 2
    assert "this request is for 1,000,000 steps from seed 0" in capsys.readouterr().err
    assert _gen(tmp_path, "--steps", "600", "--seed", "4") == 2
    assert "this request is for 600 steps from seed 4" in capsys.readouterr().err
    assert _copies(tmp_path) == (600, 600)  # nothing touched
    # the same request: nothing to do; --force: both copies replaced, both recording it
    assert _gen(tmp_path, "--steps", "600") == 0
    assert "already there" in capsys.readouterr().out
    assert _gen(tmp_path, "--steps", "900", "--force") == 0
    assert _copies(tmp_path) == (900, 900)
    with h5py.File(h5, "r") as f:
        assert json.loads(f.attrs["qt_metadata"])["request"] == {"steps": 900, "seed": 0}


def test_two_copies_that_disagree_are_named_and_replaced_together_with_force(tmp_path, capsys):
    assert _gen(tmp_path, "--steps", "600") == 0
    h5 = tmp_path / "d4rl" / "maze2d-umaze-sparse-v1.hdf5"
    # an hdf5 of another size beside the Minari copy (what a killed run used to leave)
    other = generate("maze2d-umaze-v1", steps=300, seed=0, ref_episodes=1)
    other.metadata["request"] = {"steps": 300, "seed": 0}
    writers.write_d4rl_hdf5(other, h5, force=True)
    capsys.readouterr()
    assert _gen(tmp_path, "--steps", "300") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "its two copies on disk disagree" in err
    assert f"{h5} holds 300 steps from seed 0" in err and "holds 600 steps from seed 0" in err
    assert _gen(tmp_path, "--steps", "300", "--force") == 0
    assert _copies(tmp_path) == (300, 300)


def test_a_generation_stopped_while_writing_the_hdf5_leaves_neither_copy(tmp_path, monkeypatch):
    def dies(ds, tmp):
        tmp.write_bytes(b"half an hdf5")
        raise KeyboardInterrupt

    monkeypatch.setattr(writers, "_build_hdf5", dies)
    with pytest.raises(KeyboardInterrupt):
        _gen(tmp_path, "--steps", "600")
    monkeypatch.undo()
    assert _copies(tmp_path) == (None, None)  # the Minari copy was not put in place alone
    assert not list((tmp_path / "d4rl").glob(".*")) and not list(tmp_path.glob(".maze2d*"))
    # rerun with another size: both copies of that size
    assert _gen(tmp_path, "--steps", "300") == 0
    assert _copies(tmp_path) == (300, 300)

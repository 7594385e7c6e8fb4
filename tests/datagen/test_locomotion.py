"""Locomotion datasets by D4RL's protocol, at tiny sizes: random actions, episode ends checked by
replaying them in the real environment, medium-replay against the SAC run it comes from,
resuming a stopped SAC run, the CLI's atomicity and the D4RL-hdf5 round trip."""

import h5py
import numpy as np
import pytest

from qt.datagen import locomotion as lg
from qt.datagen import make
from qt.datagen.generated import arrays_digest
from qt.datagen.writers import write_d4rl_hdf5
from qt.envs.locomotion import make_locomotion_env
from qt.tasks import get_task
from tests.support.minari_store import load

# A tiny SAC run: 50 random steps, then SB3 updates; stops at the first evaluation past 150
# steps (any return crosses the target), checkpoints about every 20 steps.
TINY = dict(
    sac_steps=1000,
    learning_starts=50,
    eval_every=150,
    eval_episodes=2,
    checkpoint_every=20,
    target_return=-1e9,
    progress=False,
)


def replay_episodes(family, arrays, seed, stream, cap):
    """Re-run every episode of a dataset in a fresh env from its reset seed, step by step;
    check observations, rewards and where the env itself ends each episode."""
    ends = np.flatnonzero(arrays["terminals"] | arrays["timeouts"])
    assert ends[-1] == len(arrays["rewards"]) - 1
    env = make_locomotion_env(family)
    start = 0
    for k, end in enumerate(ends):
        obs, _ = env.reset(seed=lg.episode_seed(seed, stream, k))
        for t in range(start, end + 1):
            np.testing.assert_allclose(arrays["observations"][t], obs, rtol=0, atol=1e-6)
            obs, reward, terminated, truncated, _ = env.step(arrays["actions"][t])
            assert arrays["rewards"][t] == pytest.approx(reward, abs=1e-5)
            if t < end:
                assert not terminated, f"episode {k} went on after the env terminated at {t}"
        length = end + 1 - start
        assert arrays["terminals"][end] == terminated
        if arrays["timeouts"][end]:
            last = end == len(arrays["rewards"]) - 1  # the cut of the dataset size
            assert not terminated and (length == cap or last), (k, length)
        assert not (arrays["terminals"][end] and arrays["timeouts"][end])
        start = end + 1
    env.close()
    return len(ends)


def test_random_dataset_shapes_uniform_actions_and_timeouts():
    ds = lg.generate(
        "halfcheetah-random-v2", steps=3000, seed=3, max_episode_steps=200, progress=False
    )
    a = ds.arrays
    assert a["observations"].shape == (3000, 17) and a["observations"].dtype == np.float32
    assert a["actions"].shape == (3000, 6) and a["rewards"].shape == (3000,)
    act = a["actions"]
    assert act.min() >= -1.0 and act.max() <= 1.0
    # U(-1, 1): mean 0 (s.e. 0.011), variance 1/3, each tenth of the box ~10% (s.e. 0.0055)
    assert np.abs(act.mean(axis=0)).max() < 0.05
    np.testing.assert_allclose(act.var(axis=0), 1 / 3, atol=0.03)
    counts = np.stack([np.histogram(act[:, j], bins=10, range=(-1, 1))[0] for j in range(6)])
    assert np.abs(counts / 3000 - 0.1).max() < 0.025
    # halfcheetah never terminates: a timeout every 200 steps, none elsewhere
    assert not a["terminals"].any()
    np.testing.assert_array_equal(np.flatnonzero(a["timeouts"]), np.arange(199, 3000, 200))
    assert (ds.ref_min_score, ds.ref_max_score) == (-280.178953, 12135.0)  # D4RL's, by hand
    again = lg.generate(
        "halfcheetah-random-v2", steps=3000, seed=3, max_episode_steps=200, progress=False
    )
    other = lg.generate("halfcheetah-random-v2", steps=300, seed=4, progress=False)
    np.testing.assert_array_equal(again.arrays["actions"], act)
    assert not np.allclose(other.arrays["actions"], act[:300])


def test_random_hopper_terminals_only_where_the_env_terminates():
    cap = 40
    ds = lg.generate(
        "hopper-random-v2", steps=1500, seed=0, max_episode_steps=cap, n_envs=5, progress=False
    )
    a = ds.arrays
    assert a["terminals"].sum() > 5 and a["timeouts"].sum() > 5  # both kinds of end occur
    replay_episodes("hopper", a, seed=0, stream="random", cap=cap)


def test_dataset_cut_at_the_size_ends_in_a_timeout():
    a = lg.generate("halfcheetah-random-v2", steps=250, seed=0, progress=False).arrays
    assert len(a["rewards"]) == 250
    np.testing.assert_array_equal(np.flatnonzero(a["timeouts"]), [249])  # 1000-step limit


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("work")
    replay = lg.generate("hopper-medium-replay-v2", seed=0, work_dir=work, **TINY)
    run = lg.SACRun(
        "hopper",
        work / "sac-medium-seed0",
        seed=0,
        budget=1000,
        target_return=-1e9,
        eval_every=150,
        eval_episodes=2,
        learning_starts=50,
        checkpoint_every=20,
        progress=False,
    )
    model, state = run.load_final()
    return work, replay, model, state


def test_medium_replay_is_the_replay_buffer_in_order(tiny_run):
    _, replay, model, state = tiny_run
    a, buf = replay.arrays, model.replay_buffer
    n = state["steps"]
    assert state["stop_reason"] == "target" and 150 <= n < 400
    assert len(a["rewards"]) == n == buf.pos == replay.metadata["medium_sac"]["sac_steps"]
    np.testing.assert_array_equal(a["observations"], buf.observations[:n, 0])
    np.testing.assert_array_equal(a["actions"], buf.actions[:n, 0])
    np.testing.assert_array_equal(a["rewards"], buf.rewards[:n, 0])
    # the buffer's transitions chain: next observation = following observation in an episode
    ends = a["terminals"] | a["timeouts"]
    inner = np.flatnonzero(~ends[:-1])
    np.testing.assert_array_equal(buf.next_observations[inner, 0], a["observations"][inner + 1])
    # ...and they are the env's own, episode by episode, in the order SAC collected them
    episodes = replay_episodes("hopper", a, seed=0, stream="sac", cap=1000)
    assert episodes == state["episodes"] == len(state["episode_returns"])
    np.testing.assert_allclose(
        np.add.reduceat(a["rewards"].astype(np.float64), np.r_[0, np.flatnonzero(ends)[:-1] + 1]),
        state["episode_returns"],
        rtol=1e-5,
    )


class Stop(Exception):
    pass


def test_resumed_generation_equals_an_uninterrupted_one(tmp_path, tiny_run):
    work, replay, _, _ = tiny_run
    whole = lg.generate("hopper-medium-v2", steps=400, seed=0, work_dir=work, **TINY)

    def stop(run, step):
        if step == 145:  # after SAC updates began and checkpoints were written
            raise Stop

    with pytest.raises(Stop):
        lg.generate("hopper-medium-v2", steps=400, seed=0, work_dir=tmp_path, on_step=stop, **TINY)
    steps_seen = []
    resumed = lg.generate(
        "hopper-medium-v2",
        steps=400,
        seed=0,
        work_dir=tmp_path,
        on_step=lambda run, step: steps_seen.append(step),
        **TINY,
    )
    assert 51 < steps_seen[0] <= 145  # resumed from a checkpoint after updates began
    for key, value in whole.arrays.items():
        np.testing.assert_array_equal(resumed.arrays[key], value, err_msg=key)
    resumed_replay = lg.generate("hopper-medium-replay-v2", seed=0, work_dir=tmp_path, **TINY)
    for key, value in replay.arrays.items():
        np.testing.assert_array_equal(resumed_replay.arrays[key], value, err_msg=key)


def test_other_settings_for_a_stored_run_are_refused(tiny_run):
    work = tiny_run[0]
    with pytest.raises(ValueError, match="other settings"):
        lg.generate(
            "hopper-medium-v2", steps=10, seed=0, work_dir=work, **dict(TINY, eval_every=300)
        )


def test_stopped_cli_generation_leaves_nothing_that_loads(tmp_path, monkeypatch, tiny_run):
    work = tiny_run[0]
    root = tmp_path / "minari"
    argv = [
        "hopper-medium-v2",
        "--steps",
        "200",
        "--out",
        str(root),
        "--d4rl-hdf5",
        "--work-dir",
        str(work),
        "--sac-steps",
        "1000",
        "--learning-starts",
        "50",
        "--eval-every",
        "150",
        "--eval-episodes",
        "2",
        "--checkpoint-every",
        "20",
        "--target-return",
        "-1e9",
        "--progress",
        "0",
    ]
    real_rollout = lg.rollout

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(lg, "rollout", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make.main(argv)
    assert not (root / "qt" / "hopper-medium-v2").exists()
    with pytest.raises(FileNotFoundError):
        load(root, "hopper-medium-v2")
    assert not (tmp_path / "d4rl").exists() or not any((tmp_path / "d4rl").iterdir())
    monkeypatch.setattr(lg, "rollout", real_rollout)
    assert make.main(argv) == 0
    assert load(root, "hopper-medium-v2").total_steps == 200


def test_d4rl_hdf5_round_trip(tmp_path):
    ds = lg.generate("walker2d-random-v2", steps=300, seed=1, max_episode_steps=60, progress=False)
    path = write_d4rl_hdf5(ds, tmp_path / "walker2d_random-v2.hdf5")
    with h5py.File(path, "r") as f:
        for key, value in ds.arrays.items():
            np.testing.assert_array_equal(f[key][()], value, err_msg=key)
        assert f["observations"].shape == (300, 17) and f["actions"].shape == (300, 6)
        assert f["terminals"].dtype == bool and f["timeouts"].dtype == bool
        task = get_task("walker2d-random-v2")
        assert f["metadata/ref_min_score"][()] == task.ref_min_score == 1.629008
        assert f["metadata/ref_max_score"][()] == task.ref_max_score == 4592.3


def test_bad_names_and_sizes_are_reported():
    with pytest.raises(ValueError, match="hopper-mediocre-v2"):
        lg.generate("hopper-mediocre-v2", steps=10)
    with pytest.raises(ValueError, match="positive"):
        lg.generate("hopper-random-v2", steps=0)


def test_medium_expert_is_medium_then_expert(tiny_run):
    work = tiny_run[0]
    kw = dict(TINY, expert_sac_steps=120)
    medium = lg.generate("hopper-medium-v2", steps=150, seed=0, work_dir=work, **kw)
    expert = lg.generate("hopper-expert-v2", steps=150, seed=0, work_dir=work, **kw)
    both = lg.generate("hopper-medium-expert-v2", steps=150, seed=0, work_dir=work, **kw)
    for key in medium.arrays:
        np.testing.assert_array_equal(
            both.arrays[key], np.concatenate([medium.arrays[key], expert.arrays[key]]), key
        )
    assert expert.metadata["expert_sac"]["sac_steps"] >= 120  # the whole budget was trained
    assert not np.allclose(medium.arrays["actions"], expert.arrays["actions"])


def test_two_generations_of_one_seed_write_the_same_bytes(tmp_path):
    """Deterministic for a seed: two independent medium-replay generations (each its own SAC
    run from scratch) write hdf5 files with the same bytes, and the arrays' digest that the
    summary prints is theirs; one changed value changes the digest."""
    flags = ["--sac-steps", "1000", "--learning-starts", "50", "--eval-every", "150",
             "--eval-episodes", "2", "--checkpoint-every", "20", "--target-return", "-1e9",
             "--progress", "0"]  # fmt: skip
    files = []
    for run in ("a", "b"):
        root = tmp_path / run / "minari"
        hdf5 = tmp_path / run / "hopper_medium_replay-v2.hdf5"
        argv = ["hopper-medium-replay-v2", "--out", str(root), "--hdf5-out", str(hdf5),
                "--work-dir", str(tmp_path / run / "work"), *flags]  # fmt: skip
        assert make.main(argv) == 0
        files.append(hdf5)
    first, second = (p.read_bytes() for p in files)
    assert first == second
    with h5py.File(files[0], "r") as f:
        arrays = {
            k: f[k][()] for k in ("observations", "actions", "rewards", "terminals", "timeouts")
        }
        stored = f.attrs["qt_arrays_sha256"]
    assert stored == arrays_digest(arrays)
    arrays["rewards"][3] += 1.0
    assert arrays_digest(arrays) != stored

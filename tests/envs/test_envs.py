"""Environment factories: sizes against the registry, D4RL layouts, time limits, seeding."""

from __future__ import annotations

import dataclasses
import sys
import types

import gymnasium as gym
import numpy as np
import pytest

from qt.envs import episode_limit, make_env, make_vector_env
from qt.tasks import get_task


@pytest.mark.parametrize(
    "name",
    ["hopper-medium-v2", "halfcheetah-medium-v2", "walker2d-medium-v2", "pen-human-v1",
     "hammer-human-v1", "door-human-v1", "relocate-human-v1", "antmaze-umaze-v0",
     "antmaze-large-diverse-v2", "maze2d-umaze-v1", "maze2d-large-dense-v1"],
)  # fmt: skip
def test_spaces_match_registry(name: str) -> None:
    task = get_task(name)
    env = make_env(name, seed=0)
    try:
        assert env.observation_space.shape == (task.state_dim,)
        assert env.action_space.shape == (task.act_dim,)
        obs, _ = env.reset(seed=3)
        assert obs.shape == (task.state_dim,) and obs.dtype == np.float32
        obs, reward, terminated, truncated, _ = env.step(np.zeros(task.act_dim, np.float32))
        assert obs.shape == (task.state_dim,) and obs.dtype == np.float32
        assert np.isfinite(obs).all() and np.isfinite(reward)
    finally:
        env.close()


# D4RL's registered max_episode_steps, typed out from its gym registrations.
_LIMITS = {
    "hopper-medium-v2": 1000, "walker2d-random-v2": 1000, "halfcheetah-expert-v2": 1000,
    "pen-human-v1": 100, "hammer-cloned-v1": 200, "door-expert-v1": 200, "relocate-human-v1": 200,
    "kitchen-mixed-v0": 280, "maze2d-open-v0": 150, "maze2d-umaze-v1": 300,
    "maze2d-medium-dense-v1": 600, "maze2d-large-v1": 800, "antmaze-umaze-v0": 700,
    "antmaze-umaze-diverse-v2": 700, "antmaze-medium-play-v0": 1000, "antmaze-large-diverse-v2": 1000,
}  # fmt: skip


def test_episode_limits_are_d4rls() -> None:
    for name, limit in _LIMITS.items():
        assert episode_limit(name) == limit, name


@pytest.mark.parametrize("name", ["pen-human-v1", "antmaze-umaze-v0"])
def test_time_limit_is_applied(name: str) -> None:
    env = make_env(name, seed=0)
    steps, done = 0, False
    while not done:
        _, _, terminated, truncated, _ = env.step(np.zeros(env.action_space.shape, np.float32))
        steps += 1
        done = terminated or truncated
    assert truncated and not terminated and steps == _LIMITS[name]


@pytest.mark.parametrize(
    "name, clip",
    [("hopper-medium-v2", True), ("halfcheetah-medium-v2", False), ("walker2d-medium-v2", True)],
)
def test_locomotion_observation_layout(name: str, clip: bool) -> None:
    # gym -v3 (what D4RL recorded): qpos without the x position, then qvel, clipped to
    # [-10, 10] for hopper and walker2d only.
    env = make_env(name, seed=0)
    rng = np.random.default_rng(0)
    env.reset(seed=1)
    for _ in range(20):
        obs, *_ = env.step(rng.uniform(-1, 1, env.action_space.shape).astype(np.float32))
    data = env.unwrapped.data
    qvel = np.clip(data.qvel, -10, 10) if clip else data.qvel
    np.testing.assert_allclose(obs, np.concatenate([data.qpos[1:], qvel]).astype(np.float32))


def test_seeded_envs_reproduce_and_differ() -> None:
    def rollout(seed: int) -> np.ndarray:
        env = make_env("hopper-medium-v2", seed=seed)
        obs, _ = env.reset(seed=seed)
        out = [obs]
        actions = np.random.default_rng(7).uniform(-1, 1, (10, 3)).astype(np.float32)
        for a in actions:
            out.append(env.step(a)[0])
        return np.stack(out)

    np.testing.assert_array_equal(rollout(5), rollout(5))
    assert not np.allclose(rollout(5), rollout(6))


def test_space_mismatch_is_one_clear_error() -> None:
    wrong = dataclasses.replace(get_task("hopper-medium-v2"), state_dim=12)
    with pytest.raises(ValueError, match=r"observation shape \(11,\).*expected \(12,\)"):
        make_env(wrong)


def test_maze2d_dispatch_passes_maze_and_reward(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake(maze: str, dense: bool = False, *, render_mode=None, max_episode_steps=None):
        calls.append((maze, dense))
        box = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
        env = gym.make("MountainCarContinuous-v0")
        env.observation_space, env.action_space = box, gym.spaces.Box(-1, 1, (2,), np.float32)
        return env

    monkeypatch.setitem(sys.modules, "qt.envs.maze2d", types.SimpleNamespace(make_maze2d_env=fake))
    for name in (
        "maze2d-umaze-v1",
        "maze2d-large-dense-v1",
        "maze2d-open-dense-v0",
        "maze2d-open-v0",
    ):
        make_env(name)
    assert calls == [("umaze", False), ("large", True), ("open", True), ("open", False)]


def test_vector_env_seeds_each_copy() -> None:
    venv = make_vector_env("hopper-medium-v2", 3, seeds=[1, 2, 1])
    obs, _ = venv.reset(seed=[1, 2, 1])
    assert obs.shape == (3, 11)
    np.testing.assert_array_equal(obs[0], obs[2])
    assert not np.allclose(obs[0], obs[1])
    venv.close()
    with pytest.raises(ValueError, match="num_envs is 0"):
        make_vector_env("hopper-medium-v2", 0)
    with pytest.raises(ValueError, match="seeds has 2 entries"):
        make_vector_env("hopper-medium-v2", 3, seeds=[1, 2])


def test_unknown_task_is_reported() -> None:
    with pytest.raises(ValueError, match="Unknown task 'hopper-medum-v2'"):
        make_env("hopper-medum-v2")


def test_pen_ends_when_the_pen_drops_as_in_d4rl() -> None:
    env = make_env("pen-human-v1", seed=0)
    raw = env.unwrapped
    rng = np.random.default_rng(0)
    ended_by_drop = 0
    for episode in range(4):
        env.reset(seed=episode)
        while True:
            _, _, terminated, truncated, _ = env.step(rng.uniform(-1, 1, 24).astype(np.float32))
            height = raw.data.xpos[raw.obj_body_id][2]
            assert terminated == bool(height < 0.075)  # D4RL pen_v0: done when obj z < 0.075
            if terminated or truncated:
                ended_by_drop += terminated
                break
    assert ended_by_drop > 0

"""AntMaze against D4RL: maze walls, ant physics, evaluation goals, sparse reward, resets."""

from __future__ import annotations

import numpy as np
import pytest

from qt.envs import make_env
from qt.envs.antmaze import sample_goal

# D4RL's *_TEST maps typed out as strings: '#' wall, 'R' reset (the origin), 'G' goal.
_UMAZE = ["#####", "#R..#", "###.#", "#G..#", "#####"]
# Goal cells in world coordinates (cell size 4, reset cell at the origin, column x, row y).
_GOAL_CELLS = {"umaze": (0.0, 8.0), "medium": (20.0, 20.0), "large": (32.0, 24.0)}
_NAMES = {
    "umaze": "antmaze-umaze-v0",
    "medium": "antmaze-medium-diverse-v0",
    "large": "antmaze-large-play-v0",
}


def _set_ant(env, xy, vel=None) -> None:
    ant = env.unwrapped.ant
    qpos, qvel = ant.data.qpos.copy(), np.zeros_like(ant.data.qvel)
    qpos[:2] = xy
    if vel is not None:
        qvel[:2] = vel
    ant.set_state(qpos, qvel)


def test_walls_sit_where_d4rl_puts_them() -> None:
    env = make_env("antmaze-umaze-v0")
    model = env.unwrapped.ant.model
    expected = {}
    for i, row in enumerate(_UMAZE):
        for j, c in enumerate(row):
            if c == "#":
                expected[f"block_{i}_{j}"] = ((j - 1) * 4.0, (i - 1) * 4.0, 1.0)
    names = {model.geom(k).name for k in range(model.ngeom)}
    assert {n for n in names if n.startswith("block_")} == set(expected)
    for name, pos in expected.items():
        np.testing.assert_allclose(model.geom(name).pos, pos)
        np.testing.assert_allclose(model.geom(name).size, (2.0, 2.0, 1.0))


def test_ant_physics_are_d4rls() -> None:
    ant = make_env("antmaze-umaze-v0").unwrapped.ant
    assert ant.model.opt.timestep == pytest.approx(0.02)
    assert ant.frame_skip == 5 and ant.dt == pytest.approx(0.1)
    np.testing.assert_allclose(ant.model.actuator_gear[:, 0], 30.0)
    np.testing.assert_allclose(ant.model.actuator_ctrlrange, np.tile([-1.0, 1.0], (8, 1)))
    torso = ant.model.geom("torso_geom")
    np.testing.assert_allclose(torso.solref, [0.02, 1.0])
    np.testing.assert_allclose(torso.solimp[:3], [0.8, 0.8, 0.01])


def test_wall_blocks_the_ant() -> None:
    env = make_env("antmaze-umaze-v0", seed=0)
    _set_ant(env, (0.0, 1.0), vel=(0.0, 8.0))  # towards the wall row at y in [2, 6]
    ys = [env.step(np.zeros(8, np.float32))[0][1] for _ in range(20)]
    _set_ant(env, (0.0, 0.0), vel=(8.0, 0.0))  # along the free corridor
    xs = [env.step(np.zeros(8, np.float32))[0][0] for _ in range(20)]
    assert max(ys) < 2.0 and max(xs) > 3.0


def test_observation_is_qpos_then_qvel_and_reset_near_origin() -> None:
    env = make_env("antmaze-medium-play-v0", seed=0)
    for seed in range(5):
        obs, _ = env.reset(seed=seed)
        data = env.unwrapped.ant.data
        np.testing.assert_allclose(obs, np.concatenate([data.qpos, data.qvel]).astype(np.float32))
        assert np.all(np.abs(obs[:2]) <= 0.1)  # D4RL: qpos + U(-0.1, 0.1)


@pytest.mark.parametrize("maze", ["umaze", "medium", "large"])
def test_goal_distribution(maze: str) -> None:
    goals = np.stack([sample_goal(maze, np.random.default_rng(s)) for s in range(400)])
    cell = np.array(_GOAL_CELLS[maze])
    # U(0, 1) + U(0, 0.5) per coordinate: support [0, 1.5), mean 0.75, variance 1/12 + 1/48.
    assert np.all(goals >= cell) and np.all(goals < cell + 1.5)
    np.testing.assert_allclose(goals.mean(0), cell + 0.75, atol=0.05)
    np.testing.assert_allclose(goals.var(0), 1 / 12 + 1 / 48, rtol=0.2)
    env = make_env(_NAMES[maze], seed=3)
    goal = env.unwrapped.goal
    assert np.all(goal >= cell) and np.all(goal < cell + 1.5)


def test_v0_keeps_its_goal_and_v2_redraws_it() -> None:
    v0 = make_env("antmaze-umaze-v0", seed=0)
    first = v0.unwrapped.goal.copy()
    for seed in (1, 2, 3):
        v0.reset(seed=seed)
        np.testing.assert_array_equal(v0.unwrapped.goal, first)
    v2 = make_env("antmaze-umaze-v2", seed=0)
    goals = []
    for seed in (1, 2, 3):
        _, info = v2.reset(seed=seed)
        goals.append(info["goal"])
    assert len({tuple(g) for g in goals}) == 3
    again = make_env("antmaze-umaze-v2", seed=0)
    np.testing.assert_array_equal(again.reset(seed=2)[1]["goal"], goals[1])


def test_sparse_reward_is_one_exactly_within_half_a_unit() -> None:
    env = make_env("antmaze-umaze-v2", seed=0)
    rng = np.random.default_rng(0)
    outcomes = []
    for _ in range(40):
        _, info = env.reset(seed=int(rng.integers(1 << 30)))
        goal = info["goal"]
        angle, radius = rng.uniform(0, 2 * np.pi), rng.uniform(0.35, 0.65)
        _set_ant(env, goal + radius * np.array([np.cos(angle), np.sin(angle)]))
        obs, reward, terminated, truncated, _ = env.step(np.zeros(8, np.float32))
        inside = float(np.linalg.norm(obs[:2].astype(np.float64) - goal) <= 0.5)
        # obs is float32; stay clear of rounding right at the boundary
        if abs(np.linalg.norm(obs[:2] - goal) - 0.5) > 1e-4:
            assert reward == inside and terminated == bool(inside) and not truncated
            outcomes.append(inside)
    assert 0 < sum(outcomes) < len(outcomes)  # both sides of the boundary were exercised
    _set_ant(env, goal + np.array([3.0, 0.0]))
    assert env.step(np.zeros(8, np.float32))[1] == 0.0

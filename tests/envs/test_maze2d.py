"""Maze2D env: spaces, time limits, seeded resets, D4RL's geometry, dynamics and reward."""

import math

import numpy as np
import pytest

from qt.envs.maze2d import LAYOUTS, Maze2DEnv, free_cells, make_maze2d_env

# D4RL's registered time limits and goal cells ('G' of each layout, row/column)
D4RL_LIMITS = {"open": 150, "umaze": 300, "medium": 600, "large": 800}
D4RL_GOALS = {"open": (2, 3), "umaze": (1, 1), "medium": (6, 6), "large": (7, 9)}


@pytest.mark.parametrize("maze", sorted(LAYOUTS))
def test_spaces_goal_and_time_limit(maze):
    env = make_maze2d_env(maze)
    assert env.observation_space.shape == (4,) and env.observation_space.dtype == np.float32
    assert env.action_space.shape == (2,)
    np.testing.assert_array_equal(env.action_space.low, [-1, -1])
    np.testing.assert_array_equal(env.action_space.high, [1, 1])
    np.testing.assert_array_equal(env.unwrapped.target, D4RL_GOALS[maze])
    obs, _ = env.reset(seed=3)
    assert obs.dtype == np.float32 and env.observation_space.contains(obs)
    # never terminates; truncated exactly at D4RL's limit
    for t in range(1, D4RL_LIMITS[maze] + 1):
        obs, reward, terminated, truncated, _ = env.step(np.zeros(2, np.float32))
        assert not terminated
        assert truncated == (t == D4RL_LIMITS[maze])
    assert make_maze2d_env(maze, max_episode_steps=7).spec.max_episode_steps == 7


def test_seeded_reset_and_reset_distribution():
    env = make_maze2d_env("medium")
    a, _ = env.reset(seed=11)
    b, _ = env.reset(seed=11)
    c, _ = env.reset(seed=12)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    cells = np.array(free_cells("medium"), dtype=float)
    walls = np.array([[ch == "#" for ch in row] for row in LAYOUTS["medium"]])
    assert len(cells) == (~walls).sum()
    seen = set()
    for seed in range(200):
        obs, _ = env.reset(seed=seed)
        d = np.abs(cells - obs[:2]).max(axis=1)
        assert d.min() <= 0.1 + 1e-6  # a free cell + U(-0.1, 0.1)
        seen.add(int(d.argmin()))
        assert np.abs(obs[2:]).max() < 0.6  # qvel ~ N(0, 0.1^2)
    assert len(seen) > len(cells) // 2


def test_dynamics_match_hand_integrated_point_mass():
    # sphere r=0.1, density 1000; force 100*a; damping 1 treated implicitly by Euler at h=0.01
    env = Maze2DEnv("open")
    env.reset(seed=0)
    mass, h, b = 1000 * 4 / 3 * math.pi * 0.1**3, 0.01, 1.0
    q, v = np.array([2.0, 3.0]), np.array([0.3, -0.2])
    env.set_state(q, v)
    rng = np.random.default_rng(0)
    for _ in range(20):
        a = rng.uniform(-1, 1, 2)
        obs, *_ = env.step(a)
        v = v + h * (100 * a - b * v) / (mass + h * b)
        q = q + h * v
        np.testing.assert_allclose(obs[:2], q, atol=1e-6)
        np.testing.assert_allclose(obs[2:], v, atol=1e-6)
    # actions are clipped to [-1, 1] and the velocity to [-5, 5]
    env.set_state(np.array([2.0, 3.0]), np.array([9.0, 0.0]))
    obs, *_ = env.step(np.array([30.0, 0.0]))
    expect = 5.0 + h * (100 * 1.0 - b * 5.0) / (mass + h * b)
    assert obs[2] == pytest.approx(expect, abs=1e-5)


def test_walls_sit_where_d4rl_puts_them():
    # D4RL: wall cell (i, j) is a box of half-size 0.5 at world (i+1, j+1); the body sits at
    # world (1.2, 1.2) + qpos, so a wall's face in qpos units is at i - 0.2 +- 0.5, and the
    # sphere (r 0.1) stops 0.1 before it.
    env = Maze2DEnv("umaze")
    env.reset(seed=0, options={"cell": (3, 1)})
    env.set_state(np.array([3.0, 1.0]), np.zeros(2))
    for _ in range(150):
        obs, *_ = env.step(np.array([-1.0, 0.0]))  # row 2, column 1 is a wall
    assert obs[0] == pytest.approx(2 - 0.2 + 0.5 + 0.1, abs=0.01)
    for _ in range(150):
        obs, *_ = env.step(np.array([0.0, -1.0]))  # column 0 is a wall
    assert obs[1] == pytest.approx(0 - 0.2 + 0.5 + 0.1, abs=0.01)


@pytest.mark.parametrize("dense", [False, True])
def test_reward_is_d4rl_reward_of_the_post_step_position(dense):
    env = make_maze2d_env("umaze", dense=dense)
    goal = np.array(D4RL_GOALS["umaze"], dtype=float)
    rng = np.random.default_rng(5)
    hits = 0
    for ep in range(4):
        env.reset(seed=ep, options={"cell": (1, 1 + ep % 3)})
        for _ in range(60):
            obs, reward, *_ = env.step(rng.uniform(-1, 1, 2).astype(np.float32))
            dist = math.dist(obs[:2].astype(float), goal)
            expect = math.exp(-dist) if dense else float(dist <= 0.5)
            assert reward == pytest.approx(expect, abs=1e-6)
            hits += dist <= 0.5
    assert hits > 0  # the check saw both rewarded and unrewarded steps


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="Unknown maze"):
        make_maze2d_env("huge")
    env = Maze2DEnv("umaze")
    with pytest.raises(ValueError, match="free cell"):
        env.reset(seed=0, options={"cell": (0, 0)})

"""Maze2D generation by D4RL's protocol: planner, controller, rewards, timeouts, determinism."""

import math
from collections import deque

import numpy as np
import pytest

from qt.datagen.maze2d import MOVES, WaypointController, generate, parse_name, q_iteration
from qt.envs.maze2d import LAYOUTS, Maze2DEnv, free_cells, parse_layout


def bfs_distances(walls: np.ndarray, goal: tuple[int, int]) -> dict[tuple[int, int], int]:
    dist, todo = {goal: 0}, deque([goal])
    while todo:
        i, j = todo.popleft()
        for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)):
            n = (i + di, j + dj)
            if not walls[n] and n not in dist:
                dist[n] = dist[(i, j)] + 1
                todo.append(n)
    return dist


@pytest.mark.parametrize("maze", ["umaze", "medium", "large"])
def test_q_iteration_moves_along_a_shortest_path(maze):
    walls, _ = parse_layout(maze)
    cells = free_cells(maze)
    for goal in cells[:: max(1, len(cells) // 6)]:
        dist = bfs_distances(walls, goal)
        q = q_iteration(walls, goal)
        for cell in cells:
            move = MOVES[int(np.argmax(q[cell]))]
            nxt = (cell[0] + int(move[0]), cell[1] + int(move[1]))
            if cell == goal:
                assert nxt == goal
            else:
                assert dist[nxt] == dist[cell] - 1


@pytest.mark.parametrize("maze", ["umaze", "medium", "large"])
def test_controller_reaches_the_goal_from_every_free_cell(maze):
    env = Maze2DEnv(maze)
    goal = tuple(float(g) for g in env.target)
    walls, _ = parse_layout(maze)
    far = max(bfs_distances(walls, env.goal_cell).values())
    budget = 60 * far + 60  # a cell takes well under 60 steps at these gains
    for k, cell in enumerate(free_cells(maze)):
        obs, _ = env.reset(seed=k, options={"cell": cell})
        ctrl = WaypointController(maze, np.random.default_rng(k))
        for _ in range(budget):
            ax, ay, done = ctrl.act(*map(float, obs), goal)
            if done:
                break
            obs, *_ = env.step(np.array([ax, ay]))
        assert done, f"{maze}: no goal from cell {cell} in {budget} steps"
        assert math.dist(obs[:2], goal) < 0.1


@pytest.fixture(scope="module")
def umaze():
    return generate("maze2d-umaze-v1", steps=6000, seed=3, ref_episodes=0, max_episode_steps=60)


def test_sparse_rewards_are_within_half_a_unit_of_the_eval_goal(umaze):
    a = umaze.arrays
    goal = np.array(parse_layout("umaze")[1], dtype=float)
    expect = [
        1.0 if math.dist(o[:2], goal) <= 0.5 else 0.0 for o in a["observations"].astype(float)
    ]
    np.testing.assert_array_equal(a["rewards"], expect)
    assert 0 < a["rewards"].sum() < len(expect)
    cur = generate("maze2d-umaze-v1", steps=3000, seed=3, ref_episodes=0, reward_goal="current")
    goals = cur.arrays["infos/goal"].astype(float)
    obs = cur.arrays["observations"].astype(float)
    expect = [float(math.dist(o[:2], g) <= 0.5) for o, g in zip(obs, goals)]
    np.testing.assert_array_equal(cur.arrays["rewards"], expect)
    dense = generate("maze2d-umaze-dense-v1", steps=500, seed=3, ref_episodes=0)
    d = [math.exp(-math.dist(o[:2], goal)) for o in dense.arrays["observations"].astype(float)]
    np.testing.assert_allclose(dense.arrays["rewards"], d, rtol=1e-6)


def test_timeouts_cut_at_goal_or_after_the_limit(umaze):
    a = umaze.arrays
    assert not a["terminals"].any()
    ends = np.flatnonzero(a["timeouts"])
    lengths = np.diff(np.concatenate([[-1], ends]))
    assert lengths.max() == 61  # D4RL: the counter flags the step after `limit` steps
    assert (lengths == 61).any() and (lengths < 61).any()
    for end, length in zip(ends, lengths):
        if length < 61:  # cut because the controller reached its goal (rounded to a cell)
            cell = np.round(a["infos/goal"][end].astype(float))
            assert math.dist(a["observations"][end, :2], cell) < 0.1
        # a new goal is drawn right after a flagged step
        if end + 1 < len(a["rewards"]):
            assert not np.array_equal(a["infos/goal"][end], a["infos/goal"][end + 1])
    # D4RL's stale observation: the next episode starts with the same stored observation
    nxt = ends[ends + 1 < len(a["rewards"])] + 1
    np.testing.assert_array_equal(a["observations"][nxt], a["observations"][nxt - 1])


def test_stored_transitions_follow_the_env_dynamics(umaze):
    a = umaze.arrays
    env = Maze2DEnv("umaze")
    env.reset(seed=0)
    flagged = a["timeouts"]
    checked = 0
    for t in range(0, 3000, 37):
        if flagged[t]:
            continue
        env.set_state(a["infos/qpos"][t].astype(float), a["infos/qvel"][t].astype(float))
        obs, *_ = env.step(a["actions"][t])
        np.testing.assert_allclose(obs, a["observations"][t + 1], atol=1e-5)
        checked += 1
    assert checked > 50
    assert np.abs(a["actions"]).max() <= 1.0


def test_generation_is_deterministic_for_a_seed():
    x = generate("maze2d-medium-v1", steps=3000, seed=7, ref_episodes=1, action_noise=0.5)
    y = generate("maze2d-medium-v1", steps=3000, seed=7, ref_episodes=1, action_noise=0.5)
    z = generate("maze2d-medium-v1", steps=3000, seed=8, ref_episodes=1, action_noise=0.5)
    for key in x.arrays:
        np.testing.assert_array_equal(x.arrays[key], y.arrays[key])
    assert (x.ref_min_score, x.ref_max_score) == (y.ref_min_score, y.ref_max_score)
    assert not np.array_equal(x.arrays["observations"], z.arrays["observations"])
    # a shorter stream is the beginning of a longer one (noise blocks of 8192 steps crossed)
    short = generate("maze2d-medium-v1", steps=9000, seed=7, ref_episodes=0)
    long = generate("maze2d-medium-v1", steps=17000, seed=7, ref_episodes=0)
    for key in ("observations", "actions", "rewards", "timeouts"):
        np.testing.assert_array_equal(long.arrays[key][:9000], short.arrays[key])


def test_reference_scores_order_and_names():
    ds = generate("maze2d-umaze-v1", steps=200, seed=0, ref_episodes=6)
    assert ds.ref_max_score > ds.ref_min_score >= 0
    assert ds.ref_max_score <= 300  # at most one reward per step of a 300-step episode
    assert parse_name("maze2d-open-v0") == ("open", False)
    assert parse_name("maze2d-large-dense-v1") == ("large", True)
    for bad in ("maze2d-huge-v1", "hopper-medium-v2", "maze2d-umaze-sparse-v1"):
        with pytest.raises(ValueError, match="expected maze2d-"):
            parse_name(bad)
    assert set(LAYOUTS) == {"open", "umaze", "medium", "large"}


@pytest.mark.slow
def test_episode_rate_matches_d4rls_released_umaze_file():
    # D4RL's maze2d-umaze-v1 holds 12459 flagged steps (episodes) in its 1M steps
    ds = generate("maze2d-umaze-v1", steps=200_000, seed=11, ref_episodes=0)
    per_million = ds.arrays["timeouts"].sum() * 5
    assert abs(per_million - 12459) < 0.03 * 12459

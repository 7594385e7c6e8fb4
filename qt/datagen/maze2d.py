"""Maze2D datasets made by D4RL's protocol (scripts/generation/generate_maze2d_datasets.py).

This module owns the waypoint controller and the generation of `maze2d-*` datasets:

- one continuing stream: the point mass is reset once, then a waypoint controller drives it
  to a goal drawn uniformly among the empty-or-goal cells (+ U(-0.1, 0.1)); when the
  controller reports the goal reached, or the episode counter passes D4RL's time limit,
  that step is flagged in `timeouts` and a new goal is drawn, without resetting the env;
- the planner: tabular Q-iteration (50 sweeps, discount 0.99, five moves NOOP, UP, DOWN,
  LEFT, RIGHT with ties to the first) over the maze's cells towards the goal's cell; the
  waypoints are the visited cells minus U(0, 0.2) (the goal cell itself exact);
- PD control towards the current waypoint, `a = 10 (w - x) - 1 * v`, clipped to [-1, 1];
  a waypoint counts as reached within 0.1 when the point moved less than 0.1 since the last
  step; Gaussian action noise N(0, 0.5^2) added before clipping (the script's `--noisy`:
  with it, 1M umaze steps hold 12569 episodes here (seed 0) against 12459 in D4RL's
  released maze2d-umaze-v1; without it about 13700, so those files were made with it);
- rewards as D4RL relabelled them (scripts/generation/relabel_maze2d_rewards.py): from the
  stored observation, against the maze's fixed evaluation goal, sparse or dense
  (`reward_goal="current"` measures against the goal being driven to instead, which is
  not what D4RL's files hold); `terminals` all False. Note that the dataset rewards the
  position *before* each step while the environment rewards the position after it: both
  as in D4RL.

D4RL's quirks kept on purpose (each is what its released files contain): an episode that
times out holds max_episode_steps + 1 steps; after a flagged step the stored observation is
not advanced, so the next episode starts with a copy of the previous one's last observation
(`stale_obs=True`); the controller's first velocity estimate after a new goal uses the
rounded start cell. The reference scores follow scripts/reference_scores: uniform random
actions (ref_min) and one controller kept across all evaluation episodes (ref_max), each on
the evaluation env with its fixed goal and time limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mujoco
import numpy as np

from qt.datagen.generated import GeneratedDataset
from qt.envs.maze2d import LAYOUTS, TIME_LIMITS, VEL_CLIP, Maze2DEnv, make_maze2d_env
from qt.envs.maze2d import parse_maze_name as parse_name
from qt.errors import UserError

# D4RL's dataset sizes for its maze2d files.
D4RL_STEPS = {"open": 1_000_000, "umaze": 1_000_000, "medium": 2_000_000, "large": 4_000_000}
# Grid moves in D4RL's action order: NOOP, UP, DOWN, LEFT, RIGHT (dx on rows, dy on columns).
MOVES = np.array([[0, 0], [0, -1], [0, 1], [-1, 0], [1, 0]], dtype=np.int64)
P_GAIN, D_GAIN, SOLVE_THRESH, VEL_THRESH = 10.0, -1.0, 0.1, 0.1


def q_iteration(
    walls: np.ndarray, goal: tuple[int, int], sweeps: int = 50, discount: float = 0.99
) -> np.ndarray:
    """D4RL's tabular Q-iteration over cells: Q (rows, cols, 5), reward 1 in the goal cell.

    A move into a wall or off the grid is a NOOP; walls are states too (the rounded position
    can fall in one when the point touches a wall), exactly as in D4RL's grid model.
    """
    rows, cols = walls.shape
    ii, jj = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    ni = ii[..., None] + MOVES[:, 0]  # (rows, cols, 5)
    nj = jj[..., None] + MOVES[:, 1]
    inside = (ni >= 0) & (ni < rows) & (nj >= 0) & (nj < cols)
    legal = inside & ~walls[np.clip(ni, 0, rows - 1), np.clip(nj, 0, cols - 1)]
    ni, nj = np.where(legal, ni, ii[..., None]), np.where(legal, nj, jj[..., None])
    reward = np.zeros((rows, cols))
    reward[goal] = 1.0
    q = np.zeros((rows, cols, 5))
    for _ in range(sweeps):
        v = q.max(axis=-1)
        q = reward[..., None] + discount * v[ni, nj]
    return q


class WaypointController:
    """D4RL's waypoint controller for one maze: plan over cells, PD towards each waypoint.

    Plans are cached per goal cell (the Q table depends only on it); the waypoint jitter is
    drawn from `rng` at every new goal, as D4RL draws it from numpy's global stream.
    """

    def __init__(self, maze: str, rng: np.random.Generator):
        self.walls = np.array([[c == "#" for c in row] for row in LAYOUTS[maze]], dtype=bool)
        self.rng = rng
        self._q: dict[tuple[int, int], np.ndarray] = {}
        self.target: tuple[int, int] | None = None
        self.waypoints: list[tuple[float, float]] = []
        self.idx = 0
        self.prev = (0.0, 0.0)

    def _plan(self, start: tuple[int, int], target: tuple[int, int]) -> None:
        if target not in self._q:
            self._q[target] = q_iteration(self.walls, target)
        q = self._q[target]
        cell, waypoints = start, []
        for _ in range(100):  # D4RL's rollout cap
            move = MOVES[int(np.argmax(q[cell]))]
            nxt = (cell[0] + int(move[0]), cell[1] + int(move[1]))
            rows, cols = self.walls.shape
            if not (0 <= nxt[0] < rows and 0 <= nxt[1] < cols) or self.walls[nxt]:
                nxt = cell  # an illegal move is a NOOP
            if nxt == target:
                waypoints.append((float(nxt[0]), float(nxt[1])))
                break
            jitter = self.rng.uniform(size=2) * 0.2
            waypoints.append((nxt[0] - jitter[0], nxt[1] - jitter[1]))
            cell = nxt
        self.waypoints, self.idx = waypoints, 0
        self.prev = (float(start[0]), float(start[1]))
        self.target = target

    def act(
        self, x: float, y: float, vx: float, vy: float, goal: tuple[float, float]
    ) -> tuple[float, float, bool]:
        """Action (ax, ay) in [-1, 1] and whether the goal counts as reached (D4RL's `done`)."""
        goal_cell = (int(round(goal[0])), int(round(goal[1])))
        if goal_cell != self.target:
            self._plan((int(round(x)), int(round(y))), goal_cell)
        tx, ty = self.target  # type: ignore[misc]
        moved = math.hypot(self.prev[0] - x, self.prev[1] - y)
        solved = math.hypot(x - tx, y - ty) < SOLVE_THRESH and moved < VEL_THRESH
        wx, wy = (float(tx), float(ty)) if solved else self.waypoints[self.idx]
        ax = P_GAIN * (wx - x) + D_GAIN * vx
        ay = P_GAIN * (wy - y) + D_GAIN * vy
        if not solved and math.hypot(x - wx, y - wy) < SOLVE_THRESH and moved < VEL_THRESH:
            self.idx = min(self.idx + 1, len(self.waypoints) - 1)
        self.prev = (x, y)
        return min(max(ax, -1.0), 1.0), min(max(ay, -1.0), 1.0), solved


def maze_rewards(observations: np.ndarray, goal: np.ndarray, dense: bool) -> np.ndarray:
    """D4RL's relabelling: reward of each stored observation against a goal, (N,) f32.

    goal: (2,) a fixed goal (D4RL), or (N, 2) one per step.
    """
    dist = np.linalg.norm(observations[:, :2].astype(np.float64) - goal, axis=1)
    return (np.exp(-dist) if dense else (dist <= 0.5).astype(np.float64)).astype(np.float32)


def _random_goal(env: Maze2DEnv, rng: np.random.Generator) -> np.ndarray:
    cell = env.reset_cells[rng.integers(len(env.reset_cells))]
    return cell + rng.uniform(-0.1, 0.1, size=2)


def reference_scores(maze: str, dense: bool, episodes: int, seed: int) -> tuple[float, float]:
    """(random-policy mean return, controller mean return) on the evaluation env."""
    returns = []
    for policy in ("random", "controller"):
        env = make_maze2d_env(maze, dense)
        env.action_space.seed(seed)
        rng = np.random.default_rng(seed)
        controller = WaypointController(maze, rng)  # one for all episodes, as D4RL's script
        goal = tuple(env.unwrapped.target)
        total = 0.0
        for ep in range(episodes):
            obs, _ = env.reset(seed=seed + ep)
            done = False
            while not done:
                if policy == "random":
                    action = env.action_space.sample()
                else:
                    ax, ay, _ = controller.act(*map(float, obs), goal)
                    action = np.array([ax, ay], dtype=np.float32)
                obs, reward, terminated, truncated, _ = env.step(action)
                total += reward
                done = terminated or truncated
        env.close()
        returns.append(total / episodes)
    return returns[0], returns[1]


def generate(
    name: str,
    *,
    steps: int | None = None,
    seed: int = 0,
    ref_episodes: int = 100,
    action_noise: float = 0.5,
    stale_obs: bool = True,
    max_episode_steps: int | None = None,
    reward_goal: str = "eval",
    progress: Callable[[int], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> GeneratedDataset:
    """Generate a `maze2d-*` dataset by D4RL's protocol (see the module docstring).

    steps: stream length (default D4RL's: umaze/open 1M, medium 2M, large 4M).
    ref_episodes: episodes per reference policy (0 skips them and stores NaN).
    action_noise: std of Gaussian noise added to the controller's action (D4RL's `--noisy`:
        0.5, the default; 0 gives the noiseless controller).
    stale_obs: keep D4RL's stale observation after each flagged step (see the module docstring).
    max_episode_steps: the episode counter's limit (default D4RL's time limit of the maze).
    reward_goal: "eval" (D4RL's relabelling: the maze's fixed evaluation goal) or "current"
        (the goal the controller was driving to at that step, `infos/goal`).
    progress: called with the number of steps done, every 10k steps and at the end.
    say: called with a line saying what follows the steps (the reference episodes).
    """
    maze, dense = parse_name(name)
    steps = D4RL_STEPS[maze] if steps is None else int(steps)
    if steps < 1:
        raise UserError(f"steps={steps}: expected a positive number of steps.")
    if reward_goal not in ("eval", "current"):
        raise UserError(f"reward_goal={reward_goal!r}: expected 'eval' (D4RL) or 'current'.")
    if ref_episodes < 0:
        raise UserError(f"ref_episodes={ref_episodes}: expected 0 or more episodes.")
    # separate streams for the noise and for everything else, so that a shorter dataset is
    # exactly the beginning of a longer one with the same seed
    rng, noise_rng = np.random.default_rng(seed).spawn(2)
    env = Maze2DEnv(maze, dense)
    model, data = env.model, env.data
    limit = TIME_LIMITS[maze] if max_episode_steps is None else int(max_episode_steps)
    if limit < 1:
        raise UserError(f"max_episode_steps={max_episode_steps}: expected a positive integer.")
    controller = WaypointController(maze, rng)

    obs = np.empty((steps, 4), dtype=np.float32)
    actions = np.empty((steps, 2), dtype=np.float32)
    timeouts = np.zeros(steps, dtype=bool)
    goals = np.empty((steps, 2), dtype=np.float32)
    qpos = np.empty((steps, 2), dtype=np.float32)
    qvel = np.empty((steps, 2), dtype=np.float32)

    goal = _random_goal(env, rng)
    env.reset(seed=int(rng.integers(2**31)))
    s = (*data.qpos, *data.qvel)  # the observation the script holds (may go stale)
    if action_noise < 0:
        raise UserError(f"action_noise={action_noise}: expected a standard deviation >= 0.")
    block = 8192
    ts = 0
    for t in range(steps):
        ax, ay, done = controller.act(s[0], s[1], s[2], s[3], (goal[0], goal[1]))
        if action_noise > 0:
            if t % block == 0:  # draw the noise in blocks: the same stream as one by one
                noise = noise_rng.standard_normal((block, 2)) * action_noise
            ax = min(max(ax + noise[t % block, 0], -1.0), 1.0)
            ay = min(max(ay + noise[t % block, 1], -1.0), 1.0)
        if ts >= limit:
            done = True
        obs[t] = s
        actions[t] = (ax, ay)
        timeouts[t] = done
        goals[t] = goal
        qpos[t] = data.qpos
        qvel[t] = data.qvel
        # the env's step, inlined (clip velocity, Euler step) to keep the loop lean
        np.clip(data.qvel, -VEL_CLIP, VEL_CLIP, out=data.qvel)
        data.ctrl[0], data.ctrl[1] = ax, ay
        mujoco.mj_step(model, data)
        ts += 1
        if done:
            goal = _random_goal(env, rng)
            ts = 0
            if not stale_obs:
                s = (*data.qpos, *data.qvel)
        else:
            s = (*data.qpos, *data.qvel)
        if progress is not None and ((t + 1) % 10_000 == 0 or t + 1 == steps):
            progress(t + 1)

    eval_goal = np.array(env.target)  # the layout's goal cell: D4RL's evaluation goal
    rewards = maze_rewards(obs, eval_goal if reward_goal == "eval" else goals, dense)
    if ref_episodes > 0:
        if say is not None:
            say(
                f"reference scores: {ref_episodes} episodes of a random and of the expert "
                "controller ..."
            )
        ref_min, ref_max = reference_scores(maze, dense, ref_episodes, seed)
    else:
        ref_min = ref_max = float("nan")
    arrays = {
        "observations": obs,
        "actions": actions,
        "rewards": rewards,
        "terminals": np.zeros(steps, dtype=bool),
        "timeouts": timeouts,
        "infos/goal": goals,
        "infos/qpos": qpos,
        "infos/qvel": qvel,
    }
    return GeneratedDataset(
        name=name,
        arrays=arrays,
        env_id=name,
        ref_min_score=float(ref_min),
        ref_max_score=float(ref_max),
        algorithm_name="D4RL waypoint controller (Q-iteration planner + PD)",
        metadata={
            "maze": maze,
            "dense": dense,
            "seed": seed,
            "steps": steps,
            "action_noise": action_noise,
            "stale_obs": stale_obs,
            "reward_goal": reward_goal,
            "ref_episodes": ref_episodes,
            "eval_goal": [float(g) for g in eval_goal],
            "max_episode_steps": limit,
            "protocol": "D4RL generate_maze2d_datasets.py + relabel_maze2d_rewards.py",
        },
    )

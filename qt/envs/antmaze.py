"""AntMaze environments with D4RL's mazes, ant dynamics, evaluation goals and sparse reward.

D4RL's AntMaze (d4rl/locomotion) puts its own ant model in a maze built from a cell map, with
the maze's reset cell at the world origin and cells `maze_size_scaling` = 4 apart (row i is
+y, column j is +x). gymnasium-robotics' AntMaze centres the map instead, flips y, uses
gymnasium's faster ant (timestep 0.01, gear 150) and a 0.45 goal radius, so its positions,
dynamics and reward differ from the datasets. This module therefore builds the maze the D4RL way
around gymnasium's `Ant-v5` environment, with the model edited to D4RL's ant:

- physics timestep 0.02 with frame skip 5 (control step 0.1 s), geom contact parameters
  `solref=".02 1" solimp=".8 .8 .01"`, motor torque `30 * action` for actions in [-1, 1]
  (D4RL's ctrlrange of +-30 behind its NormalizedBoxEnv);
- observation: qpos (15, including the x, y position) then qvel (14), goal not included;
- reset: qpos + U(-0.1, 0.1), qvel + 0.1 N(0, 1) around the origin;
- goal: the maze's goal cell, plus U(0, 1) + U(0, 0.5) in each coordinate (D4RL's goal
  sampler). `-v0` draws it once for the environment's life (at its first reset), `-v2` at every
  reset (D4RL's `v2_resets`);
- reward 1 when the ant's (x, y) is within 0.5 of the goal after a step, else 0; the episode
  terminates there (D4RL's `eval=True`); time limit 700 (umaze) or 1000 (medium, large).
"""

from __future__ import annotations

import os
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

import gymnasium as gym
import numpy as np

from qt.envs.common import ANTMAZE_LIMITS
from qt.errors import UserError

# D4RL's single-goal evaluation maps (maze_env.py *_TEST): 1 wall, 0 free, R reset, G goal.
R, G = "r", "g"
MAZES: dict[str, list[list[int | str]]] = {
    "umaze": [
        [1, 1, 1, 1, 1],
        [1, R, 0, 0, 1],
        [1, 1, 1, 0, 1],
        [1, G, 0, 0, 1],
        [1, 1, 1, 1, 1],
    ],
    "medium": [  # D4RL's "big maze"
        [1, 1, 1, 1, 1, 1, 1, 1],
        [1, R, 0, 1, 1, 0, 0, 1],
        [1, 0, 0, 1, 0, 0, 0, 1],
        [1, 1, 0, 0, 0, 1, 1, 1],
        [1, 0, 0, 1, 0, 0, 0, 1],
        [1, 0, 1, 0, 0, 1, 0, 1],
        [1, 0, 0, 0, 1, 0, G, 1],
        [1, 1, 1, 1, 1, 1, 1, 1],
    ],
    "large": [  # D4RL's "hardest maze"
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
        [1, R, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1],
        [1, 0, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1],
        [1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1],
        [1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0, 1],
        [1, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 1],
        [1, 1, 0, 1, 0, 1, 0, 1, 0, 1, 1, 1],
        [1, 0, 0, 1, 0, 0, 0, 1, 0, G, 0, 1],
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1],
    ],
}
MAZE_SIZE_SCALING = 4.0
MAZE_HEIGHT = 0.5
GOAL_RADIUS = 0.5


def _find(maze: list[list[int | str]], mark: str) -> tuple[int, int]:
    """(row, col) of the single cell carrying `mark`."""
    cells = [(i, j) for i, row in enumerate(maze) for j, c in enumerate(row) if c == mark]
    assert len(cells) == 1, f"expected one {mark!r} cell, found {len(cells)}"
    return cells[0]


def cell_xy(maze_name: str, row: int, col: int) -> np.ndarray:
    """World (x, y) of a cell's centre: the reset cell is the origin, column is x, row is y."""
    r0, c0 = _find(MAZES[maze_name], R)
    return np.array([(col - c0) * MAZE_SIZE_SCALING, (row - r0) * MAZE_SIZE_SCALING])


def goal_cell_xy(maze_name: str) -> np.ndarray:
    """World (x, y) of the maze's goal cell before D4RL's goal noise: (0, 8), (20, 20), (32, 24)."""
    return cell_xy(maze_name, *_find(MAZES[maze_name], G))


def sample_goal(maze_name: str, rng: np.random.Generator) -> np.ndarray:
    """D4RL's evaluation goal: the goal cell plus U(0, s/4) + U(0, 0.5) * s/4 per coordinate."""
    s = MAZE_SIZE_SCALING
    noise = rng.uniform(0.0, 0.25 * s, size=2) + rng.uniform(0.0, 0.5, size=2) * 0.25 * s
    return np.maximum(goal_cell_xy(maze_name) + noise, 0.0)


def _maze_xml(maze_name: str) -> str:
    """gymnasium's ant model edited to D4RL's ant, with the maze's walls and a goal marker."""
    from gymnasium.envs.mujoco import ant_v5

    tree = ET.parse(Path(ant_v5.__file__).parent / "assets" / "ant.xml")
    root = tree.getroot()
    root.find("option").set("timestep", "0.02")
    default_geom = root.find("default/geom")
    default_geom.set("solref", ".02 1")
    default_geom.set("solimp", ".8 .8 .01")
    for motor in root.iter("motor"):
        motor.set("gear", "30")  # D4RL: ctrl in [-30, 30] = 30 * action, gear 1
    worldbody = root.find("worldbody")
    s, h = MAZE_SIZE_SCALING, MAZE_HEIGHT
    maze = MAZES[maze_name]
    for i, row in enumerate(maze):
        for j, cell in enumerate(row):
            if cell == 1:
                x, y = cell_xy(maze_name, i, j)
                ET.SubElement(
                    worldbody,
                    "geom",
                    name=f"block_{i}_{j}",
                    type="box",
                    pos=f"{x} {y} {h / 2 * s}",
                    size=f"{0.5 * s} {0.5 * s} {h / 2 * s}",
                    contype="1",
                    conaffinity="1",
                    rgba="0.7 0.5 0.3 1.0",
                )
    ET.SubElement(
        worldbody, "site", name="goal", pos=f"0 0 {h / 2 * s}", size="0.5", rgba="1 0 0 0.7"
    )  # moved to the goal at reset; visual only (sites do not collide)
    return ET.tostring(root, encoding="unicode")


class AntMazeEnv(gym.Env):
    """D4RL's AntMaze evaluation environment (see the module docstring for every rule)."""

    metadata = {"render_modes": ["human", "rgb_array", "depth_array"], "render_fps": 10}

    def __init__(self, maze: str, *, goal_per_reset: bool, render_mode: str | None = None) -> None:
        from gymnasium.envs.mujoco.ant_v5 import AntEnv

        if maze not in MAZES:
            raise UserError(f"Unknown ant maze {maze!r}: expected one of {', '.join(MAZES)}.")
        self.maze = maze
        self.goal_per_reset = goal_per_reset
        fd, path = tempfile.mkstemp(suffix=".xml", prefix="qt_antmaze_")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(_maze_xml(maze))
            self.ant = AntEnv(
                xml_file=path,
                frame_skip=5,
                reset_noise_scale=0.1,
                exclude_current_positions_from_observation=False,
                include_cfrc_ext_in_observation=False,
                terminate_when_unhealthy=False,  # D4RL's maze ignores the ant's health
                render_mode=render_mode,
            )
        finally:
            os.remove(path)  # the model is compiled; the file is no longer needed
        self.render_mode = render_mode
        self.action_space = self.ant.action_space
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(29,), dtype=np.float32)
        self._goal_site = self.ant.model.site("goal").id
        self.goal: np.ndarray | None = None  # (2,)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        """Reset the ant near the origin; draw the goal (every reset for -v2, once for -v0)."""
        super().reset(seed=seed)
        # The ant's noise gets its own seed drawn from this env's generator: reseeding both with
        # `seed` would make the start noise and the goal noise the same uniform draws.
        ant_seed = None if seed is None else int(self.np_random.integers(2**31))
        obs, _ = self.ant.reset(seed=ant_seed)
        if self.goal is None or self.goal_per_reset:
            self.goal = sample_goal(self.maze, self.np_random)
            self.ant.model.site_pos[self._goal_site, :2] = self.goal
        info = {"goal": self.goal.copy()}
        return obs.astype(np.float32), info

    def step(self, action):
        """One control step; reward 1 and termination within 0.5 of the goal."""
        if self.goal is None:
            raise RuntimeError("AntMazeEnv.step was called before reset.")
        obs, _, _, _, _ = self.ant.step(action)
        reached = bool(np.linalg.norm(obs[:2] - self.goal) <= GOAL_RADIUS)
        info = {"goal": self.goal.copy(), "success": reached}
        return obs.astype(np.float32), float(reached), reached, False, info

    def render(self):
        """Render through the wrapped ant environment."""
        return self.ant.render()

    def close(self) -> None:
        """Close the wrapped ant environment."""
        self.ant.close()


def make_antmaze_env(
    maze: str,
    *,
    goal_per_reset: bool = False,
    render_mode: str | None = None,
    max_episode_steps: int | None = None,
) -> gym.Env:
    """AntMaze `maze` ('umaze'|'medium'|'large') with D4RL's time limit unless one is given."""
    env = AntMazeEnv(maze, goal_per_reset=goal_per_reset, render_mode=render_mode)
    limit = ANTMAZE_LIMITS[maze] if max_episode_steps is None else max_episode_steps
    return gym.wrappers.TimeLimit(env, max_episode_steps=limit)

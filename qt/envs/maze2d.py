"""Maze2D: D4RL's point-mass maze, rebuilt on the `mujoco` bindings.

This module owns the evaluation environment of the `maze2d-*` tasks and the maze facts
the dataset generator shares with it (layouts, goals, time limits, coordinates).

Why our own MuJoCo model rather than gymnasium-robotics' PointMaze: both use the same
point-mass body (sphere r=0.1, density 1000, slide joints with damping 1, gear 100,
Euler at dt 0.01, frame skip 1, velocity clipped to [-5, 5], actions clipped to [-1, 1]),
but PointMaze centres the maze at the origin with the y axis flipped, adds +-0.25 noise to
goals and resets, returns dict observations and can end episodes at the goal. D4RL's
datasets live in D4RL's frame, so we generate D4RL's model from the layout as D4RL did.

D4RL's coordinates, quirks included (d4rl/pointmaze/maze_model.py):
- the layout string is read row by row; cell (i, j) is row i, column j, and `qpos = (i, j)`
  is "at" that cell: the planner rounds qpos to find the cell;
- the walls are boxes centred at world (i + 1, j + 1), but the particle body sits at world
  (1.2, 1.2) + qpos, so in qpos units a free cell (i, j) spans [i - 0.7, i + 0.3] and the
  point is 0.2 off the cell centre when qpos is integral. We keep this offset exactly.
- the evaluation goal is the 'G' cell at integer qpos, with no noise (`reset_target=False`);
- reset: a uniformly chosen empty-or-goal cell + U(-0.1, 0.1) on qpos, qvel ~ N(0, 0.1^2);
- reward from the post-step position: sparse 1.0 if ||xy - goal|| <= 0.5 else 0.0, dense
  exp(-||xy - goal||); the episode never terminates, it is truncated at D4RL's time limit
  (open 150, umaze 300, medium 600, large 800 steps).

Remaining differences from D4RL: MuJoCo 3 instead of MuJoCo 2.1 (same model, same
integrator; contact solver details may differ in the last digits), float32 observations
(D4RL's env returns float64; its datasets store float32), and the random streams of
resets are numpy Generators, not the old RandomState, so a seed does not reproduce D4RL's
exact start positions.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

from qt.errors import UserError

# D4RL's layouts, row by row ('#' wall, 'O' empty, 'G' the evaluation goal).
LAYOUTS: dict[str, tuple[str, ...]] = {
    "open": ("#######", "#OOOOO#", "#OOGOO#", "#OOOOO#", "#######"),
    "umaze": ("#####", "#GOO#", "###O#", "#OOO#", "#####"),
    "medium": (
        "########",
        "#OO##OO#",
        "#OO#OOO#",
        "##OOO###",
        "#OO#OOO#",
        "#O#OO#O#",
        "#OOO#OG#",
        "########",
    ),
    "large": (
        "############",
        "#OOOO#OOOOO#",
        "#O##O#O#O#O#",
        "#OOOOOO#OOO#",
        "#O####O###O#",
        "#OO#O#OOOOO#",
        "##O#O#O#O###",
        "#OO#OOO#OGO#",
        "############",
    ),
}
# D4RL's registered time limits (maze2d-open-v0, maze2d-{umaze,medium,large}-v1).
TIME_LIMITS: dict[str, int] = {"open": 150, "umaze": 300, "medium": 600, "large": 800}
GOAL_RADIUS = 0.5  # sparse reward radius, in qpos units
VEL_CLIP = 5.0


def parse_layout(maze: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Walls (rows, cols) bool and the goal cell (i, j) of one of D4RL's layouts."""
    if maze not in LAYOUTS:
        raise UserError(f"Unknown maze {maze!r}: expected one of {sorted(LAYOUTS)}.")
    rows = LAYOUTS[maze]
    walls = np.array([[c == "#" for c in row] for row in rows], dtype=bool)
    (goal,) = [(i, j) for i, row in enumerate(rows) for j, c in enumerate(row) if c == "G"]
    return walls, goal


def free_cells(maze: str) -> list[tuple[int, int]]:
    """D4RL's reset locations: empty cells sorted, then the goal cell (its order)."""
    walls, goal = parse_layout(maze)
    empty = sorted((int(i), int(j)) for i, j in zip(*np.where(~walls)) if (i, j) != goal)
    return empty + [goal]


def parse_maze_name(name: str) -> tuple[str, bool]:
    """`maze2d-umaze-v1` -> ("umaze", False); `maze2d-large-dense-v1` -> ("large", True)."""
    parts = name.split("-")
    ok = len(parts) in (3, 4) and parts[0] == "maze2d" and parts[1] in LAYOUTS
    ok = ok and parts[-1] in ("v0", "v1") and (len(parts) == 3 or parts[2] == "dense")
    if not ok:
        raise UserError(
            f"Dataset name {name!r}: expected maze2d-<{'|'.join(LAYOUTS)}>[-dense]-v1 (open: -v0)."
        )
    return parts[1], len(parts) == 4


def maze_xml(maze: str) -> str:
    """MJCF of D4RL's point maze for a layout (walls at world (i+1, j+1), body at (1.2, 1.2))."""
    walls, goal = parse_layout(maze)
    wall_geoms = "\n".join(
        f'    <geom name="wall_{i}_{j}" type="box" pos="{i + 1.0} {j + 1.0} 0" '
        f'size="0.5 0.5 0.2" conaffinity="1" material="wall"/>'
        for i, j in zip(*np.where(walls))
    )
    return f"""<mujoco model="point_maze">
  <compiler inertiafromgeom="true" angle="radian"/>
  <option timestep="0.01" gravity="0 0 0" iterations="20" integrator="Euler"/>
  <default>
    <joint damping="1" limited="false"/>
    <geom friction=".5 .1 .1" density="1000" margin="0.002" condim="1" contype="2" conaffinity="1"/>
  </default>
  <asset>
    <texture type="2d" name="groundplane" builtin="checker" rgb1="0.2 0.3 0.4" rgb2="0.1 0.2 0.3" width="100" height="100"/>
    <material name="groundplane" texture="groundplane" texrepeat="20 20"/>
    <material name="wall" rgba=".7 .5 .3 1"/>
    <material name="target" rgba=".6 .3 .3 1"/>
  </asset>
  <visual>
    <headlight ambient=".4 .4 .4" diffuse=".8 .8 .8" specular="0.1 0.1 0.1"/>
    <map znear=".01"/>
  </visual>
  <worldbody>
    <geom name="ground" size="40 40 0.25" pos="0 0 -0.1" type="plane" contype="1" conaffinity="0" material="groundplane"/>
    <body name="particle" pos="1.2 1.2 0">
      <geom name="particle_geom" type="sphere" size="0.1" rgba="0 0 1 1" contype="1"/>
      <joint name="ball_x" type="slide" pos="0 0 0" axis="1 0 0"/>
      <joint name="ball_y" type="slide" pos="0 0 0" axis="0 1 0"/>
    </body>
    <site name="target_site" pos="{goal[0] + 1.0} {goal[1] + 1.0} 0" size="0.2" material="target"/>
{wall_geoms}
  </worldbody>
  <actuator>
    <motor joint="ball_x" ctrlrange="-1 1" ctrllimited="true" gear="100"/>
    <motor joint="ball_y" ctrlrange="-1 1" ctrllimited="true" gear="100"/>
  </actuator>
</mujoco>
"""


class Maze2DEnv(gym.Env):
    """D4RL's `MazeEnv` with `reset_target=False`: observation (x, y, vx, vy) in D4RL's frame.

    The target defaults to the layout's goal cell; `set_target` moves it (the generator's
    continuing task does). Never terminates: wrap in a TimeLimit (see `make_maze2d_env`).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 100}

    def __init__(self, maze: str = "umaze", dense: bool = False, render_mode: str | None = None):
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise UserError(f"render_mode {render_mode!r}: expected None or 'rgb_array'.")
        self.maze = maze
        self.dense = bool(dense)
        self.render_mode = render_mode
        self.walls, self.goal_cell = parse_layout(maze)
        self.reset_cells = np.array(free_cells(maze), dtype=np.float64)  # (C, 2)
        self.model = mujoco.MjModel.from_xml_string(maze_xml(maze))
        self.data = mujoco.MjData(self.model)
        self._target_site = self.model.site("target_site").id
        self.target = np.array(self.goal_cell, dtype=np.float64)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(4,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self._renderer: Any = None

    # -- state ---------------------------------------------------------------------------
    def _obs(self) -> np.ndarray:
        return np.concatenate([self.data.qpos, self.data.qvel]).astype(np.float32)

    def set_state(self, qpos: np.ndarray, qvel: np.ndarray) -> None:
        """Place the point (qpos, qvel in D4RL's frame) and recompute derived quantities."""
        self.data.qpos[:] = qpos
        self.data.qvel[:] = qvel
        mujoco.mj_forward(self.model, self.data)

    def set_target(self, target: np.ndarray) -> None:
        """Move the goal (qpos units); rewards are measured against it from now on."""
        self.target = np.asarray(target, dtype=np.float64).copy()
        # D4RL draws the marker at target + 1 (not + 1.2): cosmetic only.
        self.model.site_pos[self._target_site] = [self.target[0] + 1.0, self.target[1] + 1.0, 0.0]
        mujoco.mj_kinematics(self.model, self.data)  # so a render shows the marker moved

    def reward(self, xy: np.ndarray) -> float:
        """D4RL's reward at position xy against the current target."""
        dist = float(np.linalg.norm(np.asarray(xy, dtype=np.float64) - self.target))
        if self.dense:
            return float(np.exp(-dist))
        return 1.0 if dist <= GOAL_RADIUS else 0.0

    # -- gymnasium API -------------------------------------------------------------------
    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start at a random empty cell + U(-0.1, 0.1), qvel ~ N(0, 0.1^2).

        options: {"cell": (i, j)} starts at that cell instead (still with the noise).
        """
        super().reset(seed=seed)
        mujoco.mj_resetData(self.model, self.data)
        if options and "cell" in options:
            cell = np.asarray(options["cell"], dtype=np.float64)
            if cell.shape != (2,) or self.walls[int(cell[0]), int(cell[1])]:
                raise UserError(
                    f"reset option cell={options['cell']!r}: expected a free cell (i, j)."
                )
        else:
            cell = self.reset_cells[self.np_random.integers(len(self.reset_cells))]
        qpos = cell + self.np_random.uniform(-0.1, 0.1, size=2)
        qvel = self.np_random.standard_normal(2) * 0.1
        self.set_state(qpos, qvel)
        self.set_target(self.target)
        return self._obs(), {"goal": self.target.copy()}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """D4RL's step: clip action and velocity, one Euler step of 0.01 s, reward after it."""
        action = np.clip(np.asarray(action, dtype=np.float64).reshape(2), -1.0, 1.0)
        np.clip(self.data.qvel, -VEL_CLIP, VEL_CLIP, out=self.data.qvel)
        self.data.ctrl[:] = action
        mujoco.mj_step(self.model, self.data)
        obs = self._obs()
        return obs, self.reward(self.data.qpos), False, False, {"goal": self.target.copy()}

    def render(self) -> np.ndarray | None:
        """An RGB frame from above (needs an OpenGL backend, e.g. MUJOCO_GL=egl)."""
        if self.render_mode != "rgb_array":
            return None
        if self._renderer is None:
            self._renderer = mujoco.Renderer(self.model, 480, 480)
        cam = mujoco.MjvCamera()
        cam.lookat[:] = [self.walls.shape[0] / 2 + 0.5, self.walls.shape[1] / 2 + 0.5, 0.0]
        cam.distance, cam.elevation, cam.azimuth = 1.6 * max(self.walls.shape), -90.0, 180.0
        self._renderer.update_scene(self.data, camera=cam)
        return self._renderer.render()

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None


def env_id(maze: str, dense: bool = False) -> str:
    """The gymnasium id registered for a maze (`qt/maze2d-umaze-v1`, open is `-v0`)."""
    version = "v0" if maze == "open" else "v1"
    return f"qt/maze2d-{maze}{'-dense' if dense else ''}-{version}"


def _register() -> None:
    for maze in LAYOUTS:
        for dense in (False, True):
            name = env_id(maze, dense)
            if name not in gym.registry:
                gym.register(
                    id=name,
                    entry_point="qt.envs.maze2d:Maze2DEnv",
                    kwargs={"maze": maze, "dense": dense},
                    max_episode_steps=TIME_LIMITS[maze],
                )


_register()


def make_maze2d_env(
    maze: str,
    dense: bool = False,
    *,
    render_mode: str | None = None,
    max_episode_steps: int | None = None,
) -> gym.Env:
    """D4RL's Maze2D evaluation env: fixed goal, D4RL reward, D4RL's time limit by default."""
    if maze not in LAYOUTS:
        raise UserError(f"Unknown maze {maze!r}: expected one of {sorted(LAYOUTS)}.")
    if max_episode_steps is not None and max_episode_steps < 1:
        raise UserError(f"max_episode_steps={max_episode_steps}: expected a positive integer.")
    return gym.make(
        env_id(maze, dense),
        render_mode=render_mode,
        max_episode_steps=max_episode_steps or TIME_LIMITS[maze],
    )

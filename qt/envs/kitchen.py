"""Franka Kitchen environments for the D4RL `kitchen-*-v0` datasets.

Built on gymnasium-robotics' `FrankaKitchen-v1` (a port of D4RL's adept kitchen), with D4RL's
view of it restored:
- observation (60,) as D4RL's: robot joint positions (9), object positions (21), then the goal
  vector (30): zeros except D4RL's target values at the indices of the dataset's four tasks;
- reward: the number of tasks completed in this step (each task counts once per episode,
  completed within 0.3 of its goal), terminated when all four are done, time limit 280;
- observation noise: D4RL's ratio 0.1 for the robot and the objects;
- tasks: complete and partial are microwave, kettle, light switch, slide cabinet; mixed is
  microwave, kettle, bottom burner, light switch.
One difference stays: D4RL decides completion on the noisy object observation,
gymnasium-robotics on the true positions (the noise is about 0.01 at most).

Known failure: gymnasium-robotics 1.4.2 compares joint types with a tuple
membership test that newer mujoco enums no longer satisfy, so `FrankaKitchen-v1` raises an
AssertionError while it is built under mujoco>=3.12 (so also under 4.x). With
gymnasium-robotics 1.4.2 it builds under mujoco 3.11.0 and fails from 3.12.0 on (bisected over
3.3.7 ... 3.17.0); `make_kitchen_env` turns the failure into `EnvUnavailableError` with that
advice.
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np

from qt.envs.common import KITCHEN_LIMIT
from qt.errors import UserError

_TASKS = {
    "kitchen-complete-v0": ("microwave", "kettle", "light switch", "slide cabinet"),
    "kitchen-partial-v0": ("microwave", "kettle", "light switch", "slide cabinet"),
    "kitchen-mixed-v0": ("microwave", "kettle", "bottom burner", "light switch"),
}
# D4RL kitchen_envs.py: where each task's objects sit in the 30-vector of robot + object
# positions, and the positions that count as done.
_ELEMENT_INDICES = {
    "bottom burner": [11, 12],
    "top burner": [15, 16],
    "light switch": [17, 18],
    "slide cabinet": [19],
    "hinge cabinet": [20, 21],
    "microwave": [22],
    "kettle": [23, 24, 25, 26, 27, 28, 29],
}
_ELEMENT_GOALS = {
    "bottom burner": [-0.88, -0.01],
    "top burner": [-0.92, -0.01],
    "light switch": [-0.69, -0.05],
    "slide cabinet": [0.37],
    "hinge cabinet": [0.0, 1.45],
    "microwave": [-0.75],
    "kettle": [-0.23, 0.75, 1.62, 0.99, 0.0, 0.0, -0.06],
}


class EnvUnavailableError(UserError, RuntimeError):
    """An environment cannot be built with the installed packages."""


def d4rl_goal_vector(tasks: tuple[str, ...]) -> np.ndarray:
    """D4RL's (30,) goal vector for a task list: target positions at the tasks' indices."""
    goal = np.zeros(30, dtype=np.float32)
    for task in tasks:
        goal[_ELEMENT_INDICES[task]] = _ELEMENT_GOALS[task]
    return goal


class D4RLKitchen(gym.Wrapper):
    """FrankaKitchen-v1 with D4RL's 60-dim observation and per-step completion reward."""

    def __init__(self, env: gym.Env, tasks: tuple[str, ...]) -> None:
        super().__init__(env)
        self._goal = d4rl_goal_vector(tasks)
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(60,), dtype=np.float32)

    def _obs(self, obs: dict) -> np.ndarray:
        # gymnasium-robotics: robot qpos (9), robot qvel (9), object qpos (21), object qvel (20)
        flat = obs["observation"]
        return np.concatenate([flat[:9], flat[18:39], self._goal]).astype(np.float32)

    def reset(self, **kwargs):
        """Reset and return D4RL's observation."""
        obs, info = self.env.reset(**kwargs)
        return self._obs(obs), info

    def step(self, action):
        """Step; the reward counts the tasks completed in this step (D4RL's bonus)."""
        obs, _, terminated, truncated, info = self.env.step(action)
        reward = float(len(info.get("step_task_completions", ())))
        return self._obs(obs), reward, terminated, truncated, info


def make_kitchen_env(name: str, *, render_mode: str | None = None) -> gym.Env:
    """The kitchen environment of a D4RL kitchen dataset name, D4RL's observation and reward."""
    import gymnasium_robotics
    import mujoco

    if name not in _TASKS:
        raise UserError(f"Unknown kitchen task {name!r}: expected one of {', '.join(_TASKS)}.")
    gym.register_envs(gymnasium_robotics)
    try:
        env = gym.make(
            "FrankaKitchen-v1",
            tasks_to_complete=list(_TASKS[name]),
            terminate_on_tasks_completed=True,
            # D4RL's observation noise: ratio 0.1 on robot and objects (gymnasium-robotics'
            # defaults are 0.01 and 0.0005), times the same per-joint amplitudes.
            robot_noise_ratio=0.1,
            object_noise_ratio=0.1,
            max_episode_steps=KITCHEN_LIMIT,
            render_mode=render_mode,
        )
    except AssertionError as err:
        raise EnvUnavailableError(
            f"FrankaKitchen-v1 cannot be built with mujoco {mujoco.__version__} and "
            f"gymnasium-robotics {gymnasium_robotics.__version__} (its joint-type check fails "
            f"under mujoco>=3.12); install 'mujoco<3.12' (mujoco==3.11.0 works) to evaluate {name}."
        ) from err
    return D4RLKitchen(env, _TASKS[name])

"""Environment factories: one gymnasium environment per registered task, D4RL-compatible.

`make_env` is the single entry point: it looks the task up in `qt.tasks`, dispatches on its
family to the factory of that family, and checks that the environment's spaces have the sizes
the registry (and so the dataset) promises. Every factory returns a flat float32 observation in
the layout of the D4RL dataset and applies D4RL's episode time limit.
"""

from __future__ import annotations

from collections.abc import Sequence

import gymnasium as gym

from qt.envs.common import (
    ADROIT_LIMITS,
    ANTMAZE_LIMITS,
    KITCHEN_LIMIT,
    LOCOMOTION_LIMIT,
    MAZE2D_LIMITS,
)
from qt.errors import UserError
from qt.tasks import Task, get_task

__all__ = ["make_env", "make_vector_env", "episode_limit"]


def _maze_of(task: Task) -> str:
    """The maze of a maze2d/antmaze task name: 'open', 'umaze', 'medium' or 'large'."""
    return task.name.split("-")[1]


def episode_limit(task: str | Task) -> int:
    """D4RL's time limit (max_episode_steps) of the task's evaluation environment."""
    task = get_task(task) if isinstance(task, str) else task
    if task.family in ("hopper", "halfcheetah", "walker2d"):
        return LOCOMOTION_LIMIT
    if task.family in ADROIT_LIMITS:
        return ADROIT_LIMITS[task.family]
    if task.family == "kitchen":
        return KITCHEN_LIMIT
    if task.family == "maze2d":
        return MAZE2D_LIMITS[_maze_of(task)]
    if task.family == "antmaze":
        return ANTMAZE_LIMITS[_maze_of(task)]
    raise UserError(
        f"Task {task.name!r} has family {task.family!r}, for which no environment exists."
    )


def _check_spaces(env: gym.Env, task: Task) -> None:
    """Refuse an environment whose spaces disagree with the registry (and so with the dataset)."""
    obs_shape = env.observation_space.shape
    act_shape = env.action_space.shape
    if obs_shape != (task.state_dim,) or act_shape != (task.act_dim,):
        env.close()
        raise UserError(
            f"The environment built for task {task.name!r} has observation shape {obs_shape} and "
            f"action shape {act_shape}, expected ({task.state_dim},) and ({task.act_dim},)."
        )


def make_env(
    task: str | Task, *, seed: int | None = None, render_mode: str | None = None
) -> gym.Env:
    """Build the evaluation environment of a task with D4RL's observations and time limit.

    Observations are flat float32 vectors of `task.state_dim` in the D4RL dataset's layout,
    actions have `task.act_dim` entries in [-1, 1]. With `seed`, the environment's first reset
    and its action space are seeded, so an episode is reproducible.
    """
    task = get_task(task) if isinstance(task, str) else task
    family = task.family
    # a family's module is imported when one of its tasks is made: each pulls in its own
    # simulation stack (gymnasium-robotics for kitchen and adroit, MuJoCo models built here)
    if family in ("hopper", "halfcheetah", "walker2d"):
        from qt.envs.locomotion import make_locomotion_env

        env = make_locomotion_env(family, render_mode=render_mode)
    elif family in ADROIT_LIMITS:
        from qt.envs.adroit import make_adroit_env

        env = make_adroit_env(family, render_mode=render_mode)
    elif family == "kitchen":
        from qt.envs.kitchen import make_kitchen_env

        env = make_kitchen_env(task.name, render_mode=render_mode)
    elif family == "maze2d":
        from qt.envs.maze2d import make_maze2d_env

        env = make_maze2d_env(_maze_of(task), task.dense, render_mode=render_mode)
    elif family == "antmaze":
        from qt.envs.antmaze import make_antmaze_env

        env = make_antmaze_env(
            _maze_of(task), goal_per_reset=task.name.endswith("-v2"), render_mode=render_mode
        )
    else:
        raise UserError(
            f"Task {task.name!r} has family {family!r}, for which no environment exists."
        )
    _check_spaces(env, task)
    if seed is not None:
        # Gymnasium seeds the environment's generator at the first reset with a seed; seeding
        # here as well makes the very first reset() reproducible without the caller's help.
        env.reset(seed=seed)
        env.action_space.seed(seed)
    return env


def make_vector_env(
    task: str | Task, num_envs: int, *, seeds: Sequence[int] | None = None
) -> gym.vector.SyncVectorEnv:
    """`num_envs` copies of the task's environment in a gymnasium SyncVectorEnv.

    With `seeds` (one per environment), environment i is seeded with `seeds[i]`; gymnasium's
    default autoreset (NEXT_STEP) applies.
    """
    if num_envs < 1:
        raise UserError(f"num_envs is {num_envs}, expected at least 1.")
    if seeds is not None and len(seeds) != num_envs:
        raise UserError(
            f"seeds has {len(seeds)} entries, expected one per environment ({num_envs})."
        )
    task = get_task(task) if isinstance(task, str) else task
    fns = [
        (lambda i=i: make_env(task, seed=None if seeds is None else int(seeds[i])))
        for i in range(num_envs)
    ]
    return gym.vector.SyncVectorEnv(fns)

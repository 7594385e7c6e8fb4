"""Gym-MuJoCo locomotion environments for the D4RL `-v2` datasets.

D4RL recorded its `-v2` datasets on gym's `Hopper-v3`, `HalfCheetah-v3` and `Walker2d-v3`. The
gymnasium `-v4` environments use the same MuJoCo models, rewards, termination rules and
observations (the torso's x position excluded: `exclude_current_positions_from_observation`,
on by default), now on the `mujoco` bindings instead of mujoco-py.
"""

from __future__ import annotations

import warnings

import gymnasium as gym

from qt.envs.common import LOCOMOTION_LIMIT, as_float32_obs
from qt.errors import UserError

_ENV_IDS = {"hopper": "Hopper-v4", "halfcheetah": "HalfCheetah-v4", "walker2d": "Walker2d-v4"}


def make_locomotion_env(family: str, *, render_mode: str | None = None) -> gym.Env:
    """The gymnasium environment of a locomotion family, float32 observations, limit 1000."""
    if family not in _ENV_IDS:
        raise UserError(
            f"Unknown locomotion family {family!r}: expected one of {', '.join(_ENV_IDS)}."
        )
    with warnings.catch_warnings():
        # gymnasium suggests -v5; -v4 is chosen on purpose (the -v3 dynamics D4RL recorded).
        warnings.filterwarnings("ignore", message=".*is out of date", category=DeprecationWarning)
        env = gym.make(
            _ENV_IDS[family],
            render_mode=render_mode,
            exclude_current_positions_from_observation=True,
            max_episode_steps=LOCOMOTION_LIMIT,
        )
    return as_float32_obs(env)

"""Facts and helpers shared by the environment factories: D4RL's time limits, float32 states."""

from __future__ import annotations

import gymnasium as gym
import numpy as np

# D4RL's registered time limits (max_episode_steps) per dataset family / maze.
LOCOMOTION_LIMIT = 1000
ADROIT_LIMITS = {"pen": 100, "hammer": 200, "door": 200, "relocate": 200}
KITCHEN_LIMIT = 280
MAZE2D_LIMITS = {"open": 150, "umaze": 300, "medium": 600, "large": 800}
ANTMAZE_LIMITS = {"umaze": 700, "medium": 1000, "large": 1000}


def as_float32_obs(env: gym.Env) -> gym.Env:
    """Cast observations to float32 (D4RL stores float32 states) and declare that space."""
    low = np.full(env.observation_space.shape, -np.inf, dtype=np.float32)
    space = gym.spaces.Box(low, -low, dtype=np.float32)
    return gym.wrappers.TransformObservation(env, lambda obs: np.asarray(obs, np.float32), space)

"""Adroit hand environments (pen, hammer, door, relocate) for the D4RL `-v1` datasets.

gymnasium-robotics' `AdroitHand*-v1` environments port D4RL's hand_dapg (mj_envs) tasks to the
`mujoco` bindings with the same observation vectors (pen 45, hammer 46, door 39, relocate 39)
and action sizes (24, 26, 28, 30), actions normalised to [-1, 1] as D4RL's datasets store them.
What differs from D4RL, and is restored here:
- time limit: gymnasium-robotics registers every Adroit task with 200 steps, D4RL gives pen 100;
- pen: D4RL's pen ends the episode when the pen drops (object height below 0.075, the step that
  also takes the -5 penalty); gymnasium-robotics never terminates, so `PenDropTermination`
  adds that rule back. gymnasium-robotics
1.2.0 briefly had the sign of the hand-to-object term of the door/hammer/relocate dense reward
flipped (its PR 220); from 1.2.1 on the reward is D4RL's again.
"""

from __future__ import annotations

import gymnasium as gym

from qt.envs.common import ADROIT_LIMITS, as_float32_obs
from qt.errors import UserError

_ENV_IDS = {
    "pen": "AdroitHandPen-v1",
    "hammer": "AdroitHandHammer-v1",
    "door": "AdroitHandDoor-v1",
    "relocate": "AdroitHandRelocate-v1",
}


PEN_DROP_HEIGHT = 0.075


class PenDropTermination(gym.Wrapper):
    """End a pen episode when the pen falls below D4RL's drop height, as D4RL's pen does."""

    def step(self, action):
        """Step; terminated when the pen object's height is below 0.075."""
        obs, reward, terminated, truncated, info = self.env.step(action)
        raw = self.env.unwrapped
        dropped = bool(raw.data.xpos[raw.obj_body_id][2] < PEN_DROP_HEIGHT)
        return obs, reward, terminated or dropped, truncated, info


def make_adroit_env(family: str, *, render_mode: str | None = None) -> gym.Env:
    """The gymnasium-robotics Adroit environment of a family, D4RL's time limit, float32 obs."""
    import gymnasium_robotics

    if family not in _ENV_IDS:
        raise UserError(f"Unknown Adroit family {family!r}: expected one of {', '.join(_ENV_IDS)}.")
    gym.register_envs(gymnasium_robotics)
    env = gym.make(
        _ENV_IDS[family], render_mode=render_mode, max_episode_steps=ADROIT_LIMITS[family]
    )
    if family == "pen":
        env = PenDropTermination(env)
    return as_float32_obs(env)

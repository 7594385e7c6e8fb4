"""Kitchen: D4RL's goal vector, and either D4RL's layout or one clear error under new mujoco."""

from __future__ import annotations

import mujoco
import numpy as np
import pytest

from qt.envs import make_env
from qt.envs.kitchen import EnvUnavailableError, d4rl_goal_vector


def test_goal_vector_of_mixed() -> None:
    # D4RL kitchen_envs.py: microwave 22 -> -0.75; kettle 23..29; bottom burner 11, 12;
    # light switch 17, 18. Everything else 0.
    expected = np.zeros(30)
    expected[22] = -0.75
    expected[23:30] = [-0.23, 0.75, 1.62, 0.99, 0.0, 0.0, -0.06]
    expected[11:13] = [-0.88, -0.01]
    expected[17:19] = [-0.69, -0.05]
    goal = d4rl_goal_vector(("microwave", "kettle", "bottom burner", "light switch"))
    np.testing.assert_allclose(goal, expected, atol=1e-7)


def _mujoco_version() -> tuple[int, int]:
    major, minor = mujoco.__version__.split(".")[:2]
    return int(major), int(minor)


@pytest.mark.skipif(_mujoco_version() < (3, 12), reason="the failure needs mujoco>=3.12")
def test_new_mujoco_gives_one_clear_error() -> None:
    with pytest.raises(EnvUnavailableError, match=r"install 'mujoco<3\.12'.*kitchen-partial-v0"):
        make_env("kitchen-partial-v0")


@pytest.mark.skipif(
    _mujoco_version() >= (3, 12),
    reason="gymnasium-robotics' FrankaKitchen-v1 cannot be built under mujoco>=3.12",
)
def test_kitchen_observation_and_reward() -> None:  # pragma: no cover - needs mujoco<3.12
    env = make_env("kitchen-complete-v0", seed=0)
    obs, _ = env.reset(seed=0)
    assert obs.shape == (60,) and env.action_space.shape == (9,)
    data = env.unwrapped.data
    np.testing.assert_allclose(obs[:30], data.qpos[:30], atol=0.05)  # small observation noise
    np.testing.assert_allclose(obs[30:], d4rl_goal_vector(
        ("microwave", "kettle", "light switch", "slide cabinet")))  # fmt: skip
    _, reward, *_ = env.step(np.zeros(9, np.float32))
    assert reward == 0.0

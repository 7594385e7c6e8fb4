"""Evaluation episodes: many environments stepped in lockstep under one `QTPolicy`.

`run_episodes` plays one episode per seed, `num_envs` at a time: environment i of a wave is
reset with its episode's seed, the policy acts for all running episodes in one batched call,
and episodes leave the batch as they end (terminated, truncated by the environment's own time
limit, or at the policy's `max_ep_len`). Every seed's episode runs exactly once; with
`num_envs=1` it is the one-episode-at-a-time protocol of the reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import gymnasium as gym
import numpy as np

from qt.acting.policy import QTPolicy


@dataclass
class EpisodeStats:
    """Per-episode results, in the order of `seeds`."""

    seeds: np.ndarray
    returns: np.ndarray
    lengths: np.ndarray

    @property
    def steps(self) -> int:
        return int(self.lengths.sum())


def run_episodes(
    policy: QTPolicy,
    env_fn: Callable[[], gym.Env],
    seeds: Sequence[int],
    num_envs: int | None = None,
    on_step: Callable[[int, np.ndarray], None] | None = None,
) -> EpisodeStats:
    """Play one episode per seed with `policy`, `num_envs` episodes at once (default: all).

    `on_step(t, rows)` is called after each step with the wave's indices of the episodes still
    running (used to record videos); it may be None.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        return EpisodeStats(np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64))
    num_envs = len(seeds) if num_envs is None else num_envs
    if num_envs < 1:
        raise ValueError(f"num_envs={num_envs}: expected a whole number >= 1.")
    envs: list[gym.Env] = []
    returns = np.zeros(len(seeds))
    lengths = np.zeros(len(seeds), np.int64)
    try:
        for start in range(0, len(seeds), num_envs):
            wave = seeds[start : start + num_envs]
            while len(envs) < len(wave):
                envs.append(env_fn())
            first = [envs[i].reset(seed=s)[0] for i, s in enumerate(wave)]
            policy.reset(np.stack(first), wave)
            running = list(range(len(wave)))  # wave indices, in the policy's batch order
            for t in range(policy.max_ep_len):
                actions = policy.act()
                rewards, next_obs, ended = [], [], []
                for row, i in enumerate(running):
                    obs, reward, terminated, truncated, _ = envs[i].step(actions[row])
                    returns[start + i] += float(reward)
                    lengths[start + i] += 1
                    rewards.append(float(reward))
                    next_obs.append(obs)
                    ended.append(terminated or truncated)
                if on_step is not None:
                    on_step(t, np.asarray(running))
                if all(ended) or t + 1 == policy.max_ep_len:
                    break
                policy.observe(actions, rewards, np.stack(next_obs))
                if any(ended):
                    keep = [row for row, done in enumerate(ended) if not done]
                    policy.keep(keep)
                    running = [running[row] for row in keep]
    finally:
        for env in envs:
            env.close()
    return EpisodeStats(np.asarray(seeds, np.int64), returns, lengths)


__all__ = ["EpisodeStats", "run_episodes"]

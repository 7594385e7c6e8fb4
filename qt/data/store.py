"""TrajectoryStore: a dataset prepared for sampling, in flat contiguous arrays.

Everything the sampler reads is computed once here (docs/algorithm.md §1): tuned rewards, per-step
returns-to-go, normalised states, and the trajectories that may be sampled (`pct_traj`) with
their length-proportional probabilities. Each per-step array has one extra row at the end, the
padding value, so a window's left padding is a gather of that row.
"""

from __future__ import annotations

import numpy as np

from qt.data.readers import Trajectories
from qt.errors import UserError

REWARD_TUNES = ("cql_antmaze",)


def tune_rewards(rewards: np.ndarray, reward_tune: str | None) -> np.ndarray:
    """docs/algorithm.md §1: `cql_antmaze` maps r to (r - 0.5) * 4 (in float32, as the reference)."""
    if reward_tune is None:
        return rewards
    if reward_tune == "cql_antmaze":
        return (rewards - np.float32(0.5)) * np.float32(4.0)
    raise UserError(
        f"Unknown reward_tune {reward_tune!r}: expected None or one of {', '.join(REWARD_TUNES)}."
    )


def _trajectory_rtg(rewards: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Per-trajectory reverse cumulative sums in float32, one vectorised cumsum each.

    A single global cumsum and a subtraction would be faster but rounds differently from the
    reference, which sums each trajectory on its own; a trajectory is at most a few thousand
    steps, so the loop runs over trajectories, never over steps.
    """
    out = np.empty_like(rewards, dtype=np.float32)
    for s, e in zip(offsets[:-1].tolist(), offsets[1:].tolist()):
        out[s:e] = np.cumsum(rewards[s:e][::-1], dtype=np.float32)[::-1]
    return out


def top_trajectories(returns: np.ndarray, lengths: np.ndarray, pct_traj: float) -> np.ndarray:
    """Indices of the highest-return trajectories that together hold at most `pct_traj` of the
    steps (at least one), lowest return first, as the reference keeps them."""
    if not 0.0 < pct_traj <= 1.0:
        raise UserError(f"pct_traj={pct_traj}: expected a fraction in (0, 1].")
    budget = max(int(pct_traj * int(lengths.sum())), 1)
    order = np.argsort(returns)  # lowest to highest
    # keep the longest suffix of `order` whose lengths sum within the budget (the best one
    # always): cumulative sums from the top
    from_top = np.cumsum(lengths[order][::-1])
    count = max(int(np.searchsorted(from_top, budget, side="right")), 1)
    return order[-count:]


class TrajectoryStore:
    """Flat arrays of one dataset plus its statistics, ready for `gather_segments`.

    Attributes (N steps, n trajectories):
        offsets (n+1,), lengths (n,), returns (n,) raw-reward returns
        state_mean, state_std (S,) float32: over the states of every kept trajectory
        states (N+1, S) float32 normalised; row N is the padding state (0 - mean) / std
        actions (N+1, A), rewards (N+1,) tuned, terminals (N+1,) bool (pad row True), rtg (N+1,)
        returns-to-go divided by `scale` (pad row 0)
        sample_trajs (m,), sample_p (m,): trajectories to sample and their probabilities
    """

    def __init__(
        self,
        traj: Trajectories,
        *,
        scale: float = 1.0,
        reward_tune: str | None = None,
        pct_traj: float = 1.0,
    ) -> None:
        if scale <= 0:
            raise UserError(f"scale={scale}: expected a positive number.")
        self.source = traj.source
        self.offsets = np.asarray(traj.offsets, dtype=np.int64)
        self.lengths = np.diff(self.offsets)
        self.num_steps = int(self.offsets[-1])
        self.scale = float(scale)
        obs = traj.observations
        self.state_dim, self.act_dim = obs.shape[1], traj.actions.shape[1]
        # Statistics as the reference computes them: float32 mean/std over all kept states
        self.state_mean = np.mean(obs, axis=0)
        self.state_std = np.std(obs, axis=0) + np.float32(1e-6)
        self.returns = np.array(
            [traj.rewards[s:e].sum() for s, e in zip(self.offsets[:-1], self.offsets[1:])]
        )
        mean64, std64 = self.state_mean.astype(np.float64), self.state_std.astype(np.float64)
        pad_state = ((0.0 - mean64) / std64).astype(np.float32)
        self.states = np.concatenate(
            [((obs.astype(np.float64) - mean64) / std64).astype(np.float32), pad_state[None]]
        )
        self.actions = np.concatenate([traj.actions, np.zeros((1, self.act_dim), np.float32)])
        rewards = tune_rewards(traj.rewards, reward_tune)
        self.rewards = np.append(rewards, np.float32(0)).astype(np.float32)
        self.terminals = np.append(traj.terminals != 0, True)  # bool: a quarter of float32
        rtg = _trajectory_rtg(rewards, self.offsets)
        self.rtg = np.append(rtg.astype(np.float64) / self.scale, 0.0).astype(np.float32)
        self.sample_trajs = top_trajectories(self.returns, self.lengths, pct_traj)
        kept_lengths = self.lengths[self.sample_trajs]
        self.sample_p = kept_lengths / kept_lengths.sum()

    @property
    def pad_row(self) -> int:
        return self.num_steps

    def __len__(self) -> int:
        return len(self.lengths)

    def summary(self) -> str:
        r = self.returns
        return (
            f"{len(self)} trajectories, {self.num_steps} steps; return mean {r.mean():.2f} "
            f"std {r.std():.2f} min {r.min():.2f} max {r.max():.2f}"
        )


__all__ = ["REWARD_TUNES", "TrajectoryStore", "top_trajectories", "tune_rewards"]

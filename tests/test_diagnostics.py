"""qt.diagnostics: returns, correlations and the critic/actor comparisons on hand-made data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qt.data.readers import Trajectories
from qt.data.store import TrajectoryStore
from qt.diagnostics import (
    actor_vs_data,
    critic_vs_returns,
    discounted_returns,
    goal_occupancy,
    rank_correlation,
)


def _brute_returns(rewards, ends, discount):
    """G_t written out as a double loop: sum over the steps up to the next end."""
    n = len(rewards)
    out = np.zeros(n)
    for t in range(n):
        g, k = 0.0, 0
        for j in range(t, n):
            g += discount**k * rewards[j]
            k += 1
            if ends[j]:
                break
        out[t] = g
    return out


def test_discounted_returns_equal_the_double_loop():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=200)
    ends = rng.random(200) < 0.05
    ends[-1] = True
    got = discounted_returns(rewards, ends, 0.9)
    np.testing.assert_allclose(got, _brute_returns(rewards, ends, 0.9), rtol=1e-12, atol=1e-12)
    # by hand: r = (1, 2, 3), one episode, discount 0.5 -> (1 + 1 + 0.75, 2 + 1.5, 3)
    np.testing.assert_allclose(
        discounted_returns(np.array([1.0, 2.0, 3.0]), np.array([0, 0, 1], bool), 0.5),
        [2.75, 3.5, 3.0],
    )


def test_discounted_returns_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="expected equal"):
        discounted_returns(np.zeros(3), np.zeros(4, bool), 0.9)


def test_rank_correlation_matches_the_formula_without_ties():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=50), rng.normal(size=50)
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    n = 50
    rho = 1 - 6 * np.sum((rx - ry) ** 2) / (n * (n**2 - 1))
    assert rank_correlation(x, y) == pytest.approx(rho, abs=1e-12)
    assert rank_correlation(x, np.exp(x)) == pytest.approx(1.0)


def _store(lengths, seed=0):
    """States carry their flat step index in column 0, so a critic can look its value up."""
    rng = np.random.default_rng(seed)
    n = int(sum(lengths))
    obs = np.stack([np.arange(n, dtype=np.float32), rng.normal(size=n).astype(np.float32)], 1)
    traj = Trajectories(
        observations=obs,
        actions=rng.uniform(-1, 1, size=(n, 2)).astype(np.float32),
        rewards=rng.random(n).astype(np.float32),
        terminals=np.zeros(n, np.float32),
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    )
    return TrajectoryStore(traj)


class _LookupCritic(torch.nn.Module):
    """q_min(s, a) = table[step index recovered from the normalised state]."""

    def __init__(self, store, table):
        super().__init__()
        self.mean, self.std = float(store.state_mean[0]), float(store.state_std[0])
        self.table = torch.as_tensor(table, dtype=torch.float64)

    def q_min(self, s, a):
        index = torch.round(s[:, 0].double() * self.std + self.mean).long()
        return self.table[index][:, None]


@pytest.mark.parametrize("continuing", [True, False])
def test_critic_vs_returns_pairs_each_state_with_its_own_return(continuing):
    store = _store([30, 50, 20])
    n = store.num_steps
    ends = np.zeros(n, bool)
    ends[-1] = True
    if not continuing:
        ends[store.offsets[1:] - 1] = True
    g = _brute_returns(store.rewards[:n].astype(np.float64), ends, 0.95)
    exact = critic_vs_returns(
        _LookupCritic(store, g), store, 0.95, 60, np.random.default_rng(0), continuing
    )
    assert exact["n"] == 60
    assert exact["bias"] == pytest.approx(0.0, abs=1e-5)
    assert exact["rmse"] == pytest.approx(0.0, abs=1e-5)
    assert exact["pearson"] == pytest.approx(1.0) and exact["spearman"] == pytest.approx(1.0)
    # a critic that is off by +2 everywhere: bias and rmse 2, correlations still 1
    shifted = critic_vs_returns(
        _LookupCritic(store, g + 2.0), store, 0.95, 60, np.random.default_rng(0), continuing
    )
    assert shifted["bias"] == pytest.approx(2.0, abs=1e-5)
    assert shifted["rmse"] == pytest.approx(2.0, abs=1e-5)
    # returns computed the other way round (cut vs continuing) no longer match exactly
    other = critic_vs_returns(
        _LookupCritic(store, g), store, 0.95, 100, np.random.default_rng(0), not continuing
    )
    assert other["rmse"] > 0.1


class _CopyActor(torch.nn.Module):
    """Predicts the window's own actions, plus a fixed offset."""

    def __init__(self, offset):
        super().__init__()
        self.offset = torch.as_tensor(offset, dtype=torch.float32)

    def forward(self, states, actions, rewards, rtg, timesteps, mask):
        from qt.models.actor import ActorOutput

        return ActorOutput(states, actions + self.offset, None)


class _SumCritic(torch.nn.Module):
    def q_min(self, s, a):
        return a.sum(-1, keepdim=True)


def test_actor_vs_data_measures_distance_and_the_critics_preference():
    store = _store([40, 40, 40])
    same = actor_vs_data(
        _CopyActor([0.0, 0.0]), _SumCritic(), store, 5, 100, 16, np.random.default_rng(0)
    )
    assert same["action_mse"] == pytest.approx(0.0, abs=1e-12)
    assert same["q_gain_mean"] == pytest.approx(0.0, abs=1e-6)
    moved = actor_vs_data(
        _CopyActor([0.3, -0.1]), _SumCritic(), store, 5, 100, 16, np.random.default_rng(0)
    )
    # |(0.3, -0.1)|^2 = 0.1 per step; the critic (sum of the action) gains 0.2 everywhere
    assert moved["action_mse"] == pytest.approx(0.1, rel=1e-5)
    assert moved["q_gain_mean"] == pytest.approx(0.2, rel=1e-5)
    assert moved["q_gain_positive"] == 1.0
    # the same generator seed draws the same windows: at least one valid step each, at most K
    assert moved["n"] == same["n"] and 16 <= same["n"] <= 16 * 5


def test_goal_occupancy_counts_arrivals_and_the_steps_spent_at_the_goal():
    episodes = [
        [0, 0, 1, 1, 0, 1],  # arrives at step 2, then 3 of its 4 steps at the goal
        [0, 0, 0],  # never arrives
        [1, 0, 0, 0],  # starts at the goal and leaves: 1 of 4
        [0, 1],  # arrives at the last step: 1 of 1
    ]
    got = goal_occupancy([np.array(e, dtype=np.float32) for e in episodes])
    assert got == {
        "episodes": 4,
        "reached": 0.75,
        "first_arrival_median": 1.0,  # of 2, 0, 1
        "stay_share": pytest.approx(5 / 9),  # pooled: (3 + 1 + 1) of (4 + 4 + 1) steps
    }
    nowhere = goal_occupancy([np.zeros(5), np.zeros(3)])
    assert nowhere["reached"] == 0.0 and np.isnan(nowhere["stay_share"])
    # a dense reward (exp(-distance)) says nothing about being at the goal
    assert goal_occupancy([np.array([0.0, 0.5, 1.0])]) is None
    assert goal_occupancy([]) is None


def test_reaching_and_staying_is_measured_where_the_reward_marks_the_goal():
    from qt.diagnostics import rewards_mark_the_goal

    assert rewards_mark_the_goal("maze2d-umaze-v1") and rewards_mark_the_goal("maze2d-large-v1")
    assert rewards_mark_the_goal("antmaze-umaze-v2")
    # dense maze rewards fall with the distance; kitchen's 0/1 count subtasks done in a step
    assert not rewards_mark_the_goal("maze2d-umaze-dense-v1")
    assert not rewards_mark_the_goal("kitchen-complete-v0")
    assert not rewards_mark_the_goal("hopper-medium-replay-v2")

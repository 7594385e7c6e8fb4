"""Store statistics and segment sampling against the authors' per-sample `get_batch`, written
out as a loop; the random draw's distribution; the stream's seeding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from qt.data.readers import Trajectories
from qt.data.sampler import (
    SegmentStream,
    check_full_windows,
    draw_starts,
    gather_segments,
)
from qt.data.store import TrajectoryStore, top_trajectories


def _trajectories(lengths, seed=0, state_dim=3, act_dim=2) -> Trajectories:
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    terminals = np.zeros(n, np.float32)
    terminals[np.cumsum(lengths)[::2] - 1] = 1.0  # every other trajectory ends in a terminal
    return Trajectories(
        observations=(rng.normal(size=(n, state_dim)) * 3 + 1).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32),
        rewards=rng.normal(size=n).astype(np.float32),
        terminals=terminals,
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
    )


def _discount_cumsum(x, gamma=1.0):
    out = np.zeros_like(x)
    out[-1] = x[-1]
    for t in reversed(range(x.shape[0] - 1)):
        out[t] = x[t] + gamma * out[t + 1]
    return out


def _reference_window(traj, i, si, K, max_ep_len, scale, mean, std, reward_tune=None):
    """The authors' get_batch body for one sample, given its trajectory and start."""
    s0, e0 = traj.offsets[i], traj.offsets[i + 1]
    obs, act = traj.observations[s0:e0], traj.actions[s0:e0]
    rew, term = traj.rewards[s0:e0], traj.terminals[s0:e0]
    if reward_tune == "cql_antmaze":
        rew = (rew - 0.5) * 4.0
    s = obs[si : si + K][None]
    a = act[si : si + K][None]
    d = term[si : si + K][None, :, None]
    ts = np.arange(si, si + s.shape[1])[None]
    ts[ts >= max_ep_len] = max_ep_len - 1
    r = rew[si : si + K][None, :, None]
    rtg = _discount_cumsum(rew[si:])[: s.shape[1] + 1][None, :, None]
    if rtg.shape[1] <= s.shape[1]:
        rtg = np.concatenate([rtg, np.zeros((1, 1, 1))], axis=1)
    tlen = s.shape[1]
    s = np.concatenate([np.zeros((1, K - tlen, s.shape[2])), s], axis=1)
    s = (s - mean) / std
    a = np.concatenate([np.zeros((1, K - tlen, a.shape[2])), a], axis=1)
    r = np.concatenate([np.zeros((1, K - tlen, 1)), r], axis=1)
    d = np.concatenate([np.ones((1, K - tlen, 1)), d], axis=1)
    rtg = np.concatenate([np.zeros((1, K - tlen, 1)), rtg], axis=1) / scale
    ts = np.concatenate([np.zeros((1, K - tlen)), ts], axis=1)
    mask = np.concatenate([np.zeros((1, K - tlen)), np.ones((1, tlen))], axis=1)
    f32 = lambda x: torch.from_numpy(x[0]).to(torch.float32)  # noqa: E731
    return {
        "states": f32(s), "actions": f32(a), "rewards": f32(r), "dones": f32(d)[:, 0],
        "rtg": f32(rtg), "timesteps": torch.from_numpy(ts[0]).long(), "mask": f32(mask),
    }  # fmt: skip


def test_store_statistics_as_the_reference_computes_them():
    traj = _trajectories([7, 30, 12, 3])
    store = TrajectoryStore(traj, scale=10.0)
    obs = traj.observations
    np.testing.assert_array_equal(store.state_mean, np.mean(obs, axis=0))
    np.testing.assert_array_equal(store.state_std, np.std(obs, axis=0) + 1e-6)
    expected = [traj.rewards[s:e].sum() for s, e in zip(traj.offsets[:-1], traj.offsets[1:])]
    np.testing.assert_array_equal(store.returns, expected)
    # returns-to-go, trajectory by trajectory, against the reference's loop
    for s, e in zip(traj.offsets[:-1], traj.offsets[1:]):
        rtg = _discount_cumsum(traj.rewards[s:e])
        np.testing.assert_array_equal(
            store.rtg[s:e], (rtg.astype(np.float64) / 10).astype(np.float32)
        )


@pytest.mark.parametrize("pct", [1.0, 0.5, 0.3, 0.01])
def test_pct_traj_keeps_the_reference_set(pct):
    rng = np.random.default_rng(1)
    lengths = rng.integers(5, 50, size=40)
    returns = rng.normal(size=40)
    # the reference's loop
    budget = max(int(pct * lengths.sum()), 1)
    order = np.argsort(returns)
    num, steps, ind = 1, lengths[order[-1]], len(lengths) - 2
    while ind >= 0 and steps + lengths[order[ind]] <= budget:
        steps += lengths[order[ind]]
        num += 1
        ind -= 1
    np.testing.assert_array_equal(top_trajectories(returns, lengths, pct), order[-num:])


@pytest.mark.parametrize("reward_tune", [None, "cql_antmaze"])
def test_gather_equals_the_reference_window_at_every_start(reward_tune):
    lengths = [7, 30, 12, 3, 25]
    traj = _trajectories(lengths, seed=2)
    K, max_ep_len, scale = 10, 20, 10.0  # max_ep_len 20 < 30: timesteps are clipped
    store = TrajectoryStore(traj, scale=scale, reward_tune=reward_tune)
    pairs = [(i, si) for i, n in enumerate(lengths) for si in range(n)]  # every window
    trajs, starts = map(np.array, zip(*pairs))
    batch = gather_segments(store, trajs, starts, K, max_ep_len)
    for b, (i, si) in enumerate(pairs):
        ref = _reference_window(
            traj, i, si, K, max_ep_len, scale, store.state_mean, store.state_std, reward_tune
        )
        for key, value in ref.items():
            got = getattr(batch, key)[b]
            assert torch.equal(got.reshape(value.shape), value), (key, i, si)
    assert batch.rtg.shape == (len(pairs), K + 1, 1) and batch.states.shape == (len(pairs), K, 3)


def test_draws_follow_lengths_and_bounds():
    lengths = [5, 40, 15, 100]
    store = TrajectoryStore(_trajectories(lengths))
    rng = np.random.default_rng(0)
    trajs, starts = draw_starts(store, 200_000, K=4, rng=rng)
    freq = np.bincount(trajs, minlength=4) / len(trajs)
    np.testing.assert_allclose(freq, np.array(lengths) / sum(lengths), atol=0.005)
    # starts uniform over [0, len-1]: the mean start of trajectory 3 is 49.5, both ends drawn
    s3 = starts[trajs == 3]
    assert s3.min() == 0 and s3.max() == 99 and abs(s3.mean() - 49.5) < 1.0
    # full windows: [0, len-K-1], both ends drawn, every window full
    trajs, starts = draw_starts(store, 100_000, K=4, rng=rng, full_windows_only=True)
    assert np.all(starts <= store.lengths[trajs] - 5)
    s1 = starts[trajs == 1]
    assert s1.min() == 0 and s1.max() == 35
    batch = gather_segments(store, trajs[:500], starts[:500], 4, 1000)
    assert bool((batch.mask == 1).all())


def test_pct_traj_restricts_the_draw():
    traj = _trajectories([10, 10, 10, 10], seed=4)
    store = TrajectoryStore(traj, pct_traj=0.5)
    best_two = set(np.argsort(store.returns)[-2:].tolist())
    trajs, _ = draw_starts(store, 1000, K=3, rng=np.random.default_rng(0))
    assert set(np.unique(trajs).tolist()) == best_two


def test_full_windows_needs_long_enough_trajectories():
    store = TrajectoryStore(_trajectories([30, 8, 30]))
    check_full_windows(store, K=7)  # 8 >= K + 1
    with pytest.raises(ValueError, match=r"at least 9 steps.*1 shorter ones.*shortest has 8"):
        check_full_windows(store, K=8)


def _batches(loader, n):
    out = []
    for i, b in enumerate(loader):
        out.append(b)
        if i + 1 == n:
            break
    return out


def test_stream_is_the_same_for_any_number_of_workers_and_differs_by_rank():
    store = TrajectoryStore(_trajectories([20, 30, 25, 40]))
    kwargs = dict(K=5, batch_size=6, max_ep_len=1000, seed=7)
    base = _batches(DataLoader(SegmentStream(store, **kwargs), batch_size=None), 5)
    two = _batches(DataLoader(SegmentStream(store, **kwargs), batch_size=None, num_workers=2), 5)
    for a, b in zip(base, two):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len({tuple(b.timesteps[:, -1].tolist()) for b in base}) == 5  # batches differ
    other = SegmentStream(store, rank=1, **kwargs).batch(0)
    assert not torch.equal(other.states, base[0].states)
    # a stream started at batch 3 continues where a fresh one would be
    resumed = SegmentStream(store, **kwargs)
    resumed.start = 3
    assert torch.equal(_batches(DataLoader(resumed, batch_size=None), 1)[0].states, base[3].states)

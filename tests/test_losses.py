"""qt.losses against brute-force loops over samples and positions (docs/algorithm.md §3)."""

from __future__ import annotations

import pytest
import torch

from qt import losses
from qt.data.batch import Segments

B, K, S, A = 7, 6, 3, 2
GAMMA, SCALE = 0.9, 10.0


def _batch(seed: int) -> Segments:
    """Left-padded windows: sample 0 full, sample 1 one valid step, terminals on 2 and 3."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, K + 1, (B,), generator=g)
    lengths[0], lengths[1], lengths[2] = K, 1, 3
    mask = (torch.arange(K)[None] >= K - lengths[:, None]).float()
    rewards = torch.randn(B, K, 1, generator=g) * mask[..., None]
    dones = 1.0 - mask
    dones[2, -1] = dones[3, -1] = 1.0  # episode ends at the window's last step
    rtg = torch.randn(B, K + 1, 1, generator=g)
    rtg[:, :K] *= mask[..., None]
    return Segments(
        states=torch.randn(B, K, S, generator=g),
        actions=torch.rand(B, K, A, generator=g) * 2 - 1,
        rewards=rewards,
        dones=dones,
        rtg=rtg,
        timesteps=torch.randint(0, 100, (B, K), generator=g),
        mask=mask,
    )


def test_k_step_discounted_targets_against_loop():
    batch = _batch(0)
    q_next = torch.randn(B, 1, generator=torch.Generator().manual_seed(1))
    rewards_before = batch.rewards.clone()
    targets, rewards = losses.k_step_targets(batch.rewards, batch.dones, batch.mask, q_next, GAMMA)
    assert torch.equal(batch.rewards, rewards_before)  # input untouched
    for b in range(B):
        not_done = 1.0 - float(batch.dones[b, K - 1])
        for t in range(K):
            if batch.mask[b, t] == 0:
                continue
            want = sum(GAMMA ** (j - t) * float(batch.rewards[b, j, 0]) for j in range(t, K - 1))
            want += GAMMA ** (K - 1 - t) * not_done * float(q_next[b, 0])
            assert float(targets[b, t, 0]) == pytest.approx(want, rel=1e-5, abs=1e-5), (b, t)
        assert float(rewards[b, K - 1, 0]) == 0.0
        assert torch.equal(rewards[b, : K - 1], batch.rewards[b, : K - 1])
    # the terminal samples bootstrap nothing: their last-step target is exactly 0
    assert targets[2, K - 1, 0] == 0 and targets[3, K - 1, 0] == 0


def test_k_step_targets_ignore_padded_rewards_at_valid_positions():
    batch = _batch(2)
    q_next = torch.randn(B, 1, generator=torch.Generator().manual_seed(3))
    a, _ = losses.k_step_targets(batch.rewards, batch.dones, batch.mask, q_next, GAMMA)
    noisy = batch.rewards + 100.0 * (1 - batch.mask)[..., None]
    b, _ = losses.k_step_targets(noisy, batch.dones, batch.mask, q_next, GAMMA)
    valid = batch.mask.bool()
    torch.testing.assert_close(a[valid], b[valid])


def test_k_step_rtg_targets_against_loop():
    batch = _batch(4)
    q_next = torch.randn(B, 1, generator=torch.Generator().manual_seed(5))
    targets = losses.k_step_targets_rtg(batch.rtg, batch.dones, q_next, SCALE)
    for b in range(B):
        not_done = 1.0 - float(batch.dones[b, K - 1])
        for t in range(K):
            if batch.mask[b, t] == 0:
                continue
            want = (float(batch.rtg[b, t, 0]) - float(batch.rtg[b, K - 1, 0])) * SCALE
            want += not_done * float(q_next[b, 0])
            assert float(targets[b, t, 0]) == pytest.approx(want, rel=1e-5, abs=1e-5)


def test_one_step_targets_against_loop():
    batch = _batch(6)
    q_next = torch.randn(B, K, 1, generator=torch.Generator().manual_seed(7))
    targets = losses.one_step_targets(batch.rewards, q_next, GAMMA)
    for b in range(B):
        for t in range(K - 1):
            want = float(batch.rewards[b, t, 0]) + GAMMA * float(q_next[b, t + 1, 0])
            assert float(targets[b, t, 0]) == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert float(targets[b, K - 1, 0]) == 0.0  # no done mask, no last target


def test_critic_targets_dispatch():
    batch = _batch(8)
    q_last = torch.randn(B, 1, generator=torch.Generator().manual_seed(9))
    q_all = torch.randn(B, K, 1, generator=torch.Generator().manual_seed(10))
    t, r = losses.critic_targets(batch, q_last, discount=GAMMA, scale=SCALE)
    torch.testing.assert_close(
        t, losses.k_step_targets(batch.rewards, batch.dones, batch.mask, q_last, GAMMA)[0]
    )
    assert torch.all(r[:, -1] == 0)
    t, r = losses.critic_targets(batch, q_last, discount=GAMMA, scale=SCALE, use_discount=False)
    torch.testing.assert_close(t, losses.k_step_targets_rtg(batch.rtg, batch.dones, q_last, SCALE))
    assert r is batch.rewards
    t, r = losses.critic_targets(batch, q_all, discount=GAMMA, scale=SCALE, k_rewards=False)
    torch.testing.assert_close(t, losses.one_step_targets(batch.rewards, q_all, GAMMA))


def test_max_q_backup_repetition_and_noise():
    batch = _batch(11)
    R = 10
    rep = losses.repeat_for_max_q_backup(batch, R, 0.1, torch.Generator().manual_seed(12))
    expected_noise = torch.randn(R - 1, generator=torch.Generator().manual_seed(12))
    assert rep.states.shape == (B * R, K, S) and rep.rtg.shape == (B * R, K + 1, 1)
    for b in range(B):
        for r in range(R):
            row = b * R + r
            for name in ("states", "actions", "rewards", "dones", "timesteps", "mask"):
                assert torch.equal(getattr(rep, name)[row], getattr(batch, name)[b])
            for j in range(K + 1):
                want = float(batch.rtg[b, j, 0])
                if j == K - 1 and r > 0:
                    want += 0.1 * float(expected_noise[r - 1])
                assert float(rep.rtg[row, j, 0]) == pytest.approx(want, abs=1e-6)


def test_bootstrap_q_max_over_repetitions_then_min():
    R = 4
    g = torch.Generator().manual_seed(13)
    q1, q2 = torch.randn(B * R, K, 1, generator=g), torch.randn(B * R, K, 1, generator=g)
    out = losses.bootstrap_q(q1, q2, R)
    assert out.shape == (B, K, 1)
    for b in range(B):
        for t in range(K):
            m1 = max(float(q1[b * R + r, t, 0]) for r in range(R))
            m2 = max(float(q2[b * R + r, t, 0]) for r in range(R))
            assert float(out[b, t, 0]) == min(m1, m2)
    # max-then-min differs from min-then-max here, so the order is really tested
    wrong = torch.minimum(q1, q2).unflatten(0, (B, R)).amax(1)
    assert not torch.equal(out, wrong)
    torch.testing.assert_close(losses.bootstrap_q(q1, q2), torch.minimum(q1, q2))


def test_critic_loss_against_loop():
    batch = _batch(14)
    g = torch.Generator().manual_seed(15)
    q1, q2, tgt = (torch.randn(B, K, 1, generator=g) for _ in range(3))
    got = losses.critic_loss(q1, q2, tgt, batch.mask)
    total1 = total2 = 0.0
    n = 0
    for b in range(B):
        for t in range(K - 1):  # the last position never counts
            if batch.mask[b, t] == 1:
                total1 += (float(q1[b, t, 0]) - float(tgt[b, t, 0])) ** 2
                total2 += (float(q2[b, t, 0]) - float(tgt[b, t, 0])) ** 2
                n += 1
    assert float(got) == pytest.approx(total1 / n + total2 / n, rel=1e-5)


@pytest.mark.parametrize("sar", [False, True])
def test_bc_loss_against_loop(sar):
    batch = _batch(16)
    g = torch.Generator().manual_seed(17)
    ap, sp, rp = (
        torch.randn(B, K, A, generator=g),
        torch.randn(B, K, S, generator=g),
        torch.randn(B, K, 1, generator=g),
    )
    got = losses.bc_loss(
        ap, batch.actions, sp, batch.states, batch.mask, rp if sar else None, batch.rewards, SCALE
    )
    act = [
        (float(ap[b, t, i]) - float(batch.actions[b, t, i])) ** 2
        for b in range(B)
        for t in range(K)
        if batch.mask[b, t]
        for i in range(A)
    ]
    nxt = [
        (float(sp[b, t, i]) - float(batch.states[b, t + 1, i])) ** 2
        for b in range(B)
        for t in range(K - 1)
        if batch.mask[b, t]
        for i in range(S)
    ]
    want = sum(act) / len(act) + sum(nxt) / len(nxt)
    if sar:
        rew = [
            (float(rp[b, t, 0]) - float(batch.rewards[b, t, 0]) / SCALE) ** 2
            for b in range(B)
            for t in range(K)
            if batch.mask[b, t]
        ]
        want += sum(rew) / len(rew)
    assert float(got) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("use_q1", [True, False])
def test_q_loss_normalisation_and_branch(use_q1):
    batch = _batch(18)
    g = torch.Generator().manual_seed(19)
    q1 = torch.randn(B, K, 1, generator=g, requires_grad=True)
    q2 = torch.randn(B, K, 1, generator=g, requires_grad=True)
    got = losses.q_loss(q1, q2, batch.mask, use_q1)
    valid = [(b, t) for b in range(B) for t in range(K) if batch.mask[b, t]]
    num, den = (q1, q2) if use_q1 else (q2, q1)
    mean_num = sum(float(num[b, t, 0].detach()) for b, t in valid) / len(valid)
    mean_abs_den = sum(abs(float(den[b, t, 0].detach())) for b, t in valid) / len(valid)
    assert float(got.detach()) == pytest.approx(-mean_num / mean_abs_den, rel=1e-5)
    got.backward()
    # the denominator is detached: only the chosen Q gets a gradient, 1/(n * mean|other|) each
    assert den.grad is None
    expected = torch.zeros_like(num) - batch.mask[..., None] / (len(valid) * mean_abs_den)
    torch.testing.assert_close(num.grad, expected)


def test_coin_flip_is_fair_and_seeded():
    flips = [losses.coin_flip(torch.Generator().manual_seed(s)) for s in range(400)]
    assert 160 < sum(flips) < 240
    again = [losses.coin_flip(torch.Generator().manual_seed(s)) for s in range(400)]
    assert flips == again


def test_masked_mean_of_empty_mask_is_zero():
    assert float(losses.masked_mean(torch.ones(2, 3, 4), torch.zeros(2, 3))) == 0.0

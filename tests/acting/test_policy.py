"""Q-guided acting (docs/algorithm.md §4): candidates against a per-candidate loop written the
reference's way, the critic's pick, return-to-go bookkeeping, and batched == separate."""

from __future__ import annotations

from functools import partial

import gymnasium as gym
import numpy as np
import pytest
import torch

from qt.acting.episodes import run_episodes
from qt.acting.policy import QTPolicy
from qt.envs import make_env
from qt.models import QTActor, TwinCritic

S, A = 4, 2


def _nets(K=5, seed=0):
    torch.manual_seed(seed)
    actor = QTActor(S, A, 16, 1, 2, K=K, max_ep_len=100, dropout=0.0, sar=False, scale=10.0)
    return actor.eval(), TwinCritic(S, A, 16)


def _policy(actor, critic, targets, K=5, **kw):
    mean, std = torch.tensor([0.5, -1.0, 2.0, 0.0]), torch.tensor([2.0, 1.0, 0.5, 3.0])
    return QTPolicy(
        actor, critic, state_mean=mean, state_std=std, scale=10.0, env_targets=targets, K=K,
        max_ep_len=100, **kw,
    )  # fmt: skip


def _advance(policy, steps, rng):
    E = policy.states.shape[0]
    for _ in range(steps):
        policy.observe(rng.uniform(-1, 1, (E, A)), rng.normal(size=E), rng.normal(size=(E, S)))


@pytest.mark.parametrize("targets", [[300.0], [300.0, 150.0], [3.0, 2.0, 1.0],
                                     [300, 200, 150, 100, 50, 20], [1, .9, .8, .7, .6, .5, .3]])  # fmt: skip
@pytest.mark.parametrize("steps", [0, 2, 9])  # windows shorter than, and as long as, K=5
@pytest.mark.parametrize("rtg_no_q", [False, True])
def test_candidates_match_a_per_candidate_loop(targets, steps, rtg_no_q):
    actor, critic = _nets()
    policy = _policy(actor, critic, targets, rtg_no_q=rtg_no_q)
    rng = np.random.default_rng(steps)
    policy.reset(rng.normal(size=(2, S)), seeds=[11, 12])
    _advance(policy, steps, rng)
    win = policy.window()
    got = policy.candidates(win)

    N, M, K, L = 50, len(targets), 5, min(steps + 1, 5)
    copies, n_noise = N // M, N - M * (N // M)
    for e, seed in enumerate([11, 12]):
        g = torch.Generator().manual_seed(seed)  # the draws, in the policy's order
        noise, newest = torch.randn(n_noise, L, generator=g), torch.randn(N - M, generator=g)
        # the reference's history of every target's returns-to-go, then its get_action
        hist = policy.rtg[e, :, : steps + 1]
        for c in range(N):
            if c < M * copies:
                seq = hist[c // copies, -L:].clone()
            else:
                seq = noise[c - M * copies].clone()
            seq = torch.cat([torch.zeros(K - L), seq])
            if c >= M:
                seq[-1] = seq[-1] + noise.new_tensor(0.1) * newest[c - M]
            if c == N - 1 and not rtg_no_q:
                s_prev = win["states"][e, -2] if L >= 2 else torch.zeros(S)
                a_prev = win["actions"][e, -2] if L >= 2 else torch.zeros(A)
                r_prev = win["rewards"][e, -2] if L >= 2 else torch.tensor(0.0)
                seq[-1] = critic.q_min(s_prev[None], a_prev[None])[0, 0] - r_prev / 10.0
            torch.testing.assert_close(got[e, c], seq, rtol=0, atol=1e-6)


def test_returns_to_go_states_and_window_bookkeeping():
    actor, critic = _nets()
    policy = _policy(actor, critic, [300.0, 150.0])
    obs0 = np.array([[1.0, 2.0, 3.0, 4.0]])
    policy.reset(obs0, seeds=[0])
    rewards = [1.5, -0.25, 7.0]
    rng = np.random.default_rng(0)
    acts, obs = [], [obs0[0]]
    for r in rewards:
        acts.append(rng.uniform(-1, 1, A))
        obs.append(rng.normal(size=S))
        policy.observe(acts[-1][None], [r], obs[-1][None])
    # the reference: float32 tensors less Python floats, step by step
    expected = torch.tensor([[30.0], [15.0]])
    for r in rewards:
        expected = torch.cat([expected, expected[:, -1:] - r / 10.0], dim=1)
    assert torch.equal(policy.rtg[0, :, :4], expected)
    win = policy.window()  # t = 3: 4 entries, one pad slot
    mean, std = policy.state_mean, policy.state_std
    normed = (torch.tensor(np.array(obs), dtype=torch.float32) - mean) / std
    assert torch.equal(win["states"][0, 1:], normed) and torch.equal(
        win["states"][0, 0], torch.zeros(S)
    )
    assert torch.equal(win["actions"][0, 1:4], torch.tensor(np.array(acts), dtype=torch.float32))
    assert torch.equal(win["actions"][0, 4], torch.zeros(A))  # the placeholder of step t
    assert win["rewards"][0].tolist() == [0.0, 1.5, -0.25, 7.0, 0.0]
    assert win["timesteps"].tolist() == [0, 0, 1, 2, 3] and win["mask"].tolist() == [0, 1, 1, 1, 1]
    _advance(policy, 3, rng)  # t = 6 > K: the last 5 entries, no padding
    win = policy.window()
    assert win["timesteps"].tolist() == [2, 3, 4, 5, 6] and int(win["mask"].sum()) == 5


class _PreferFirstComponent(torch.nn.Module):
    """A critic that loves actions with a large first component."""

    def q_min(self, state, action):
        return 1e7 * action[..., :1]


def test_the_pick_follows_the_critic_and_infer_no_q_takes_candidate_zero():
    actor, _ = _nets()
    policy = _policy(
        actor, _PreferFirstComponent(), [300.0, 150.0, 20.0], rtg_no_q=True, share_prefix=False
    )
    policy.reset(np.zeros((3, S)), seeds=[1, 2, 3])
    _advance(policy, 3, np.random.default_rng(1))
    seen = {}

    real_actor = policy.actor

    def spy(*args):
        out = real_actor(*args)
        seen["preds"] = out.action_preds[:, -1].reshape(3, 50, A)
        return out

    policy.actor = spy
    chosen = policy.act()
    best = seen["preds"][torch.arange(3), seen["preds"][..., 0].argmax(dim=1)]
    assert torch.equal(torch.as_tensor(chosen), best)
    assert len({tuple(p[:, 0].tolist()) for p in seen["preds"]}) == 3  # candidates differ
    # infer_no_q: candidate 0's action, computed from its window alone; the candidates' noise
    # is still drawn, so the generators stay where an infer_no_q step of the reference leaves them
    twin = _policy(actor, _PreferFirstComponent(), [300.0, 150.0, 20.0], rtg_no_q=True)
    twin.reset(np.zeros((3, S)), seeds=[1, 2, 3])
    _advance(twin, 3, np.random.default_rng(1))
    twin.act()
    twin._candidates(twin.window())
    policy.actor = real_actor
    policy.infer_no_q = True
    first = policy.act()
    torch.testing.assert_close(torch.as_tensor(first), seen["preds"][:, 0], rtol=1e-6, atol=1e-6)
    for mine, theirs in zip(policy.generators, twin.generators, strict=True):
        assert torch.equal(mine.get_state(), theirs.get_state())


@pytest.mark.parametrize("targets", [[300.0, 150.0], [300, 200, 150, 100, 50, 20]])
@pytest.mark.parametrize("steps", [0, 1, 3, 8])
def test_shared_prefixes_give_every_candidates_newest_action(targets, steps):
    """`QTActor.newest_actions` (history once per group) equals one full window per candidate."""
    torch.manual_seed(2)
    actor = QTActor(S, A, 32, 2, 4, K=5, max_ep_len=100, dropout=0.1, sar=False, scale=10.0)
    actor.eval()
    critic = TwinCritic(S, A, 16)
    policy = _policy(actor, critic, targets)
    rng = np.random.default_rng(steps)
    policy.reset(rng.normal(size=(3, S)), seeds=[1, 2, 3])
    _advance(policy, steps, rng)
    win = policy.window()
    rtg, group_rtg, group_of = policy._candidates(win)
    # every candidate's window is its group's with the newest entry replaced
    torch.testing.assert_close(group_rtg[:, group_of, :-1], rtg[..., :-1], rtol=0, atol=0)
    shared = actor.newest_actions(
        win["states"], win["actions"], group_rtg, rtg[:, :, -1], group_of, win["timesteps"],
        win["mask"],
    )  # fmt: skip
    full = policy._all_candidates(win, rtg)
    torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-6)
    assert len({tuple(x) for x in full[0].tolist()}) > 1  # the candidates do differ


def _recording(policy):
    actions = []
    act = policy.act

    def wrapped():
        a = act()
        actions.append(a.copy())
        return a

    policy.act = wrapped
    return actions


def test_batched_acting_equals_separate_runs_with_the_same_seeds():
    actor, critic = _nets(K=4, seed=3)
    seeds = [5, 6, 7]
    env_fn = partial(make_env, "maze2d-umaze-v1")
    together = _policy(actor, critic, [300, 200, 150, 100, 50, 20], K=4)
    together.max_ep_len = 12
    log = _recording(together)
    stats = run_episodes(together, env_fn, seeds)
    for e, seed in enumerate(seeds):
        alone = _policy(actor, critic, [300, 200, 150, 100, 50, 20], K=4)
        alone.max_ep_len = 12
        alone_log = _recording(alone)
        one = run_episodes(alone, env_fn, [seed])
        assert one.lengths[0] == stats.lengths[e] == 12 and one.returns[0] == stats.returns[e]
        mine = np.stack([step[e] for step in log])
        np.testing.assert_allclose(mine, np.concatenate(alone_log), rtol=0, atol=1e-6)


class _CountdownEnv(gym.Env):
    """Ends after `seed` steps (terminated), reward 1 per step; counts its resets."""

    resets: list[int] = []

    def __init__(self):
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, (S,), np.float32)
        self.action_space = gym.spaces.Box(-1, 1, (A,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        _CountdownEnv.resets.append(seed)
        self.left = seed
        return np.full(S, float(seed), np.float32), {}

    def step(self, action):
        self.left -= 1
        return np.full(S, float(self.left), np.float32), 1.0, self.left == 0, False, {}


def test_episodes_end_on_their_own_and_each_runs_once():
    actor, critic = _nets()
    _CountdownEnv.resets = []
    policy = _policy(actor, critic, [300.0])
    policy.max_ep_len = 8
    seeds = [3, 1, 6, 20, 2]  # 20 is cut at max_ep_len
    stats = run_episodes(policy, _CountdownEnv, seeds, num_envs=2)
    assert stats.lengths.tolist() == [3, 1, 6, 8, 2] == stats.returns.tolist()
    assert sorted(_CountdownEnv.resets) == sorted(seeds)


def test_a_policy_from_a_module_acts_with_its_actor_target_critic_and_facts():
    from qt.module import QTModule
    from qt.tasks import get_task

    module = QTModule(state_dim=4, act_dim=2, K=3, max_ep_len=40, hidden_size=8, n_layer=1,
                      n_head=2, scale=10.0, num_candidates=6, rtg_no_q=True,
                      state_mean=[1.0, 2.0, 3.0, 4.0], state_std=[2.0] * 4)  # fmt: skip
    policy = QTPolicy.from_module(module, "maze2d-umaze-v1")
    assert policy.actor is module.actor and policy.critic is module.critic_target
    assert (policy.K, policy.max_ep_len, policy.N, policy.scale) == (3, 40, 6, 10.0)
    assert policy.rtg_no_q and not policy.infer_no_q
    assert (
        policy.state_mean.tolist() == [1.0, 2.0, 3.0, 4.0]
        and policy.state_std.tolist() == [2.0] * 4
    )
    # no env_targets in the module: the registry's, in units of the scale
    expected = [t / 10.0 for t in get_task("maze2d-umaze-v1").env_targets]
    assert policy.targets == pytest.approx(expected)
    assert QTPolicy.from_module(module, "maze2d-umaze-v1", max_ep_len=7).max_ep_len == 7

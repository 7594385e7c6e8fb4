"""QTModule against a step written independently from docs/algorithm.md §3, and its per-epoch schedules.

The reference step below follows the authors' trainer line by line (boolean indexing,
`F.mse_loss`, the critic's targets as a loop over samples and positions, the actor's loss
leaving gradients in the critic); the module's vectorised step must give the same
parameters after a step.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from qt.data.batch import Segments
from qt.module import QTModule

S, A, K, B = 3, 2, 5, 6
SCALE = 10.0


def make_batch(seed: int) -> Segments:
    """B windows with left padding of 0..K-1 steps and a terminal on some last steps."""
    g = torch.Generator().manual_seed(seed)
    pad = torch.tensor([0, 1, 2, 4, 0, 3])
    mask = (torch.arange(K)[None] >= pad[:, None]).float()
    states = torch.randn(B, K, S, generator=g) * mask[..., None]
    actions = (torch.rand(B, K, A, generator=g) * 2 - 1) * mask[..., None]
    rewards = torch.randn(B, K, 1, generator=g) * mask[..., None]
    dones = 1.0 - mask
    dones[4, K - 1] = 1.0  # a terminal at the last step of a full window
    dones[1, K - 1] = 1.0
    rtg = torch.randn(B, K + 1, 1, generator=g)
    rtg[:, :K] *= mask[..., None]
    timesteps = (torch.arange(K)[None] - pad[:, None]).clamp(min=0) * mask.long()
    return Segments(states, actions, rewards, dones, rtg, timesteps, mask)


def reference_targets(batch, q_next, hp) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/algorithm.md §3.1, one sample and one position at a time."""
    rewards = batch.rewards.clone()
    targets = torch.zeros(B, K, 1)
    if hp["k_rewards"] and hp["use_discount"]:
        rewards[:, K - 1] = 0.0
    for b in range(B):
        not_done = 1.0 - float(batch.dones[b, K - 1])
        for t in range(K):
            if hp["k_rewards"] and hp["use_discount"]:
                if batch.mask[b, t] == 0:
                    continue
                ret = sum(hp["discount"] ** (j - t) * float(rewards[b, j]) for j in range(t, K - 1))
                targets[b, t] = ret + hp["discount"] ** (K - 1 - t) * not_done * float(q_next[b])
            elif hp["k_rewards"]:
                diff = float(batch.rtg[b, t] - batch.rtg[b, K - 1]) * SCALE
                targets[b, t] = diff + not_done * float(q_next[b])
            elif t < K - 1:
                targets[b, t] = float(rewards[b, t]) + hp["discount"] * float(q_next[b, t + 1])
    return targets, rewards


def reference_step(module: QTModule, batch: Segments, use_q1: bool) -> dict:
    """One QT step on copies of the module's networks, the authors' way."""
    hp = dict(module.hparams)
    actor, critic = copy.deepcopy(module.actor), copy.deepcopy(module.critic)
    ema, target = copy.deepcopy(module.ema_actor), copy.deepcopy(module.critic_target)
    a_opt = torch.optim.Adam(
        actor.parameters(), lr=hp["learning_rate"], weight_decay=hp["weight_decay"]
    )
    c_opt = torch.optim.Adam(critic.parameters(), lr=hp["critic_lr"])
    states, actions, _, _, rtg, timesteps, mask = batch

    q1, q2 = critic(states, actions)
    with torch.no_grad():
        a_next = ema(states, actions, batch.rewards, rtg[:, :-1], timesteps, mask).action_preds
        if hp["k_rewards"]:
            q_next = torch.min(*target(states[:, -1], a_next[:, -1]))  # (B, 1)
        else:
            q_next = torch.min(*target(states, a_next))  # (B, K, 1)
        targets, rewards = reference_targets(batch, q_next, hp)
    sel = mask[:, :-1] > 0
    critic_loss = F.mse_loss(q1[:, :-1][sel], targets[:, :-1][sel]) + F.mse_loss(
        q2[:, :-1][sel], targets[:, :-1][sel]
    )
    c_opt.zero_grad()
    critic_loss.backward()
    if hp["grad_norm"] > 0:
        torch.nn.utils.clip_grad_norm_(critic.parameters(), hp["grad_norm"])
    c_opt.step()

    out = actor(states, actions, rewards, rtg[:, :-1], timesteps, mask)
    valid = mask.reshape(-1) > 0
    bc = F.mse_loss(out.action_preds.reshape(-1, A)[valid], actions.reshape(-1, A)[valid])
    bc = bc + ((out.state_preds[:, :-1] - states[:, 1:]) ** 2)[mask[:, :-1] > 0].mean()
    if hp["sar"]:
        bc = bc + F.mse_loss(
            out.reward_preds.reshape(-1)[valid], (rewards / SCALE).reshape(-1)[valid]
        )
    aq1, aq2 = critic(states.reshape(-1, S)[valid], out.action_preds.reshape(-1, A)[valid])
    if use_q1:
        q_loss = -aq1.mean() / aq2.abs().mean().detach()
    else:
        q_loss = -aq2.mean() / aq1.abs().mean().detach()
    loss = hp["eta2"] * bc + hp["eta"] * q_loss
    a_opt.zero_grad()
    loss.backward()
    if hp["grad_norm"] > 0:
        torch.nn.utils.clip_grad_norm_(actor.parameters(), hp["grad_norm"])
    a_opt.step()
    return {
        "actor": actor.state_dict(),
        "critic": critic.state_dict(),
        "critic_loss": critic_loss.item(),
        "bc_loss": bc.item(),
        "q_loss": q_loss.item(),
    }


class _Logged(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.epochs: list[dict] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.eta2_used = float(pl_module.eta2)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.steps.append(step | {"eta2_used": self.eta2_used})

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(
    module: QTModule, batches: list[Segments], epochs: int = 1, callbacks: tuple = ()
) -> _Logged:
    logged = _Logged()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[logged, *callbacks],
    )
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(module, loader)
    return logged


VARIANTS = [
    dict(k_rewards=True, use_discount=True, sar=False),
    dict(k_rewards=True, use_discount=False, sar=False),
    dict(k_rewards=False, use_discount=True, sar=False),
    dict(k_rewards=True, use_discount=True, sar=True),
]


@pytest.mark.parametrize(
    "variant", VARIANTS, ids=lambda v: "-".join(k for k, x in v.items() if x) or "one-step"
)
@pytest.mark.parametrize("use_q1", [True, False])
def test_one_step_matches_reference(monkeypatch, variant, use_q1):
    torch.manual_seed(3)
    module = QTModule(
        state_dim=S, act_dim=A, K=K, max_ep_len=K, scale=SCALE, hidden_size=8, n_layer=2,
        n_head=2, dropout=0.0, embed_dropout=0.0, eta=0.7, eta2=1.3, grad_norm=0.05, discount=0.9,
        learning_rate=1e-2, critic_lr=3e-2, weight_decay=1e-2, **variant,
    )  # fmt: skip
    batch = make_batch(0)
    expected = reference_step(module, batch, use_q1)
    monkeypatch.setattr("qt.module.losses.coin_flip", lambda generator=None: use_q1)
    logged = fit(module, [batch])

    for name, value in expected["actor"].items():
        torch.testing.assert_close(module.actor.state_dict()[name], value, atol=1e-6, rtol=1e-5)
    for name, value in expected["critic"].items():
        torch.testing.assert_close(module.critic.state_dict()[name], value, atol=1e-6, rtol=1e-5)
    step = logged.steps[0]
    assert step["train/critic_loss"] == pytest.approx(expected["critic_loss"], rel=1e-5)
    assert step["train/bc_loss"] == pytest.approx(expected["bc_loss"], rel=1e-5)
    assert step["train/q_loss"] == pytest.approx(expected["q_loss"], rel=1e-5)
    # the step moved both networks (a no-op step would also "match" a no-op reference)
    assert not torch.equal(module.actor.predict_state.weight, module.ema_actor.predict_state.weight)


def test_targets_are_untouched_without_the_callback():
    torch.manual_seed(0)
    module = QTModule(state_dim=S, act_dim=A, K=K, max_ep_len=K, hidden_size=8, n_layer=1, n_head=2)
    ema0 = copy.deepcopy(module.ema_actor.state_dict())
    fit(module, [make_batch(1), make_batch(2)])
    for name, value in module.ema_actor.state_dict().items():
        assert torch.equal(value, ema0[name])


def test_cosine_learning_rates_and_eta2_over_epochs():
    torch.manual_seed(0)
    lr, critic_lr, lr_min, t_max, lam = 1e-3, 2e-3, 1e-5, 4, 2.0
    module = QTModule(
        state_dim=S, act_dim=A, K=K, max_ep_len=K, hidden_size=8, n_layer=1, n_head=2,
        learning_rate=lr, critic_lr=critic_lr, lr_decay=True, lr_min=lr_min, max_iters=t_max,
        eta2=3.0, lambda_=lam,
    )  # fmt: skip
    logged = fit(module, [make_batch(i) for i in range(2)], epochs=5)

    def cosine(base: float, epoch: int) -> float:
        return lr_min + (base - lr_min) * (1 + math.cos(math.pi * epoch / t_max)) / 2

    # steps of epoch e run with the e-th value; the schedule moves once per epoch
    for i, step in enumerate(logged.steps):
        epoch = i // 2
        assert step["lr/actor"] == pytest.approx(cosine(lr, epoch), rel=1e-6)
        assert step["lr/critic"] == pytest.approx(cosine(critic_lr, epoch), rel=1e-6)
        assert step["eta2_used"] == pytest.approx(3.0 / lam**epoch)
    assert float(module.eta2) == pytest.approx(3.0 / lam**5)


def test_same_seed_same_parameters_and_different_seed_differs():
    def run(seed: int) -> dict:
        L.seed_everything(seed)
        module = QTModule(
            state_dim=S, act_dim=A, K=K, max_ep_len=K, hidden_size=8, n_layer=1, n_head=2,
            dropout=0.3, max_q_backup=True,
        )  # fmt: skip
        fit(module, [make_batch(i) for i in range(3)])
        return module.state_dict()

    a, b, c = run(5), run(5), run(6)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert any(not torch.equal(a[n], c[n]) for n in a if n.startswith("actor."))


@pytest.mark.parametrize("step_start_ema", [1000, 0])
def test_critic_ignores_the_q_term_until_the_ema_actor_moves(step_start_ema):
    """Until step_start_ema the critic bootstraps from the EMA actor's initial copy, so QT
    (eta 5) and DT (eta 0) from one seed train the same critic and target critic while their
    actors differ; once the EMA actor follows the actor, the critics part too."""
    from qt.callbacks.targets import TargetNetworks

    def run(eta: float) -> QTModule:
        L.seed_everything(7)
        module = QTModule(
            state_dim=S, act_dim=A, K=K, max_ep_len=K, hidden_size=8, n_layer=1, n_head=2,
            dropout=0.2, eta=eta, learning_rate=1e-2, critic_lr=1e-2,
        )  # fmt: skip
        targets = TargetNetworks(step_start_ema=step_start_ema, update_ema_every=1)
        fit(module, [make_batch(i) for i in range(4)], callbacks=(targets,))
        return module

    qt, dt = run(5.0), run(0.0)
    assert not torch.equal(qt.actor.predict_action[0].weight, dt.actor.predict_action[0].weight)
    critics_equal = all(
        torch.equal(a, b)
        for net in ("critic", "critic_target")
        for a, b in zip(
            getattr(qt, net).state_dict().values(), getattr(dt, net).state_dict().values()
        )
    )
    assert critics_equal == (step_start_ema >= 4)


def test_bad_hyperparameters_are_named():
    with pytest.raises(ValueError, match="model.hidden_size=10 is not divisible by model.n_head=4"):
        QTModule(hidden_size=10, n_head=4)
    with pytest.raises(ValueError, match=r"model.lambda_=0"):
        QTModule(lambda_=0)
    with pytest.raises(ValueError, match=r"state_mean/state_std"):
        QTModule(state_dim=3, state_mean=[0.0, 1.0])


def test_critic_width_defaults_to_the_actors_and_can_differ():
    shared = QTModule(state_dim=S, act_dim=A, K=K, max_ep_len=K, hidden_size=8, n_layer=1, n_head=2)
    wide = QTModule(
        state_dim=S, act_dim=A, K=K, max_ep_len=K, hidden_size=8, n_layer=1, n_head=2,
        critic_hidden_size=32,
    )  # fmt: skip

    def critic_params(width: int) -> int:  # two MLPs (S+A) -> w -> w -> w -> 1, with biases
        return 2 * ((S + A + 1) * width + 2 * (width + 1) * width + (width + 1))

    for module, width in ((shared, 8), (wide, 32)):
        for net in (module.critic, module.critic_target):
            assert sum(p.numel() for p in net.parameters()) == critic_params(width)
    # the actor does not change with the critic's width
    assert sum(p.numel() for p in wide.actor.parameters()) == sum(
        p.numel() for p in shared.actor.parameters()
    )
    with pytest.raises(ValueError, match=r"model.critic_hidden_size=0"):
        QTModule(critic_hidden_size=0)


@pytest.mark.parametrize("ema_dropout", [True, False])
def test_ema_actor_proposes_next_actions_with_dropout_as_the_reference(ema_dropout):
    # docs/algorithm.md §7: the authors never switch their EMA copy to eval mode, so its dropout
    # is active when it proposes a'; `ema_dropout=False` is the switch that turns that off.
    torch.manual_seed(0)
    module = QTModule(state_dim=S, act_dim=A, K=K, max_ep_len=K, hidden_size=8, n_layer=1,
                      n_head=2, dropout=0.5, ema_dropout=ema_dropout)  # fmt: skip
    modes = []
    module.ema_actor.register_forward_hook(lambda mod, args, out: modes.append(mod.training))
    batch = make_batch(0)
    module._critic_loss(batch)
    module._critic_loss(batch)
    assert modes == [ema_dropout, ema_dropout]
    # with dropout active the proposals differ between two calls on the same batch
    module.ema_actor.train(ema_dropout)
    with torch.no_grad():
        a1, a2 = (module.ema_actor(batch.states, batch.actions, batch.rewards, batch.rtg[:, :-1],
                                   batch.timesteps, batch.mask).action_preds for _ in range(2))  # fmt: skip
    assert torch.equal(a1, a2) != ema_dropout

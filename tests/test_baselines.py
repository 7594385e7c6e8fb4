"""The Decision Transformer as its authors trained it (docs/baselines.md), as QTModule options.

The expected parameters come from steps written out here: the masked action MSE by boolean
indexing, gradient clipping by the total norm, and AdamW's update with a linear warm-up of the
learning rate, each by its formula, on copies of the module's actor.
"""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from qt.callbacks.targets import TargetNetworks
from qt.data.batch import Segments
from qt.errors import UserError
from qt.module import QTModule

S, A, K, B = 3, 2, 5, 6

# The published recipe's options (configs/dt/): no critic, no Q, the action loss, AdamW, warm-up.
DT = dict(
    eta=0.0, rtg_no_q=True, infer_no_q=True, train_critic=False, next_state_loss=False,
    optimizer="adamw", lr_decay=False,
)  # fmt: skip


def make_batch(seed: int) -> Segments:
    """B windows with left padding of 0..K-1 steps."""
    g = torch.Generator().manual_seed(seed)
    pad = torch.tensor([0, 1, 2, 4, 0, 3])
    mask = (torch.arange(K)[None] >= pad[:, None]).float()
    states = torch.randn(B, K, S, generator=g) * mask[..., None]
    actions = (torch.rand(B, K, A, generator=g) * 2 - 1) * mask[..., None]
    rewards = torch.randn(B, K, 1, generator=g) * mask[..., None]
    rtg = torch.randn(B, K + 1, 1, generator=g)
    timesteps = (torch.arange(K)[None] - pad[:, None]).clamp(min=0) * mask.long()
    return Segments(states, actions, rewards, 1.0 - mask, rtg, timesteps, mask)


class _Lrs(L.Callback):
    def __init__(self) -> None:
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(module: QTModule, batches: list[Segments], callbacks=()) -> _Lrs:
    logged = _Lrs()
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[logged, *callbacks],
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
    return logged


def hand_written_dt(actor, batches, lr, wd, warmup, clip, betas=(0.9, 0.999), eps=1e-8):
    """The authors' DT steps: action MSE, clip, AdamW with min((n+1)/warmup, 1) warm-up."""
    params = [p for p in actor.parameters()]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    lrs, norms = [], []
    for n, batch in enumerate(batches):
        out = actor(batch.states, batch.actions, batch.rewards, batch.rtg[:, :-1],
                    batch.timesteps, batch.mask)  # fmt: skip
        valid = batch.mask.reshape(-1) > 0
        loss = F.mse_loss(
            out.action_preds.reshape(-1, A)[valid], batch.actions.reshape(-1, A)[valid]
        )
        for p in params:
            p.grad = None
        loss.backward()
        with torch.no_grad():
            live = [(i, p) for i, p in enumerate(params) if p.grad is not None]
            total = torch.sqrt(sum((p.grad.double() ** 2).sum() for _, p in live)).item()
            norms.append(total)
            coef = min(1.0, clip / (total + 1e-6))
            step_lr = lr * min((n + 1) / warmup, 1.0)
            lrs.append(step_lr)
            t = n + 1
            for i, p in live:  # a parameter without a gradient is left alone, decay included
                g = p.grad * coef
                p.mul_(1 - step_lr * wd)
                m[i] = betas[0] * m[i] + (1 - betas[0]) * g
                v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
                m_hat = m[i] / (1 - betas[0] ** t)
                v_hat = v[i] / (1 - betas[1] ** t)
                p.sub_(step_lr * m_hat / (v_hat.sqrt() + eps))
    return lrs, norms


def test_published_dt_trains_on_the_action_loss_alone_with_adamw_warmup_and_clip():
    torch.manual_seed(4)
    lr, wd, warmup, clip = 5e-3, 0.1, 3, 0.25
    module = QTModule(
        state_dim=S, act_dim=A, K=K, max_ep_len=K, hidden_size=8, n_layer=2, n_head=2,
        dropout=0.0, embed_dropout=0.0, learning_rate=lr, weight_decay=wd, warmup_steps=warmup,
        grad_norm=clip, **DT,
    )  # fmt: skip
    actor = copy.deepcopy(module.actor)
    untouched = {
        name: copy.deepcopy(getattr(module, name).state_dict())
        for name in ("critic", "critic_target", "ema_actor")
    }
    state_head = copy.deepcopy(module.actor.predict_state.state_dict())
    batches = [make_batch(i) for i in range(5)]
    # the target networks' callback with a schedule that would move both from the first step
    targets = TargetNetworks(step_start_ema=-1, update_ema_every=1, tau=0.5)
    logged = fit(module, batches, callbacks=[targets])

    lrs, norms = hand_written_dt(actor, batches, lr, wd, warmup, clip)
    assert lrs == pytest.approx([lr / 3, 2 * lr / 3, lr, lr, lr])
    assert min(norms) > clip  # the clip acted on every step
    for step, want_lr, want_norm in zip(logged.steps, lrs, norms, strict=True):
        assert step["lr/actor"] == pytest.approx(want_lr, rel=1e-6)  # logged as float32
        assert step["train/actor_grad_norm"] == pytest.approx(want_norm, rel=1e-5)
        assert "train/critic_loss" not in step and "train/q_loss" not in step
    for name, value in actor.state_dict().items():
        torch.testing.assert_close(module.actor.state_dict()[name], value, atol=1e-6, rtol=1e-5)
    # the next-state head had no gradient: not even weight decay moved it
    for name, value in state_head.items():
        assert torch.equal(module.actor.predict_state.state_dict()[name], value), name
    # the critic, its target and the EMA actor are as they were built
    for net, before in untouched.items():
        for name, value in getattr(module, net).state_dict().items():
            assert torch.equal(value, before[name]), f"{net}.{name}"
    assert int(module.train_steps) == 5 and targets.steps_done == 5


def test_adamw_warmup_and_the_action_loss_compose_with_qts_step():
    """With a critic: the warm-up moves both learning rates, AdamW is not Adam, and
    next_state_loss false leaves the state head without a gradient while the critic learns."""
    torch.manual_seed(1)
    kw = dict(state_dim=S, act_dim=A, K=K, max_ep_len=K, hidden_size=8, n_layer=1, n_head=2,
              dropout=0.0, embed_dropout=0.0, lr_decay=False, weight_decay=0.5)  # fmt: skip
    adam, adamw = QTModule(**kw), QTModule(**kw, optimizer="adamw", warmup_steps=2)
    adamw.load_state_dict(adam.state_dict())
    batches = [make_batch(i) for i in range(2)]
    fit(adam, batches)
    logged = fit(adamw, batches)
    assert [s["lr/actor"] for s in logged.steps] == pytest.approx([1.5e-4, 3e-4])
    assert [s["lr/critic"] for s in logged.steps] == pytest.approx([1.5e-4, 3e-4])
    assert not torch.equal(adam.actor.embed_state.weight, adamw.actor.embed_state.weight)

    no_state = QTModule(**kw, next_state_loss=False)
    head = copy.deepcopy(no_state.actor.predict_state.state_dict())
    critic = copy.deepcopy(no_state.critic.state_dict())
    fit(no_state, batches)
    for name, value in head.items():
        assert torch.equal(no_state.actor.predict_state.state_dict()[name], value), name
    assert any(not torch.equal(v, critic[k]) for k, v in no_state.critic.state_dict().items())


@pytest.mark.parametrize(
    ("options", "words"),
    [
        (dict(train_critic=False), "train_critic=false"),
        (dict(train_critic=False, eta=0.0, rtg_no_q=True), "infer_no_q"),
        (dict(warmup_steps=10, lr_decay=True), "lr_decay"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(optimizer="sgd"), "optimizer"),
    ],
)
def test_inconsistent_recipes_are_named(options, words):
    with pytest.raises(UserError, match=words):
        QTModule(state_dim=S, act_dim=A, K=K, max_ep_len=K, hidden_size=8, n_layer=1, n_head=2,
                 **options)  # fmt: skip


def test_published_dt_acts_as_the_authors_evaluate_episode_rtg():
    """With rtg_no_q and infer_no_q the policy acts as the authors' DT evaluation loop, written
    out here for one episode: the last K normalised states, the actions with a zero placeholder
    for step t, returns-to-go from target / scale less each reward / scale, left zero padding;
    the first of several targets; the critic never consulted."""
    import numpy as np

    from qt.acting.policy import QTPolicy
    from qt.models import QTActor

    class NoCritic(torch.nn.Module):
        def q_min(self, *args):
            raise AssertionError("the DT's acting must not read a critic")

    torch.manual_seed(5)
    Kp, scale, targets = 4, 10.0, [300.0, 150.0]
    actor = QTActor(S, A, 16, 2, 2, K=Kp, max_ep_len=50, dropout=0.1, scale=scale).eval()
    mean, std = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2.0, 1.0, 0.5])
    policy = QTPolicy(actor, NoCritic(), state_mean=mean, state_std=std, scale=scale,
                      env_targets=targets, K=Kp, max_ep_len=50, rtg_no_q=True, infer_no_q=True)  # fmt: skip
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(1, S)).astype(np.float32)
    policy.reset(obs, seeds=[3])
    states = [(torch.as_tensor(obs[0]) - mean) / std]
    actions: list[torch.Tensor] = []
    rewards: list[float] = []
    rtg = [torch.tensor(targets[0] / scale)]
    for t in range(7):
        # the authors' get_action: the last K steps, the newest action and reward zero
        acts = torch.stack([*actions, torch.zeros(A)])[-Kp:]
        st = torch.stack(states)[-Kp:]
        rw = torch.tensor([*rewards, 0.0])[-Kp:]
        rt = torch.stack(rtg)[-Kp:]
        ts = torch.arange(t + 1)[-Kp:]
        n, pad = st.shape[0], Kp - st.shape[0]
        out = actor(
            torch.cat([torch.zeros(pad, S), st])[None],
            torch.cat([torch.zeros(pad, A), acts])[None],
            torch.cat([torch.zeros(pad), rw])[None, :, None],
            torch.cat([torch.zeros(pad), rt])[None, :, None],
            torch.cat([torch.zeros(pad, dtype=torch.long), ts])[None],
            torch.cat([torch.zeros(pad), torch.ones(n)])[None].long(),
        )
        want = out.action_preds[0, -1]
        got = policy.act()
        torch.testing.assert_close(torch.as_tensor(got[0]), want, rtol=1e-5, atol=1e-6)
        reward = float(rng.normal())
        nxt = rng.normal(size=(1, S)).astype(np.float32)
        policy.observe(got, [reward], nxt)
        actions.append(torch.as_tensor(got[0]))
        rewards.append(reward)
        rtg.append(rtg[-1] - torch.tensor(reward / scale, dtype=torch.float32))
        states.append((torch.as_tensor(nxt[0]) - mean) / std)


def test_a_resumed_dt_fit_continues_its_warmup(tmp_path):
    """The warm-up's step count travels in the checkpoint: one iteration, saved, then a second
    from the checkpoint, gives the learning rates and parameters of two iterations straight."""

    def module() -> QTModule:
        torch.manual_seed(0)
        return QTModule(state_dim=S, act_dim=A, K=K, max_ep_len=K, hidden_size=8, n_layer=1,
                        n_head=2, warmup_steps=10, **DT)  # fmt: skip

    def trainer(epochs: int, logged: _Lrs) -> L.Trainer:
        return L.Trainer(
            accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=tmp_path, callbacks=[logged],
        )  # fmt: skip

    data = torch.utils.data.DataLoader([make_batch(i) for i in range(3)], batch_size=None)
    first, second, straight = _Lrs(), _Lrs(), _Lrs()
    t = trainer(1, first)
    t.fit(module(), data)
    t.save_checkpoint(tmp_path / "one.ckpt")
    resumed = module()
    trainer(2, second).fit(resumed, data, ckpt_path=tmp_path / "one.ckpt")
    whole = module()
    trainer(2, straight).fit(whole, data)
    lrs = [s["lr/actor"] for s in first.steps + second.steps]
    assert lrs == pytest.approx([n * 3e-4 / 10 for n in range(1, 7)], rel=1e-6)  # lr 3e-4
    assert lrs == [s["lr/actor"] for s in straight.steps]
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name

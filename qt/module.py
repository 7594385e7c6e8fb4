"""QTModule: the actor, the twin critic, their target copies, the losses and the optimisers.

One training step is a critic update followed by an actor update (QT_SPEC §3), written with
Lightning's manual optimisation. The target networks are moved by the `TargetNetworks`
callback after each step; environments never appear here (see `qt.callbacks.evaluation`).
"""

from __future__ import annotations

import copy
import math

import lightning as L
import torch
from torch import nn

from qt import losses
from qt.data.batch import Segments
from qt.models import QTActor, TwinCritic


class QTModule(L.LightningModule):
    """The Q-value Regularized Transformer.

    Args:
        state_dim, act_dim, K, max_ep_len, scale, env_targets, state_mean, state_std: facts of
            the data, linked from the data module by the CLI (never typed in a config).
        hidden_size, n_layer, n_head, dropout: actor width/depth (the critic shares the width).
        sar: tokens (s, a, r) instead of (R, s, a), with a reward head.
        learning_rate, weight_decay: the actor's Adam. critic_lr: the critic's Adam (no decay).
        lr_decay, lr_min, max_iters: cosine annealing of both learning rates, stepped once per
            iteration (epoch) with T_max = max_iters.
        eta: weight of the Q term; eta2: weight of the BC term, divided by `lambda_` after
            every iteration.
        grad_norm: clip both networks' gradient norms to this when > 0.
        discount: gamma of the critic's targets.
        k_rewards, use_discount, max_q_backup: the critic-target variant (QT_SPEC §3).
        ema_dropout: keep the EMA actor's dropout active when it proposes next actions, as the
            reference does.
        rtg_no_q, infer_no_q, num_candidates: acting options (QT_SPEC §4), stored here so a
            checkpoint acts as it was trained to.
    """

    def __init__(
        self,
        state_dim: int = 11,
        act_dim: int = 3,
        K: int = 20,
        max_ep_len: int = 1000,
        scale: float = 1000.0,
        env_targets: list[float] | None = None,
        state_mean: list[float] | None = None,
        state_std: list[float] | None = None,
        hidden_size: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        dropout: float = 0.1,
        sar: bool = False,
        learning_rate: float = 3e-4,
        weight_decay: float = 1e-4,
        critic_lr: float = 3e-4,
        lr_decay: bool = False,
        lr_min: float = 0.0,
        max_iters: int = 500,
        eta: float = 1.0,
        eta2: float = 1.0,
        lambda_: float = 1.0,
        grad_norm: float = 0.0,
        discount: float = 0.99,
        k_rewards: bool = True,
        use_discount: bool = True,
        max_q_backup: bool = False,
        ema_dropout: bool = True,
        rtg_no_q: bool = False,
        infer_no_q: bool = False,
        num_candidates: int = 50,
    ) -> None:
        super().__init__()
        _check_hparams(
            state_dim=state_dim, act_dim=act_dim, K=K, max_ep_len=max_ep_len, scale=scale,
            hidden_size=hidden_size, n_layer=n_layer, n_head=n_head, dropout=dropout,
            learning_rate=learning_rate, critic_lr=critic_lr, max_iters=max_iters,
            lambda_=lambda_, discount=discount, num_candidates=num_candidates,
        )  # fmt: skip
        self.save_hyperparameters()
        self.automatic_optimization = False

        self.actor = QTActor(
            state_dim, act_dim, hidden_size=hidden_size, n_layer=n_layer, n_head=n_head, K=K,
            max_ep_len=max_ep_len, dropout=dropout, sar=sar, scale=scale,
        )  # fmt: skip
        self.critic = TwinCritic(state_dim, act_dim, hidden_size=hidden_size)
        # Target copies start as exact copies; they learn only through TargetNetworks.
        self.ema_actor = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)

        mean = torch.zeros(state_dim) if state_mean is None else torch.as_tensor(state_mean)
        std = torch.ones(state_dim) if state_std is None else torch.as_tensor(state_std)
        if mean.shape != (state_dim,) or std.shape != (state_dim,):
            raise ValueError(
                f"state_mean/state_std have shapes {tuple(mean.shape)}/{tuple(std.shape)}: "
                f"expected ({state_dim},) each."
            )
        self.register_buffer("state_mean", mean.float())
        self.register_buffer("state_std", std.float())
        # eta2 changes every iteration, so it is state (saved in checkpoints), not a hparam.
        self.register_buffer("eta2", torch.tensor(float(eta2), dtype=torch.float64))

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        actor_opt = torch.optim.Adam(
            self.actor.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay
        )
        critic_opt = torch.optim.Adam(self.critic.parameters(), lr=hp.critic_lr)
        if not hp.lr_decay:
            return [actor_opt, critic_opt]
        schedulers = [
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=hp.max_iters, eta_min=hp.lr_min)
            for opt in (actor_opt, critic_opt)
        ]
        return [actor_opt, critic_opt], schedulers

    def training_step(self, batch: Segments, batch_idx: int) -> None:
        hp = self.hparams
        actor_opt, critic_opt = self.optimizers()

        # ---- critic: n-step targets from the EMA actor and the target critic
        critic_loss, target_q, rewards = self._critic_loss(batch)
        self.toggle_optimizer(critic_opt)
        critic_opt.zero_grad(set_to_none=True)
        self.manual_backward(critic_loss)
        critic_grad_norm = _clip(self.critic.parameters(), hp.grad_norm)
        critic_opt.step()
        self.untoggle_optimizer(critic_opt)

        # ---- actor: behaviour cloning plus the normalised Q term
        out = self.actor(
            batch.states, batch.actions, rewards, batch.rtg[:, :-1], batch.timesteps, batch.mask
        )
        bc_loss = losses.bc_loss(
            out.action_preds, out.state_preds, out.reward_preds, batch.actions, batch.states,
            rewards, batch.mask, scale=hp.scale,
        )  # fmt: skip
        valid = batch.mask.reshape(-1) > 0
        actor_states = batch.states.reshape(-1, hp.state_dim)[valid]
        actor_actions = out.action_preds.reshape(-1, hp.act_dim)[valid]
        q1, q2 = self.critic(actor_states, actor_actions)
        use_q1 = torch.rand((), device=self.device) > 0.5
        q_loss = losses.q_term(q1, q2, use_q1)
        actor_loss = self.eta2.float() * bc_loss + hp.eta * q_loss

        self.toggle_optimizer(actor_opt)
        actor_opt.zero_grad(set_to_none=True)
        self.manual_backward(actor_loss)
        actor_grad_norm = _clip(self.actor.parameters(), hp.grad_norm)
        actor_opt.step()
        self.untoggle_optimizer(actor_opt)

        self.log_dict(
            {
                "train/critic_loss": critic_loss.detach(),
                "train/bc_loss": bc_loss.detach(),
                "train/q_loss": q_loss.detach(),
                "train/actor_loss": actor_loss.detach(),
                "train/target_q_mean": target_q.mean(),
                "train/actor_grad_norm": actor_grad_norm,
                "train/critic_grad_norm": critic_grad_norm,
            },
            on_step=True,
            on_epoch=False,
        )

    def _critic_loss(self, batch: Segments) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Critic loss, its (detached) targets, and the rewards as the actor step must see them."""
        hp = self.hparams
        q1, q2 = self.critic(batch.states, batch.actions)  # (B, K, 1) each
        with torch.no_grad():
            self.ema_actor.train(hp.ema_dropout)
            rewards = batch.rewards
            if hp.max_q_backup:
                rep = losses.repeat_for_max_q_backup(batch, generator=None)
                next_actions = self.ema_actor(
                    rep.states, rep.actions, rep.rewards, rep.rtg[:, :-1], rep.timesteps, rep.mask
                ).action_preds
                next_states = rep.states
            else:
                next_actions = self.ema_actor(
                    batch.states, batch.actions, batch.rewards, batch.rtg[:, :-1],
                    batch.timesteps, batch.mask,
                ).action_preds  # fmt: skip
                next_states = batch.states
            target_q, rewards = losses.critic_targets(
                self.critic_target,
                next_states,
                next_actions,
                batch,
                discount=hp.discount,
                scale=hp.scale,
                k_rewards=hp.k_rewards,
                use_discount=hp.use_discount,
                max_q_backup=hp.max_q_backup,
            )
        critic_loss = losses.critic_loss(q1, q2, target_q, batch.mask)
        return critic_loss, target_q, rewards

    # ------------------------------------------------------------------ per iteration
    def on_train_epoch_end(self) -> None:
        hp = self.hparams
        if hp.lr_decay:
            for scheduler in self.lr_schedulers():
                scheduler.step()
        self.eta2.div_(hp.lambda_)
        actor_opt, critic_opt = self.optimizers()
        self.log_dict(
            {
                "lr/actor": actor_opt.param_groups[0]["lr"],
                "lr/critic": critic_opt.param_groups[0]["lr"],
                "train/eta2": self.eta2.float(),
            },
            on_epoch=True,
        )

    def test_step(self, batch, batch_idx) -> None:
        """Testing is acting in the environment: `qt.callbacks.evaluation` does it."""

    def validation_step(self, batch, batch_idx) -> None:
        """Validation is acting in the environment: `qt.callbacks.evaluation` does it."""

    # ------------------------------------------------------------------ acting helpers
    def normalize_states(self, states: torch.Tensor) -> torch.Tensor:
        return (states - self.state_mean) / self.state_std


def _clip(params, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` when it is > 0; always return the pre-clip total norm (no sync)."""
    params = [p for p in params if p.grad is not None]
    limit = max_norm if max_norm > 0 else math.inf
    return nn.utils.clip_grad_norm_(params, max_norm=limit, norm_type=2.0, foreach=True)


def _check_hparams(**values) -> None:
    positive_ints = ("state_dim", "act_dim", "K", "max_ep_len", "hidden_size", "n_layer",
                     "n_head", "max_iters", "num_candidates")  # fmt: skip
    for name in positive_ints:
        v = values[name]
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"model.{name}={v!r}: expected a whole number >= 1.")
    for name in ("scale", "learning_rate", "critic_lr", "lambda_"):
        if not values[name] > 0:
            raise ValueError(f"model.{name}={values[name]!r}: expected a number > 0.")
    if not 0.0 <= values["dropout"] < 1.0:
        raise ValueError(f"model.dropout={values['dropout']!r}: expected a number in [0, 1).")
    if not 0.0 <= values["discount"] <= 1.0:
        raise ValueError(f"model.discount={values['discount']!r}: expected a number in [0, 1].")
    if values["hidden_size"] % values["n_head"]:
        raise ValueError(
            f"model.hidden_size={values['hidden_size']} is not divisible by "
            f"model.n_head={values['n_head']}."
        )

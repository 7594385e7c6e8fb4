"""QTModule: the actor, the twin critic, their target copies, the losses and the optimisers.

One training step is a critic update followed by an actor update (docs/algorithm.md §3), written with
Lightning's manual optimisation. Options turn the same module into the Decision Transformer as its
authors trained it (docs/baselines.md): no critic step, the action loss alone, AdamW with a
linear warm-up. The target networks are moved by the `TargetNetworks`
callback after each step; environments never appear here (see `qt.callbacks.evaluation`).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Literal

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch import nn

from qt import losses
from qt.data.batch import Segments
from qt.errors import UserError
from qt.models import QTActor, TwinCritic
from qt.seeding import derived_seed


class QTModule(L.LightningModule):
    """The Q-value Regularized Transformer.

    Args:
        state_dim, act_dim, K, max_ep_len, scale, env_targets, state_mean, state_std: facts of
            the data, linked from the data module by the CLI (never typed in a config).
        hidden_size, n_layer, n_head, dropout: actor width/depth.
        critic_hidden_size: the critic's width; None (the published setting) shares the
            actor's `hidden_size`.
        embed_dropout: dropout on the actor's token embeddings; the reference's GPT-2 keeps
            its default 0.1 whatever `dropout` is.
        sar: tokens (s, a, r) instead of (R, s, a), with a reward head.
        learning_rate, weight_decay: the actor's optimiser. critic_lr: the critic's Adam (no
            decay).
        optimizer: the actor's optimiser: `adam` (QT's: weight decay added to the gradient) or
            `adamw` (the Decision Transformer's: decoupled weight decay).
        lr_decay, lr_min, max_iters: cosine annealing of both learning rates, stepped once per
            iteration (epoch) with T_max = max_iters.
        warmup_steps: when > 0, both learning rates rise linearly over this many training steps,
            factor min((n + 1) / warmup_steps, 1) in step n + 1, then stay (the Decision
            Transformer's schedule); needs lr_decay false.
        eta: weight of the Q term; eta2: weight of the BC term, divided by `lambda_` after
            every iteration.
        grad_norm: clip both networks' gradient norms to this when > 0.
        next_state_loss: the actor also learns to predict the next state (QT); false leaves the
            action loss alone (the Decision Transformer's).
        train_critic: train the twin critic (QT). False skips the critic step, the target
            networks and the Q term (the Decision Transformer learns no critic): it needs eta 0
            and acting without Q (rtg_no_q, infer_no_q), since the critic stays as initialised.
        discount: gamma of the critic's targets.
        k_rewards, use_discount, max_q_backup: the critic-target variant (docs/algorithm.md §3.1).
        ema_dropout: keep the EMA actor's dropout active when it proposes next actions, as the
            reference does.
        rtg_no_q, infer_no_q, num_candidates: acting options (docs/algorithm.md §4), stored here so a
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
        critic_hidden_size: int | None = None,
        n_layer: int = 4,
        n_head: int = 4,
        dropout: float = 0.1,
        embed_dropout: float = 0.1,
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
        next_state_loss: bool = True,
        train_critic: bool = True,
        optimizer: Literal["adam", "adamw"] = "adam",
        warmup_steps: int = 0,
    ) -> None:
        super().__init__()
        _check_hparams(
            state_dim=state_dim,
            act_dim=act_dim,
            K=K,
            max_ep_len=max_ep_len,
            scale=scale,
            hidden_size=hidden_size,
            n_layer=n_layer,
            n_head=n_head,
            dropout=dropout,
            critic_hidden_size=hidden_size if critic_hidden_size is None else critic_hidden_size,
            learning_rate=learning_rate,
            critic_lr=critic_lr,
            max_iters=max_iters,
            lambda_=lambda_,
            discount=discount,
            num_candidates=num_candidates,
            eta=eta,
        )
        _check_recipe(
            eta=eta,
            rtg_no_q=rtg_no_q,
            infer_no_q=infer_no_q,
            train_critic=train_critic,
            optimizer=optimizer,
            warmup_steps=warmup_steps,
            lr_decay=lr_decay,
        )
        self.save_hyperparameters()
        self.automatic_optimization = False

        self.actor = QTActor(
            state_dim,
            act_dim,
            hidden_size=hidden_size,
            n_layer=n_layer,
            n_head=n_head,
            K=K,
            max_ep_len=max_ep_len,
            dropout=dropout,
            sar=sar,
            scale=scale,
            embed_dropout=embed_dropout,
        )
        critic_width = hidden_size if critic_hidden_size is None else critic_hidden_size
        self.critic = TwinCritic(state_dim, act_dim, hidden_size=critic_width)
        # Target copies start as exact copies; they learn only through TargetNetworks.
        self.ema_actor = copy.deepcopy(self.actor).requires_grad_(False)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)

        mean = torch.zeros(state_dim) if state_mean is None else torch.as_tensor(state_mean)
        std = torch.ones(state_dim) if state_std is None else torch.as_tensor(state_std)
        if mean.shape != (state_dim,) or std.shape != (state_dim,):
            raise UserError(
                f"state_mean/state_std have shapes {tuple(mean.shape)}/{tuple(std.shape)}: "
                f"expected ({state_dim},) each."
            )
        self.register_buffer("state_mean", mean.float())
        self.register_buffer("state_std", std.float())
        # eta2 changes every iteration, so it is state (saved in checkpoints), not a hparam.
        self.register_buffer("eta2", torch.tensor(float(eta2), dtype=torch.float64))
        # Training steps completed and the seed of the per-step random streams: state, so a
        # resumed run continues the same streams (see `_step_generators`).
        self.register_buffer("train_steps", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("rng_seed", torch.tensor(-1, dtype=torch.int64))

        self._steps, self._seed = 0, 0  # host copies of the two, read in the hot path

    def setup(self, stage: str) -> None:
        # One batch makes two backward passes (critic, then actor), each reaching only one
        # network: DDP must look for the parameters a backward leaves unused, or it waits for
        # their gradients forever. Lightning wraps the module after this hook.
        strategy = self._trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DDPStrategy):
            strategy._ddp_kwargs["find_unused_parameters"] = True

    def on_fit_start(self) -> None:
        if int(self.rng_seed) < 0:  # a fresh run: take the seed `seed_everything` set
            self.rng_seed.fill_(torch.initial_seed() % 2**62)
        self._steps, self._seed = int(self.train_steps), int(self.rng_seed)

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self):
        hp = self.hparams
        kind = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
        actor_opt = kind(self.actor.parameters(), lr=hp.learning_rate, weight_decay=hp.weight_decay)
        critic_opt = torch.optim.Adam(self.critic.parameters(), lr=hp.critic_lr)
        warmup = hp.warmup_steps
        if warmup > 0:  # stepped after every training step (`_warm_up`); lr_decay is false
            schedulers = [
                torch.optim.lr_scheduler.LambdaLR(opt, _Warmup(warmup))
                for opt in (actor_opt, critic_opt)
            ]
            return [actor_opt, critic_opt], schedulers
        if not hp.lr_decay:
            return [actor_opt, critic_opt]
        schedulers = [
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=hp.max_iters, eta_min=hp.lr_min)
            for opt in (actor_opt, critic_opt)
        ]
        return [actor_opt, critic_opt], schedulers

    def training_step(self, batch: Segments, batch_idx: int) -> None:
        if not self.hparams.train_critic:
            return self._actor_only_step(batch)
        actor_opt, critic_opt = self.optimizers()
        metrics = self.train_step(batch, actor_opt, critic_opt, self.manual_backward)
        self._warm_up()  # after the step (its metrics hold the learning rates it used)
        self.log_dict(metrics, on_step=True, on_epoch=False)

    def train_step(
        self,
        batch: Segments,
        actor_opt,
        critic_opt,
        backward: Callable[[torch.Tensor], None],
        stop_nonfinite: bool = False,
    ) -> dict[str, torch.Tensor | float]:
        """One training step (critic, then actor) with the given optimisers; its metrics.

        `training_step` passes Lightning's optimisers and `manual_backward`; a packed fit run as
        a loop (`qt.pack.loop`) passes each member's own Adam pair and `Tensor.backward`, so
        every member takes exactly this step. With `stop_nonfinite`, a half-step whose loss or
        gradient norm is not finite is not applied (its optimizer does not step) and the metrics
        carry `train/nonfinite` 1.0; the step count then stays where it was.
        """
        hp = self.hparams
        coin_gen, noise_gen = self._step_generators()

        # ---- critic: n-step targets from the EMA actor and the target critic
        critic_loss, target_q, rewards = self._critic_loss(batch, noise_gen)
        critic_opt.zero_grad(set_to_none=True)
        backward(critic_loss)
        critic_grad_norm = _clip(self.critic.parameters(), hp.grad_norm)
        finite = not stop_nonfinite or _finite(critic_loss, critic_grad_norm)
        if finite:
            critic_opt.step()

        # ---- actor: behaviour cloning plus the normalised Q term. `rewards` is the batch's
        # with rewards[:, K-1] zeroed when the critic's targets did so (the reference zeroes
        # them in place, so its actor and its `sar` reward loss see the zeroed copy).
        out, bc_loss = self._behaviour_cloning(batch, rewards)
        # The Q term reads the critic, which must not learn from it here: the reference
        # leaves these gradients in the critic and clears them at the next critic step.
        # Freezing the critic for this forward gives the same parameters and keeps DDP's
        # gradient buckets for the critic untouched by the actor's backward.
        self.critic.requires_grad_(False)
        q1, q2 = self.critic(batch.states, out.action_preds)  # (B, K, 1) each
        self.critic.requires_grad_(True)
        q_loss = losses.q_loss(q1, q2, batch.mask, losses.coin_flip(coin_gen))
        actor_loss = self.eta2.to(bc_loss.dtype) * bc_loss + hp.eta * q_loss

        actor_opt.zero_grad(set_to_none=True)
        backward(actor_loss)
        actor_grad_norm = _clip(self.actor.parameters(), hp.grad_norm)
        finite = finite and (not stop_nonfinite or _finite(actor_loss, actor_grad_norm))
        if finite:
            actor_opt.step()
            self._steps += 1
            self.train_steps.fill_(self._steps)

        metrics = {
            "train/critic_loss": critic_loss.detach(),
            "train/bc_loss": bc_loss.detach(),
            "train/q_loss": q_loss.detach(),
            "train/actor_loss": actor_loss.detach(),
            "train/target_q_mean": target_q.mean(),
            "train/actor_grad_norm": actor_grad_norm,
            "train/critic_grad_norm": critic_grad_norm,
            "lr/actor": actor_opt.param_groups[0]["lr"],
            "lr/critic": critic_opt.param_groups[0]["lr"],
        }
        if stop_nonfinite:
            metrics["train/nonfinite"] = torch.tensor(0.0 if finite else 1.0)
        return metrics

    def _behaviour_cloning(self, batch: Segments, rewards: torch.Tensor):
        """The actor's forward on the batch, `rewards` its reward inputs, and its behaviour-
        cloning loss (docs/algorithm.md §3.2): what QT's step and the actor-only step share."""
        hp = self.hparams
        out = self.actor(
            batch.states, batch.actions, rewards, batch.rtg[:, :-1], batch.timesteps, batch.mask
        )
        bc_loss = losses.bc_loss(
            out.action_preds,
            batch.actions,
            out.state_preds,
            batch.states,
            batch.mask,
            reward_preds=out.reward_preds,
            rewards=rewards,
            scale=hp.scale,
            next_state=hp.next_state_loss,
        )
        return out, bc_loss

    def _actor_only_step(self, batch: Segments) -> None:
        """A step without a critic (train_critic false): behaviour cloning of the actor alone.

        With next_state_loss false, AdamW and a warm-up this is the Decision Transformer's step
        (docs/baselines.md). The random streams are those of a QT step (`_step_generators`), so
        dropout draws the same masks for the same (seed, step).
        """
        hp = self.hparams
        actor_opt, _ = self.optimizers()
        self._step_generators()
        _, bc_loss = self._behaviour_cloning(batch, batch.rewards)
        actor_loss = self.eta2.to(bc_loss.dtype) * bc_loss
        actor_opt.zero_grad(set_to_none=True)
        self.manual_backward(actor_loss)
        actor_grad_norm = _clip(self.actor.parameters(), hp.grad_norm)
        actor_opt.step()
        lr = actor_opt.param_groups[0]["lr"]
        self._warm_up(critic=False)
        self._steps += 1
        self.train_steps.fill_(self._steps)
        self.log_dict(
            {
                "train/bc_loss": bc_loss.detach(),
                "train/actor_loss": actor_loss.detach(),
                "train/actor_grad_norm": actor_grad_norm,
                "lr/actor": lr,
            },
            on_step=True,
            on_epoch=False,
        )

    def _warm_up(self, critic: bool = True) -> None:
        """Advance the warm-up schedules by one training step (when there is a warm-up); the
        critic's only when its optimiser stepped."""
        if self.hparams.warmup_steps > 0:
            actor_schedule, critic_schedule = self.lr_schedulers()
            actor_schedule.step()
            if critic:
                critic_schedule.step()

    def _step_generators(self) -> tuple[torch.Generator, torch.Generator]:
        """Random streams of this step, functions of (seed, step) only.

        Seeding from the step count (kept in checkpoints) makes a resumed run draw what an
        uninterrupted one draws. The coin of the Q term and the max_q_backup noise are the same
        on every rank (one decision per step, as on one process); dropout follows the global
        generator, reseeded per step and rank.
        """
        n, seed = self._steps, self._seed
        rank = self.global_rank if self._trainer is not None else 0
        torch.manual_seed(derived_seed(seed, n, 2 + rank))
        coin = torch.Generator().manual_seed(derived_seed(seed, n, 0))
        noise = torch.Generator().manual_seed(derived_seed(seed, n, 1))
        return coin, noise

    def _critic_loss(
        self, batch: Segments, noise_gen: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Critic loss, its (detached) targets, and the rewards as the actor step must see them."""
        hp = self.hparams
        q1, q2 = self.critic(batch.states, batch.actions)  # (B, K, 1) each
        with torch.no_grad():
            self.ema_actor.train(hp.ema_dropout)
            repeats = 10 if hp.max_q_backup else 1
            src = (
                losses.repeat_for_max_q_backup(batch, repeats, generator=noise_gen)
                if repeats > 1
                else batch
            )
            next_actions = self.ema_actor(
                src.states, src.actions, src.rewards, src.rtg[:, :-1], src.timesteps, src.mask
            ).action_preds  # (B*R, K, A)
            if hp.k_rewards:  # bootstrap from the window's last step only
                tq1, tq2 = self.critic_target(src.states[:, -1], next_actions[:, -1])  # (B*R, 1)
            else:
                tq1, tq2 = self.critic_target(src.states, next_actions)  # (B*R, K, 1)
            q_next = losses.bootstrap_q(tq1, tq2, repeats)
            target_q, rewards = losses.critic_targets(
                batch,
                q_next,
                discount=hp.discount,
                scale=hp.scale,
                k_rewards=hp.k_rewards,
                use_discount=hp.use_discount,
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
        self.log("train/eta2", self.eta2.float(), on_epoch=True)

    def test_step(self, batch, batch_idx) -> None:
        """Testing is acting in the environment: `qt.callbacks.evaluation` does it."""

    def validation_step(self, batch, batch_idx) -> None:
        """Validation is acting in the environment: `qt.callbacks.evaluation` does it."""


class _Warmup:
    """The learning-rate factor of a linear warm-up: min((n + 1) / steps, 1) after n steps.

    A class, not a lambda, so that LambdaLR's state (saved in checkpoints) holds its length.
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __call__(self, n: int) -> float:
        return min((n + 1) / self.steps, 1.0)


def _clip(params, max_norm: float) -> torch.Tensor:
    """Clip to `max_norm` when it is > 0; always return the pre-clip total norm (no sync)."""
    params = [p for p in params if p.grad is not None]
    limit = max_norm if max_norm > 0 else math.inf
    return nn.utils.clip_grad_norm_(params, max_norm=limit, norm_type=2.0, foreach=True)


def _finite(*values: torch.Tensor) -> bool:
    """Whether every value is finite (one host synchronisation; the packed loop's guard)."""
    return bool(torch.isfinite(torch.stack([v.detach().float() for v in values])).all())


def _check_recipe(
    *, eta, rtg_no_q, infer_no_q, train_critic, optimizer, warmup_steps, lr_decay
) -> None:
    """The training-recipe options (docs/baselines.md), checked against each other."""
    if optimizer not in ("adam", "adamw"):
        raise UserError(f"model.optimizer={optimizer!r}: expected 'adam' or 'adamw'.")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise UserError(f"model.warmup_steps={warmup_steps!r}: expected a whole number >= 0.")
    if warmup_steps > 0 and lr_decay:
        raise UserError(
            f"model.warmup_steps={warmup_steps} with model.lr_decay=true: the warm-up is for a "
            "constant learning rate (the Decision Transformer's schedule); set lr_decay false."
        )
    if not train_critic and (eta != 0 or not rtg_no_q or not infer_no_q):
        raise UserError(
            f"model.train_critic=false with eta={eta}, rtg_no_q={rtg_no_q}, "
            f"infer_no_q={infer_no_q}: a model without a trained critic needs eta 0, rtg_no_q "
            "true and infer_no_q true (no Q in its loss or its acting)."
        )


def _check_hparams(**values) -> None:
    positive_ints = (
        "state_dim",
        "act_dim",
        "K",
        "max_ep_len",
        "hidden_size",
        "n_layer",
        "n_head",
        "max_iters",
        "num_candidates",
        "critic_hidden_size",
    )
    for name in positive_ints:
        v = values[name]
        if not isinstance(v, int) or v < 1:
            raise UserError(f"model.{name}={v!r}: expected a whole number >= 1.")
    for name in ("scale", "learning_rate", "critic_lr", "lambda_"):
        if not values[name] > 0:
            raise UserError(f"model.{name}={values[name]!r}: expected a number > 0.")
    if not values["eta"] >= 0:  # NaN fails too
        raise UserError(
            f"model.eta={values['eta']!r}: expected a number >= 0 (the weight of the Q term "
            "in the actor's loss; 0 leaves it out)."
        )
    if not 0.0 <= values["dropout"] < 1.0:
        raise UserError(f"model.dropout={values['dropout']!r}: expected a number in [0, 1).")
    if not 0.0 <= values["discount"] <= 1.0:
        raise UserError(f"model.discount={values['discount']!r}: expected a number in [0, 1].")
    if values["hidden_size"] % values["n_head"]:
        raise UserError(
            f"model.hidden_size={values['hidden_size']} is not divisible by "
            f"model.n_head={values['n_head']}."
        )

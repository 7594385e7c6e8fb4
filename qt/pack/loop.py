"""LoopPackedQTModule: a pack of N fits computed one member after another.

It implements the packed module's contract (`qt.pack.module`) by holding N ordinary `QTModule`s
and running each one's own training step (`QTModule.train_step`) with its own pair of Adam
optimisers and, with `lr_decay`, its own cosine schedules. Nothing is batched, so a member
takes exactly the step its separate fit takes: the same parameters, the same random streams
(`QTModule._step_generators` reseeds from the member's seed and step count), the same
optimiser and schedule. It is the reference the batched module is tested against, and the
module every piece of the pack's plumbing (data, callbacks, checkpoints, MLflow) was built on.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
from torch import nn

from qt.callbacks.targets import ema_due, soft_update
from qt.data.batch import Segments
from qt.errors import UserError
from qt.module import QTModule

# The settings a member may have of its own; everything else is shared by the pack.
MEMBER_SETTINGS = ("eta", "eta2", "lambda_", "learning_rate", "critic_lr", "weight_decay",
                   "grad_norm", "lr_min", "rtg_no_q", "infer_no_q")  # fmt: skip


# QTModule options a pack does not implement (the Decision Transformer's recipe), at the values
# it does: such fits run alone.
QT_RECIPE = {"train_critic": True, "optimizer": "adam", "warmup_steps": 0}


def member_hparams(hparams: dict, member: dict) -> dict:
    """QTModule's arguments of one member: the shared ones with the member's settings."""
    unknown = sorted(set(member) - {"seed", *MEMBER_SETTINGS})
    if unknown:
        raise UserError(
            f"pack member {member!r} sets {', '.join(unknown)}: a member may set only its seed "
            f"and {', '.join(MEMBER_SETTINGS)}."
        )
    if not isinstance(member.get("seed"), int) or isinstance(member.get("seed"), bool):
        raise UserError(f"pack member {member!r}: expected a whole-number 'seed'.")
    return {**hparams, **{k: v for k, v in member.items() if k != "seed"}}


class LoopPackedQTModule(L.LightningModule):
    """N `QTModule`s trained side by side, one after another in each step (see the module doc).

    Args:
        members: per member, {"seed": int} plus any of MEMBER_SETTINGS.
        compile, autocast: accepted for the batched module's signature; a loop runs eagerly
            in float32.
        hparams: QTModule's arguments, shared by every member.
    """

    def __init__(
        self, members: list[dict], compile: bool = False, autocast: bool = False, **hparams
    ) -> None:
        super().__init__()
        if not members:
            raise UserError("a pack needs at least one member.")
        unpackable = {k: hparams[k] for k, ok in QT_RECIPE.items()
                      if k in hparams and hparams[k] != ok}  # fmt: skip
        if unpackable:  # as the batched module: the packed step is QT's
            raise UserError(
                f"a pack got {unpackable}: a pack trains QT's recipe "
                f"({', '.join(f'{k}={v!r}' for k, v in QT_RECIPE.items())}); fit these alone."
            )
        self.save_hyperparameters()
        self.automatic_optimization = False
        self._members = [dict(m) for m in members]
        self.fits = nn.ModuleList(QTModule(**member_hparams(hparams, m)) for m in members)
        for fit, m in zip(self.fits, members):
            fit.rng_seed.fill_(int(m["seed"]) % 2**62)  # what seed_everything(seed) gives a fit
            _sync_host(fit)
        self.register_buffer("active", torch.ones(len(members), dtype=torch.bool))
        self._optimizers = [self._make_optimizers(fit) for fit in self.fits]
        self.last_metrics: list[dict[str, torch.Tensor]] = [{} for _ in members]

    @staticmethod
    def _make_optimizers(fit: QTModule) -> tuple[list, list]:
        made = fit.configure_optimizers()
        return (made[0], made[1]) if isinstance(made, tuple) else (made, [])

    # ------------------------------------------------------------------ what the pack is
    @property
    def n_members(self) -> int:
        return len(self.fits)

    @property
    def seeds(self) -> list[int]:
        return [int(m["seed"]) for m in self._members]

    def set_member_active(self, i: int, flag: bool) -> None:
        self.active[i] = bool(flag)

    def member_eta2(self, i: int) -> float:
        return float(self.fits[i].eta2)

    # ------------------------------------------------------------------ training
    def configure_optimizers(self) -> None:
        """Each member's optimisers are its own (`_optimizers`), stepped in `training_step`."""
        return None

    def on_fit_start(self) -> None:
        for fit in self.fits:  # a restored checkpoint's counters reach the host copies
            _sync_host(fit)

    def training_step(self, batch: Segments, batch_idx: int) -> None:
        for i, fit in enumerate(self.fits):
            if not bool(self.active[i]):
                self.last_metrics[i] = {}
                continue
            (actor_opt, critic_opt), _ = self._optimizers[i]
            mine = Segments(*(field[i] for field in batch))
            metrics = fit.train_step(
                mine, actor_opt, critic_opt, lambda loss: loss.backward(), stop_nonfinite=True
            )
            self.last_metrics[i] = metrics
            if float(metrics["train/nonfinite"]):
                self.active[i] = False

    @torch.no_grad()
    def update_targets(
        self,
        *,
        ema_decay: float = 0.995,
        step_start_ema: int = 1000,
        update_ema_every: int = 5,
        tau: float = 0.005,
    ) -> None:
        """TargetNetworks' update of every active member, n = its steps before the latest."""
        for i, fit in enumerate(self.fits):
            if not bool(self.active[i]):
                continue
            n = fit._steps - 1
            if ema_due(n, step_start_ema, update_ema_every):
                soft_update(fit.ema_actor, fit.actor, 1.0 - ema_decay)
            soft_update(fit.critic_target, fit.critic, tau)

    def on_train_epoch_end(self) -> None:
        for i, fit in enumerate(self.fits):
            if not bool(self.active[i]):
                continue
            for scheduler in self._optimizers[i][1]:
                scheduler.step()
            fit.eta2.div_(fit.hparams.lambda_)

    # ------------------------------------------------------------------ members in and out
    def member_module(self, i: int) -> QTModule:
        fit = self.fits[i]
        module = QTModule(**dict(fit.hparams))
        module.load_state_dict(fit.state_dict())
        _sync_host(module)
        return module.to(self.device)

    def member_optimizer_states(self, i: int) -> list[dict]:
        return [copy.deepcopy(opt.state_dict()) for opt in self._optimizers[i][0]]

    def member_scheduler_states(self, i: int) -> list[dict]:
        return [copy.deepcopy(s.state_dict()) for s in self._optimizers[i][1]]

    def load_member(
        self,
        i: int,
        module: QTModule,
        optimizer_states: list[dict] | None,
        scheduler_states: list[dict] | None = None,
    ) -> None:
        fit = self.fits[i]
        fit.load_state_dict(module.state_dict())
        if int(fit.rng_seed) < 0:
            fit.rng_seed.fill_(int(self._members[i]["seed"]) % 2**62)
        _sync_host(fit)
        optimizers, schedulers = self._make_optimizers(fit)
        for opt, state in zip(optimizers, optimizer_states or []):
            opt.load_state_dict(state)
        for sched, state in zip(schedulers, scheduler_states or []):
            sched.load_state_dict(state)
        self._optimizers[i] = (optimizers, schedulers)

    # Optimiser and schedule states are not parameters: a pack checkpoint carries them here.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["pack_optimizers"] = [
            {"optimizers": self.member_optimizer_states(i),
             "schedulers": self.member_scheduler_states(i)}
            for i in range(self.n_members)
        ]  # fmt: skip

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._pending = checkpoint.get("pack_optimizers")

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        pending, self._pending = getattr(self, "_pending", None), None
        for i, fit in enumerate(self.fits):
            _sync_host(fit)
            if pending is not None:
                optimizers, schedulers = self._make_optimizers(fit)
                for opt, state in zip(optimizers, pending[i]["optimizers"]):
                    opt.load_state_dict(state)
                for sched, state in zip(schedulers, pending[i]["schedulers"]):
                    sched.load_state_dict(state)
                self._optimizers[i] = (optimizers, schedulers)
        return result


def _sync_host(fit: QTModule) -> None:
    """The host copies of a member's step count and seed, read in its hot path."""
    fit._steps, fit._seed = int(fit.train_steps), int(fit.rng_seed)


__all__ = ["MEMBER_SETTINGS", "QT_RECIPE", "LoopPackedQTModule", "member_hparams"]

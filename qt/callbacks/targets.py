"""Target networks: the EMA actor and the Polyak-averaged critic (docs/algorithm.md §3.4).

The callback keeps its own count of completed training steps: in manual optimisation
`trainer.global_step` counts optimizer steps (two per batch here), and the EMA schedule is
defined in batches. The count travels in checkpoints through `state_dict`.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from qt.errors import UserError


@torch.no_grad()
def soft_update(target: nn.Module, source: nn.Module, weight: float) -> None:
    """target <- (1 - weight) * target + weight * source, parameter by parameter.

    Polyak with `tau` is `soft_update(target, source, tau)`; the EMA with decay `beta`
    is `soft_update(ema, source, 1 - beta)`. Buffers are left alone (the networks have none
    that learn).
    """
    tgt = [p for p in target.parameters()]
    src = [p for p in source.parameters()]
    assert len(tgt) == len(src), "target and source must have the same parameters"
    torch._foreach_lerp_(tgt, src, weight)


def ema_due(n: int, step_start_ema: int, update_ema_every: int) -> bool:
    """Whether the EMA actor moves after a step, n = the steps completed before it: the
    reference's `n > step_start_ema and n % update_ema_every == 0` (first in step 1006)."""
    return n > step_start_ema and n % update_ema_every == 0


class TargetNetworks(L.Callback):
    """Updates `pl_module.ema_actor` and `pl_module.critic_target` after every training step.

    With n the number of steps completed before the current one (0 during the first):
    - EMA actor: when n > step_start_ema and n % update_ema_every == 0,
      ema <- ema_decay * ema + (1 - ema_decay) * actor (first update in step 1006 by default);
    - target critic: every step, target <- tau * critic + (1 - tau) * target.
    Neither moves for a module that trains no critic (`train_critic` false).
    """

    def __init__(
        self,
        ema_decay: float = 0.995,
        step_start_ema: int = 1000,
        update_ema_every: int = 5,
        tau: float = 0.005,
    ) -> None:
        if not 0.0 <= ema_decay <= 1.0:
            raise UserError(f"ema_decay={ema_decay} is outside [0, 1].")
        if not 0.0 <= tau <= 1.0:
            raise UserError(f"tau={tau} is outside [0, 1].")
        if update_ema_every < 1:
            raise UserError(f"update_ema_every={update_ema_every}: expected a whole number >= 1.")
        self.ema_decay = ema_decay
        self.step_start_ema = step_start_ema
        self.update_ema_every = update_ema_every
        self.tau = tau
        self.steps_done = 0  # training steps completed (batches, not optimizer steps)
        self.ema_updates = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n = self.steps_done
        if not getattr(getattr(pl_module, "hparams", None), "train_critic", True):
            # no critic step (the Decision Transformer): nothing reads the target networks
            self.steps_done = n + 1
            return
        if ema_due(n, self.step_start_ema, self.update_ema_every):
            soft_update(pl_module.ema_actor, pl_module.actor, 1.0 - self.ema_decay)
            self.ema_updates += 1
        soft_update(pl_module.critic_target, pl_module.critic, self.tau)
        self.steps_done = n + 1

    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done, "ema_updates": self.ema_updates}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps_done = int(state_dict["steps_done"])
        self.ema_updates = int(state_dict["ema_updates"])

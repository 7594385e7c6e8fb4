"""The target-network schedule of docs/algorithm.md §3.4 against a step-by-step reimplementation."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qt.callbacks.targets import TargetNetworks


def _nets(seed: int) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)

    def lin():
        m = nn.Linear(3, 2)
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
        return m

    return SimpleNamespace(actor=lin(), ema_actor=lin(), critic=lin(), critic_target=lin())


def _perturb(module: nn.Module, g: torch.Generator) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_ema_first_update_in_step_1006_then_every_fifth():
    cb = TargetNetworks(ema_decay=0.995, step_start_ema=1000, update_ema_every=5, tau=0.005)
    nets = _nets(0)
    updated_in = []  # 1-based step numbers in which the EMA actor changed
    for step in range(1, 1031):
        before = nets.ema_actor.weight.clone()
        cb.on_train_batch_end(None, nets, None, None, step - 1)
        if not torch.equal(before, nets.ema_actor.weight):
            updated_in.append(step)
    assert updated_in == [1006, 1011, 1016, 1021, 1026]
    assert cb.steps_done == 1030 and cb.ema_updates == 5


def test_updates_follow_the_formulas_exactly():
    cb = TargetNetworks(ema_decay=0.9, step_start_ema=2, update_ema_every=2, tau=0.25)
    nets = _nets(1)
    g = torch.Generator().manual_seed(2)
    ema = [p.clone() for p in nets.ema_actor.parameters()]
    tgt = [p.clone() for p in nets.critic_target.parameters()]
    for n in range(9):  # n = steps completed before this one
        _perturb(nets.actor, g)
        _perturb(nets.critic, g)
        if n > 2 and n % 2 == 0:
            ema = [0.9 * e + 0.1 * a for e, a in zip(ema, nets.actor.parameters())]
        tgt = [0.75 * t + 0.25 * c for t, c in zip(tgt, nets.critic.parameters())]
        cb.on_train_batch_end(None, nets, None, None, n)
        for got, want in zip(nets.ema_actor.parameters(), ema):
            torch.testing.assert_close(got, want)
        for got, want in zip(nets.critic_target.parameters(), tgt):
            torch.testing.assert_close(got, want)


def test_counters_round_trip_through_state_dict():
    cb = TargetNetworks(step_start_ema=0, update_ema_every=1)
    nets = _nets(3)
    for i in range(7):
        cb.on_train_batch_end(None, nets, None, None, i)
    resumed = TargetNetworks(step_start_ema=0, update_ema_every=1)
    resumed.load_state_dict(cb.state_dict())
    assert (resumed.steps_done, resumed.ema_updates) == (7, 6)


@pytest.mark.parametrize("kwargs", [{"ema_decay": 1.5}, {"tau": -0.1}, {"update_ema_every": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        TargetNetworks(**kwargs)

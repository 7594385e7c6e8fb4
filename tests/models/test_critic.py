"""The twin critic against a hand-written forward pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qt.models import TwinCritic


def _by_hand(params: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Linear, Mish (x * tanh(softplus(x))), three times, then the last Linear."""
    w = iter(params)
    for _ in range(3):
        x = x @ next(w).T + next(w)
        x = x * torch.tanh(F.softplus(x))
    return x @ next(w).T + next(w)


def test_twin_critic_matches_hand_written_mlps_and_min():
    torch.manual_seed(0)
    critic = TwinCritic(4, 2, hidden_size=16)
    g = torch.Generator().manual_seed(1)
    s, a = torch.randn(3, 5, 4, generator=g), torch.randn(3, 5, 2, generator=g)
    q1, q2 = critic(s, a)
    assert q1.shape == q2.shape == (3, 5, 1)
    x = torch.cat([s, a], dim=-1)
    p1 = [p for n, p in critic.named_parameters() if n.startswith("q1_model")]
    p2 = [p for n, p in critic.named_parameters() if n.startswith("q2_model")]
    assert len(p1) == len(p2) == 8
    torch.testing.assert_close(q1, _by_hand(p1, x))
    torch.testing.assert_close(q2, _by_hand(p2, x))
    assert not torch.allclose(q1, q2)  # two independent networks
    torch.testing.assert_close(critic.q_min(s, a), torch.where(q1 < q2, q1, q2))
    torch.testing.assert_close(critic.q1(s[0], a[0]), q1[0])


def test_parameter_count_by_hand():
    S, A, d = 11, 3, 256
    one = (S + A) * d + d + 2 * (d * d + d) + d + 1
    assert sum(p.numel() for p in TwinCritic(S, A, d).parameters()) == 2 * one

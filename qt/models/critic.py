"""The twin critic of QT (docs/algorithm.md §2): two independent Q MLPs and their minimum.

Each of Q1, Q2 is Linear(S+A, d) Mish Linear(d, d) Mish Linear(d, d) Mish Linear(d, 1)
over concat(state, action); parameter names (`q1_model.0.weight`, ...) and
initialisation (PyTorch defaults) are the reference's, so the authors' critic
checkpoints load as they are.
"""

from __future__ import annotations

import torch
from torch import nn


def _q_mlp(in_dim: int, hidden_size: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_size),
        nn.Mish(),
        nn.Linear(hidden_size, hidden_size),
        nn.Mish(),
        nn.Linear(hidden_size, hidden_size),
        nn.Mish(),
        nn.Linear(hidden_size, 1),
    )


class TwinCritic(nn.Module):
    """Two independent Q networks over (state, action).

    Args:
        state_dim: S.
        act_dim: A.
        hidden_size: width d of every hidden layer (the actor's d in QT).
    """

    def __init__(self, state_dim: int, act_dim: int, hidden_size: int = 256) -> None:
        super().__init__()
        for name, value in (
            ("state_dim", state_dim),
            ("act_dim", act_dim),
            ("hidden_size", hidden_size),
        ):
            if value < 1:
                raise ValueError(
                    f"TwinCritic argument {name} must be a positive integer, got {value}."
                )
        self.q1_model = _q_mlp(state_dim + act_dim, hidden_size)
        self.q2_model = _q_mlp(state_dim + act_dim, hidden_size)

    def forward(
        self, state: torch.Tensor, action: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """state (..., S), action (..., A) -> (q1 (..., 1), q2 (..., 1))."""
        x = torch.cat([state, action], dim=-1)
        return self.q1_model(x), self.q2_model(x)

    def q1(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Q1 alone: (..., S), (..., A) -> (..., 1)."""
        return self.q1_model(torch.cat([state, action], dim=-1))

    def q_min(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """min(Q1, Q2): (..., S), (..., A) -> (..., 1)."""
        q1, q2 = self(state, action)
        return torch.minimum(q1, q2)

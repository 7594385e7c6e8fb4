"""Fixtures for the model tests: a tiny actor config and padded windows."""

from __future__ import annotations

import pytest
import torch

TINY = dict(state_dim=5, act_dim=2, hidden_size=32, n_layer=2, n_head=2, K=6, max_ep_len=50)


def padded_window(B: int, K: int, S: int, A: int, seed: int) -> dict[str, torch.Tensor]:
    """Random left-padded inputs; sample 0 is full, the others have 1..K valid steps."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, K + 1, (B,), generator=g)
    lengths[0] = K
    mask = (torch.arange(K)[None] >= K - lengths[:, None]).float()  # (B, K)
    return dict(
        states=torch.randn(B, K, S, generator=g),
        actions=torch.rand(B, K, A, generator=g) * 2 - 1,
        rewards=torch.randn(B, K, 1, generator=g),
        rtg=torch.randn(B, K, 1, generator=g),
        timesteps=torch.randint(0, 50, (B, K), generator=g),
        mask=mask,
    )


@pytest.fixture
def tiny_inputs() -> dict[str, torch.Tensor]:
    return padded_window(8, TINY["K"], TINY["state_dim"], TINY["act_dim"], seed=0)

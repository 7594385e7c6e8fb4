"""The batch that flows from the sampler to the training step."""

from __future__ import annotations

from typing import NamedTuple

import torch


class Segments(NamedTuple):
    """B training windows of length K (docs/algorithm.md §1), left-padded.

    states     (B, K, S) float32, normalised with the dataset's state mean/std
    actions    (B, K, A) float32, 0 on padding
    rewards    (B, K, 1) float32, 0 on padding (after `reward_tune`)
    dones      (B, K)    float32, 1 on padding
    rtg        (B, K+1, 1) float32, returns-to-go divided by `scale`, 0 on padding
    timesteps  (B, K)    int64, clipped to max_ep_len - 1, 0 on padding
    mask       (B, K)    float32, 1 on data, 0 on padding
    """

    states: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    dones: torch.Tensor
    rtg: torch.Tensor
    timesteps: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Segments:
        return Segments(*(t.to(device, non_blocking=non_blocking) for t in self))

"""Tiny packs and their separate fits, driven by the same batches."""

from __future__ import annotations

import warnings

import lightning as L
import torch

from qt.callbacks.targets import TargetNetworks
from qt.data.batch import Segments
from qt.module import QTModule
from qt.pack.module import PackedQTModule, PackedTargetNetworks

S, A, K, B = 3, 2, 5, 6
SHARED = dict(
    state_dim=S, act_dim=A, K=K, max_ep_len=16, scale=10.0, hidden_size=16, n_layer=2,
    n_head=2, dropout=0.0, embed_dropout=0.0, lr_decay=True, max_iters=3, lr_min=1e-5,
)  # fmt: skip
TARGETS = dict(ema_decay=0.9, step_start_ema=20, update_ema_every=5, tau=0.05)


def make_batch(seed: int) -> Segments:
    """B windows with left padding of 0..K-1 steps and some terminals."""
    g = torch.Generator().manual_seed(seed)
    pad = torch.tensor([0, 1, 2, 4, 0, 3])
    mask = (torch.arange(K)[None] >= pad[:, None]).float()
    states = torch.randn(B, K, S, generator=g) * mask[..., None]
    actions = (torch.rand(B, K, A, generator=g) * 2 - 1) * mask[..., None]
    rewards = torch.randn(B, K, 1, generator=g) * mask[..., None]
    dones = 1.0 - mask
    dones[4, K - 1] = 1.0
    rtg = torch.randn(B, K + 1, 1, generator=g)
    rtg[:, :K] *= mask[..., None]
    timesteps = ((torch.arange(K)[None] - pad[:, None]).clamp(min=0) + 3 * seed % 7) * mask.long()
    return Segments(states, actions, rewards, dones, rtg, timesteps, mask)


def stream(member_seed: int, steps: int) -> list[Segments]:
    """A member's own batches."""
    return [make_batch(10_000 * member_seed + t) for t in range(steps)]


def stack(streams: list[list[Segments]]) -> list[Segments]:
    return [Segments(*(torch.stack(f) for f in zip(*step))) for step in zip(*streams)]


def _trainer(epochs: int, callbacks: list) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip


class _Chunks(torch.utils.data.IterableDataset):
    """Each pass yields the next `per_epoch` batches: iteration e sees its own slice."""

    def __init__(self, batches: list, epochs: int) -> None:
        self.batches, self.per_epoch, self.passes = batches, len(batches) // epochs, 0

    def __iter__(self):
        e, self.passes = self.passes, self.passes + 1
        return iter(self.batches[e * self.per_epoch : (e + 1) * self.per_epoch])


def _fit(module, batches: list, epochs: int, targets: L.Callback):
    loader = torch.utils.data.DataLoader(_Chunks(batches, epochs), batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _trainer(epochs, [targets]).fit(module, loader)
    return module


def fit_separate(hparams: dict, seed: int, batches: list[Segments], epochs: int) -> QTModule:
    """A separate fit seeded with `seed` (as seed_everything does), its batches split into
    `epochs` iterations."""
    torch.manual_seed(seed)
    return _fit(QTModule(**hparams), batches, epochs, TargetNetworks(**TARGETS))


def fit_pack(pack: PackedQTModule, batches: list[Segments], epochs: int) -> PackedQTModule:
    return _fit(pack, batches, epochs, PackedTargetNetworks(**TARGETS))

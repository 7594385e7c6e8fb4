"""The data of a pack: N independent segment streams, stacked on a leading member dimension.

Member i's stream is the `SegmentStream` its separate fit would draw: the same store, the same
seed (its `data.seed`, else its `seed_everything`), batch number n drawn from (seed, rank, n).
Batch n of the pack is the members' batches n stacked, every `Segments` field (N, B, ...). The
store is read once and shared by the members (they train on the same dataset).
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
import torch
from torch.utils.data import DataLoader

from qt.data.batch import Segments
from qt.data.datamodule import QTDataModule
from qt.data.sampler import IndexedBatches, SegmentStream, StreamLoader


class PackedStream(IndexedBatches):
    """Endless stacked batches of N member streams, from batch number `start` on."""

    def __init__(self, streams: list[SegmentStream]) -> None:
        self.streams = streams
        self.start = 0

    def batch(self, index: int) -> Segments:
        parts = [stream.batch(index) for stream in self.streams]
        return Segments(*(torch.stack(fields) for fields in zip(*parts)))


class PackedDataModule(L.LightningDataModule):
    """Stacked batches of the members' data modules (each a `QTDataModule` of its fit).

    Args:
        members: the members' data modules, of one task and one data configuration.
        seeds: each member's stream seed where its data module has none (its fit's seed).
    """

    def __init__(self, members: list[QTDataModule], seeds: list[int]) -> None:
        super().__init__()
        self.members = members
        self.seeds = [
            int(dm.seed) if dm.seed is not None else int(s) for dm, s in zip(members, seeds)
        ]
        first = members[0]
        self.task, self.K, self.batch_size = first.task, first.K, first.batch_size
        self.num_workers = first.num_workers
        self._stream: PackedStream | None = None

    FACTS = ("state_dim", "act_dim", "scale", "max_ep_len", "env_targets", "state_mean",
             "state_std", "ref_min_score", "ref_max_score", "store")  # fmt: skip

    def __getattr__(self, name: str):  # the data's facts are member 0's (the same data)
        if name not in PackedDataModule.FACTS:
            raise AttributeError(name)
        return getattr(self.members[0], name)

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        rank = self.trainer.global_rank if self.trainer is not None else 0
        store = self.members[0].store
        streams = []
        for dm, seed in zip(self.members, self.seeds):
            dm._store, dm.seed = store, seed  # one copy of the dataset for every member
            streams.append(
                SegmentStream(store, K=dm.K, batch_size=dm.batch_size, max_ep_len=dm.max_ep_len,
                              seed=seed, rank=rank, full_windows_only=dm.full_windows_only)
            )  # fmt: skip
        self._stream = PackedStream(streams)

    def _batches_consumed(self) -> int:
        """Where the streams continue: the steps of the member that trained most (every member
        still training has trained that many; a stopped one's batches are not used)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None:
            return 0
        return max(int(module.member_module(i).train_steps) for i in range(module.n_members))

    def train_dataloader(self) -> DataLoader:
        if self._stream is None:
            self.setup("fit")
        on_gpu = self.trainer is not None and self.trainer.accelerator.__class__.__name__ in (
            "CUDAAccelerator",
        )
        start: Callable[[], int] = self._batches_consumed
        return StreamLoader(self._stream, start, num_workers=self.num_workers,
                            pin_memory=on_gpu, persistent_workers=False)  # fmt: skip

    def val_dataloader(self) -> list:
        return []

    def state_dict(self) -> dict:
        return {"seeds": list(self.seeds), "task": self.task}

    def load_state_dict(self, state_dict: dict) -> None:
        self.seeds = [int(s) for s in state_dict.get("seeds", self.seeds)]


__all__ = ["PackedDataModule", "PackedStream"]

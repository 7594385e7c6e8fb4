"""Segments of length K from a TrajectoryStore (docs/algorithm.md §1), drawn and gathered in one go.

`draw_starts` is the random part (which trajectory, which start); `gather_segments` is the
deterministic part (the window at given (trajectory, start) pairs, padded and normalised).
Both are vectorised over the batch: no per-sample Python loop.

`SegmentStream` is an endless iterable of batches. Batch number i of rank r is drawn from its
own generator, seeded by (seed, r, i): the stream does not depend on the number of DataLoader
workers, ranks draw different segments, and a resumed run continues it exactly by starting
at the number of batches already consumed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from qt.data.batch import Segments
from qt.data.store import TrajectoryStore
from qt.errors import UserError
from qt.seeding import seed_sequence


def check_full_windows(store: TrajectoryStore, K: int, name: str = "") -> None:
    """`full_windows_only` needs every sampled trajectory to hold at least K+1 steps."""
    lengths = store.lengths[store.sample_trajs]
    short = lengths < K + 1
    if short.any():
        raise UserError(
            f"full_windows_only with K={K} needs trajectories of at least {K + 1} steps, but "
            f"dataset {name or store.source} has {int(short.sum())} shorter ones (the shortest "
            f"has {int(lengths.min())}): lower K or set full_windows_only to false."
        )


def draw_starts(
    store: TrajectoryStore,
    batch_size: int,
    K: int,
    rng: np.random.Generator,
    full_windows_only: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """B (trajectory, start) pairs: trajectories with probability proportional to their length
    among `store.sample_trajs`; starts uniform in [0, len-1], or [0, len-K-1] for full windows."""
    pick = rng.choice(len(store.sample_trajs), size=batch_size, replace=True, p=store.sample_p)
    trajs = store.sample_trajs[pick]
    lengths = store.lengths[trajs]
    high = lengths - K - 1 if full_windows_only else lengths - 1
    starts = rng.integers(0, high + 1)  # inclusive of `high`
    return trajs, starts


def gather_segments(
    store: TrajectoryStore,
    trajs: np.ndarray,
    starts: np.ndarray,
    K: int,
    max_ep_len: int,
) -> Segments:
    """The windows starting at `starts` in trajectories `trajs`, left-padded to K (docs/algorithm.md §1).

    Each window takes T = min(K, len - start) steps; returns-to-go take T+1 values, the last
    being 0 when the window reaches the trajectory's end; timesteps are clipped to
    max_ep_len - 1. Padding: states (0 - mean) / std (as the reference, which normalises after
    padding), actions, rewards, rtg and timesteps 0, dones 1, mask 0.
    """
    trajs = np.asarray(trajs, dtype=np.int64)
    starts = np.asarray(starts, dtype=np.int64)
    lengths = store.lengths[trajs]
    if np.any(starts < 0) or np.any(starts >= lengths):
        raise ValueError("gather_segments: every start must lie inside its trajectory.")
    take = np.minimum(K, lengths - starts)  # T per sample
    first = store.offsets[trajs] + starts  # flat index of each window's first step
    # j: position within the window's data for each of the K+1 slots (negative on padding)
    j = np.arange(K + 1)[None, :] - (K - take)[:, None]  # (B, K+1)
    flat = first[:, None] + j
    valid = j >= 0
    pad = store.pad_row
    idx = np.where(valid[:, :K], flat[:, :K], pad)  # (B, K)
    # returns-to-go: one more slot, 0 (the pad row) past the trajectory's end
    inside = valid & (starts[:, None] + j < lengths[:, None])
    rtg_idx = np.where(inside, flat, pad)  # (B, K+1)
    timesteps = np.where(valid[:, :K], np.minimum(starts[:, None] + j[:, :K], max_ep_len - 1), 0)
    return Segments(
        states=torch.from_numpy(store.states[idx]),
        actions=torch.from_numpy(store.actions[idx]),
        rewards=torch.from_numpy(store.rewards[idx][..., None]),
        dones=torch.from_numpy(store.terminals[idx].astype(np.float32)),
        rtg=torch.from_numpy(store.rtg[rtg_idx][..., None]),
        timesteps=torch.from_numpy(timesteps.astype(np.int64)),
        mask=torch.from_numpy(valid[:, :K].astype(np.float32)),
    )


def batch_rng(seed: int, rank: int, index: int) -> np.random.Generator:
    """The generator of batch `index` of rank `rank` in a run seeded `seed`."""
    return np.random.default_rng(seed_sequence(seed, rank, index))


class IndexedBatches(IterableDataset):
    """Endless batches `batch(start)`, `batch(start + 1)`, ...: a subclass says what batch
    number i is (a function of i alone) and sets `start`.

    Under DataLoader workers, worker w of n yields batches start+w, start+w+n, ...; the
    DataLoader interleaves them back into order, so the stream is the same for any n.
    """

    start: int = 0

    def batch(self, index: int) -> Segments:
        raise NotImplementedError

    def __iter__(self) -> Iterator[Segments]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        index = self.start + worker
        while True:
            yield self.batch(index)
            index += workers


class SegmentStream(IndexedBatches):
    """Endless batches of `batch_size` segments; iteration starts at batch number `start`
    (`IndexedBatches`: the same stream under any number of DataLoader workers)."""

    def __init__(
        self,
        store: TrajectoryStore,
        *,
        K: int,
        batch_size: int,
        max_ep_len: int,
        seed: int,
        rank: int = 0,
        full_windows_only: bool = False,
    ) -> None:
        self.store = store
        self.K, self.batch_size, self.max_ep_len = K, batch_size, max_ep_len
        self.seed, self.rank = seed, rank
        self.full_windows_only = full_windows_only
        self.start = 0

    def batch(self, index: int) -> Segments:
        rng = batch_rng(self.seed, self.rank, index)
        trajs, starts = draw_starts(
            self.store, self.batch_size, self.K, rng, self.full_windows_only
        )
        return gather_segments(self.store, trajs, starts, self.K, self.max_ep_len)


class StreamLoader(DataLoader):
    """A DataLoader of a `SegmentStream` that asks `start_fn` where to start at every `iter`.

    Lightning iterates the train loader afresh each epoch; starting at the number of batches
    the model has consumed (not drawn: a prefetched, unused batch is drawn again) makes the
    stream continue across epochs and resumes.
    """

    def __init__(self, stream: SegmentStream, start_fn: Callable[[], int], **kwargs) -> None:
        super().__init__(stream, batch_size=None, **kwargs)
        self._start_fn = start_fn

    def __iter__(self):
        self.dataset.start = int(self._start_fn())
        return super().__iter__()


__all__ = [
    "SegmentStream",
    "StreamLoader",
    "batch_rng",
    "check_full_windows",
    "draw_starts",
    "gather_segments",
]

"""QTDataModule: the dataset of a task served as an endless, per-rank seeded stream of segments.

An epoch (one of the reference's "iterations") is `num_steps_per_iter` batches; cli.py links
that to `trainer.limit_train_batches`. The facts the model needs (sizes, state mean/std, scale,
max_ep_len, the conditioning targets) are properties, read lazily from the dataset and the
registry, so cli.py links them into the model and no config repeats them.
"""

from __future__ import annotations

import os
from typing import Literal

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from qt.data.readers import SOURCES, read_task
from qt.data.sampler import SegmentStream, StreamLoader, check_full_windows
from qt.data.store import TrajectoryStore
from qt.errors import UserError
from qt.tasks import get_task


class QTDataModule(L.LightningDataModule):
    """Segments of `task`'s dataset for QT training (docs/algorithm.md §1).

    Args:
        task: D4RL dataset name from the registry, e.g. `hopper-medium-v2`.
        source: `d4rl-hdf5` (h5py; file from `path`, else qt.data.paths.hdf5_dir(), else
            `D4RL_DATASET_DIR` or ~/.d4rl/datasets),
            `minari` (local Minari store; `path` is a dataset id or a store directory, default
            id `qt/<task>`) or `d4rl-package` (the legacy `d4rl` package, when importable).
        path: see `source`.
        K: segment length (context length).
        batch_size: segments per batch and per rank.
        num_steps_per_iter: batches per epoch.
        num_workers: DataLoader worker processes (the stream is the same for any number).
        seed: seed of the segment stream; default: the run's `seed_everything` seed.
        reward_tune: None or `cql_antmaze` (rewards mapped to (r - 0.5) * 4).
        full_windows_only: draw starts so that every window is full (the hopper-medium* tasks).
        pct_traj: train on the highest-return trajectories holding this fraction of the steps.
    """

    def __init__(
        self,
        task: str,
        source: Literal["d4rl-hdf5", "minari", "d4rl-package"] = "d4rl-hdf5",
        path: str | None = None,
        K: int = 20,
        batch_size: int = 256,
        num_steps_per_iter: int = 1000,
        num_workers: int = 0,
        seed: int | None = None,
        reward_tune: Literal["cql_antmaze"] | None = None,
        full_windows_only: bool = False,
        pct_traj: float = 1.0,
    ) -> None:
        super().__init__()
        self._task = get_task(task)  # unknown names fail here, with close matches
        if source not in SOURCES:
            raise UserError(f"data.source={source!r}: expected one of {', '.join(SOURCES)}.")
        for name, value, low in (
            ("K", K, 1),
            ("batch_size", batch_size, 1),
            ("num_steps_per_iter", num_steps_per_iter, 1),
            ("num_workers", num_workers, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise UserError(f"data.{name}={value!r}: expected a whole number >= {low}.")
        if not 0.0 < pct_traj <= 1.0:
            raise UserError(f"data.pct_traj={pct_traj}: expected a fraction in (0, 1].")
        self.task = self._task.name
        self.source, self.path = source, path
        self.K, self.batch_size = K, batch_size
        self.num_steps_per_iter, self.num_workers = num_steps_per_iter, num_workers
        self.seed = seed
        self.reward_tune, self.full_windows_only, self.pct_traj = (
            reward_tune,
            full_windows_only,
            pct_traj,
        )
        self._store: TrajectoryStore | None = None
        self._stream: SegmentStream | None = None

    # ------------------------------------------------------------------ the dataset, lazily
    @property
    def store(self) -> TrajectoryStore:
        if self._store is None:
            traj = read_task(self._task, self.source, self.path)
            s_dim, a_dim = traj.observations.shape[1], traj.actions.shape[1]
            if (s_dim, a_dim) != (self._task.state_dim, self._task.act_dim):
                raise UserError(
                    f"Dataset {traj.source} has states of size {s_dim} and actions of size "
                    f"{a_dim}, but task {self.task!r} expects {self._task.state_dim} and "
                    f"{self._task.act_dim}: is it the dataset of another task?"
                )
            store = TrajectoryStore(
                traj, scale=self._task.scale, reward_tune=self.reward_tune, pct_traj=self.pct_traj
            )
            longest = int(store.lengths[store.sample_trajs].max())
            if self.K > longest:  # every window would be padding past the episode's end
                raise UserError(
                    f"data.K={self.K}: the longest trajectory of {traj.source} has {longest} "
                    f"steps: expected K <= {longest}, a context that fits in an episode."
                )
            if self.full_windows_only:
                check_full_windows(store, self.K, traj.source)
            # keep the store only: the raw arrays would double the dataset's memory
            self._store = store
            rank_zero_info(f"{self.task} ({traj.source}): {store.summary()}")
        return self._store

    @property
    def state_dim(self) -> int:
        return self._task.state_dim

    @property
    def act_dim(self) -> int:
        return self._task.act_dim

    @property
    def scale(self) -> float:
        return self._task.scale

    @property
    def max_ep_len(self) -> int:
        return self._task.max_ep_len

    @property
    def env_targets(self) -> list[float]:
        return list(self._task.env_targets)

    @property
    def state_mean(self) -> np.ndarray:
        return self.store.state_mean

    @property
    def state_std(self) -> np.ndarray:
        return self.store.state_std

    @property
    def ref_min_score(self) -> float:
        """D4RL's published reference return of the task, by which every score is normalised.

        A dataset generated here carries the reference returns it measured in its own file
        (`qt.datagen`); they check the environment against D4RL's, and are not used to score.
        """
        return self._task.ref_min_score

    @property
    def ref_max_score(self) -> float:
        return self._task.ref_max_score

    # ------------------------------------------------------------------ Lightning hooks
    def _resolved_seed(self) -> int:
        if self.seed is not None:
            return int(self.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        rank = self.trainer.global_rank if self.trainer is not None else 0
        self.seed = self._resolved_seed()
        self._stream = SegmentStream(
            self.store,
            K=self.K,
            batch_size=self.batch_size,
            max_ep_len=self.max_ep_len,
            seed=self.seed,
            rank=rank,
            full_windows_only=self.full_windows_only,
        )

    def _batches_consumed(self) -> int:
        """Batches the model has trained on: its `train_steps` counter (restored on resume)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        steps = getattr(module, "train_steps", None)
        return 0 if steps is None else int(steps)

    def train_dataloader(self) -> DataLoader:
        if self._stream is None:
            self.setup("fit")
        on_gpu = self.trainer is not None and self.trainer.accelerator.__class__.__name__ in (
            "CUDAAccelerator",
        )
        return StreamLoader(
            self._stream,
            self._batches_consumed,
            num_workers=self.num_workers,
            pin_memory=on_gpu,
            persistent_workers=False,
        )

    def test_dataloader(self) -> DataLoader:
        """One placeholder batch: `cli.py test` evaluates in the environment (the Evaluation
        callback), not on the dataset."""
        return DataLoader([torch.zeros(1)], batch_size=None)

    def val_dataloader(self) -> DataLoader | list:
        """`cli.py validate` evaluates in the environment like test; a fit gets no validation
        batches (the Evaluation callback acts at the end of each iteration instead)."""
        if self.trainer is not None and self.trainer.state.fn == "validate":
            return self.test_dataloader()
        return []

    def state_dict(self) -> dict:
        return {"seed": None if self.seed is None else int(self.seed), "task": self.task}

    def load_state_dict(self, state_dict: dict) -> None:
        if state_dict.get("task") not in (None, self.task):
            raise UserError(
                f"The checkpoint was trained on task {state_dict['task']!r}, but data.task is "
                f"{self.task!r}: expected the same task to resume."
            )
        if state_dict.get("seed") is not None:  # a resumed run continues its own stream
            self.seed = int(state_dict["seed"])
            if self._stream is not None:
                self._stream.seed = self.seed


__all__ = ["QTDataModule"]

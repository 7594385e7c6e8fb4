"""Shared pieces of the benchmarks: a synthetic dataset of a task's sizes, and timing."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from qt.data.readers import Trajectories
from qt.data.store import TrajectoryStore
from qt.tasks import get_task


def synthetic_store(
    task: str = "hopper-medium-v2", trajectories: int = 200, max_len: int = 1000, seed: int = 0
) -> TrajectoryStore:
    """A dataset of the task's state/action sizes: trajectories of 100..max_len steps."""
    t = get_task(task)
    rng = np.random.default_rng(seed)
    lengths = rng.integers(100, max_len + 1, size=trajectories)
    n = int(lengths.sum())
    terminals = np.zeros(n, np.float32)
    terminals[np.cumsum(lengths) - 1] = 1.0
    traj = Trajectories(
        observations=rng.normal(size=(n, t.state_dim)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(n, t.act_dim)).astype(np.float32),
        rewards=rng.normal(1.0, 1.0, size=n).astype(np.float32),
        terminals=terminals,
        offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        source=f"synthetic {task}",
    )
    return TrajectoryStore(traj, scale=t.scale)


def seconds_per_call(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of `fn` over `repeats` calls, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda r: "  ".join(str(x).rjust(w) for x, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), *(line(r) for r in rows)])

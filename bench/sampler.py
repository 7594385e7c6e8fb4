"""Sampler: segments per second of our vectorised draw + gather against a per-sample loop
written the way the authors' `get_batch` works (one window at a time, returns-to-go by a Python
`discount_cumsum` over the rest of the trajectory, pad, normalise, concatenate), on the same
hopper-sized 1M-step dataset, side by side in one run; and the dataset's resident memory
against its raw arrays.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from bench._common import seconds_per_call, table
from qt.data.readers import read_d4rl_hdf5
from qt.data.sampler import draw_starts, gather_segments
from qt.data.store import TrajectoryStore

STEPS, S, A, K, B = 1_000_000, 11, 3, 20, 256


def _discount_cumsum(x: np.ndarray, gamma: float = 1.0) -> np.ndarray:
    out = np.zeros_like(x)
    out[-1] = x[-1]
    for t in reversed(range(x.shape[0] - 1)):
        out[t] = x[t] + gamma * out[t + 1]
    return out


def _loop_batch(raw, offsets, mean, std, scale, trajs, starts, max_ep_len=1000):
    """One window at a time, as the reference builds a batch."""
    s, a, r, d, rtg, ts, mask = [], [], [], [], [], [], []
    for i, si in zip(trajs.tolist(), starts.tolist()):
        b, e = int(offsets[i]), int(offsets[i + 1])
        obs, act, rew, term = (x[b:e] for x in raw)
        s.append(obs[si : si + K].reshape(1, -1, S))
        a.append(act[si : si + K].reshape(1, -1, A))
        d.append(term[si : si + K].reshape(1, -1, 1))
        t = np.arange(si, si + s[-1].shape[1]).reshape(1, -1)
        t[t >= max_ep_len] = max_ep_len - 1
        ts.append(t)
        r.append(rew[si : si + K].reshape(1, -1, 1))
        g = _discount_cumsum(rew[si:])[: s[-1].shape[1] + 1].reshape(1, -1, 1)
        if g.shape[1] <= s[-1].shape[1]:
            g = np.concatenate([g, np.zeros((1, 1, 1))], axis=1)
        rtg.append(g)
        n = s[-1].shape[1]
        s[-1] = (np.concatenate([np.zeros((1, K - n, S)), s[-1]], 1) - mean) / std
        a[-1] = np.concatenate([np.zeros((1, K - n, A)), a[-1]], 1)
        r[-1] = np.concatenate([np.zeros((1, K - n, 1)), r[-1]], 1)
        d[-1] = np.concatenate([np.ones((1, K - n, 1)), d[-1]], 1)
        rtg[-1] = np.concatenate([np.zeros((1, K - n, 1)), rtg[-1]], 1) / scale
        ts[-1] = np.concatenate([np.zeros((1, K - n)), ts[-1]], 1)
        mask.append(np.concatenate([np.zeros((1, K - n)), np.ones((1, n))], 1))
    cat = lambda x: torch.from_numpy(np.concatenate(x, 0)).float()  # noqa: E731
    return cat(s), cat(a), cat(r), cat(d), cat(rtg), cat(ts).long(), cat(mask)


def _rss() -> int:
    """Resident bytes, after handing freed heap pages back to the system (glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _write_dataset(path: Path) -> int:
    """A hopper-sized D4RL file: 1M steps, episodes of 50..1000 steps; returns raw bytes."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(50, 1001, size=3000)
    ends = np.cumsum(lengths)
    ends = ends[ends <= STEPS]
    timeouts = np.zeros(STEPS, bool)
    timeouts[ends - 1] = True
    timeouts[-1] = True
    arrays = {
        "observations": rng.normal(size=(STEPS, S)).astype(np.float32),
        "actions": rng.uniform(-1, 1, size=(STEPS, A)).astype(np.float32),
        "rewards": rng.normal(3.0, 1.0, size=STEPS).astype(np.float32),
        "terminals": np.zeros(STEPS, bool),
        "timeouts": timeouts,
    }
    with h5py.File(path, "w") as f:
        for k, v in arrays.items():
            f[k] = v
    return sum(v.nbytes for v in arrays.values())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench sampler", description=__doc__)
    parser.parse_known_args(argv if argv is not None else [])  # no options of its own: --help
    with tempfile.TemporaryDirectory() as tmp:
        raw_bytes = _write_dataset(Path(tmp) / "hopper_medium-v2.hdf5")
        gc.collect()
        before = _rss()
        t0 = time.perf_counter()
        traj = read_d4rl_hdf5(Path(tmp) / "hopper_medium-v2.hdf5")
        raw = (traj.observations, traj.actions, traj.rewards, traj.terminals)
        store = TrajectoryStore(traj, scale=1000.0)
        load_s = time.perf_counter() - t0
        # the store alone (what QTDataModule keeps): measure with the raw arrays released
        raw_copy = tuple(x.copy() for x in raw)
        del traj, raw
        gc.collect()
        store_rss = _rss() - before - sum(x.nbytes for x in raw_copy)
    store_bytes = sum(
        x.nbytes for x in (store.states, store.actions, store.rewards, store.terminals, store.rtg)
    )
    rng = np.random.default_rng(0)
    mean, std = store.state_mean, store.state_std

    def ours():
        return gather_segments(store, *draw_starts(store, B, K, rng), K, 1000)

    def loop():
        return _loop_batch(
            raw_copy, store.offsets, mean, std, 1000.0, *draw_starts(store, B, K, rng)
        )

    t_ours = seconds_per_call(ours, repeats=50)
    t_loop = seconds_per_call(loop, repeats=5)
    print(f"dataset: {store.summary()}; read + prepared in {load_s:.1f} s")
    print(
        table(
            [
                ("per-sample loop (reference)", f"{t_loop * 1e3:.1f}", f"{B / t_loop:,.0f}"),
                ("vectorised draw + gather", f"{t_ours * 1e3:.2f}", f"{B / t_ours:,.0f}"),
            ],
            ("B=256, K=20", "ms/batch", "segments/s"),
        )
    )
    print(f"speedup: {t_loop / t_ours:.0f}x (target >= 20x; one batch under 5 ms)")
    print(
        f"memory: raw arrays {raw_bytes / 2**20:.1f} MiB; store arrays {store_bytes / 2**20:.1f} MiB "
        f"({store_bytes / raw_bytes:.2f}x); resident growth of the store {store_rss / 2**20:.1f} MiB "
        f"({store_rss / raw_bytes:.2f}x; target <= 1.2x)"
    )


if __name__ == "__main__":
    main()

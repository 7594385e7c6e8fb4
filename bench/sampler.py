"""Sampler throughput: our vectorised gather against the authors' per-sample `get_batch` loop
(written out here the way their code does it, but with a vectorised cumsum for the
returns-to-go where theirs loops in Python: a generous baseline), on the same store, side by
side in one run."""

from __future__ import annotations

import numpy as np
import torch

from bench._common import seconds_per_call, synthetic_store, table
from qt.data.sampler import draw_starts, gather_segments


def _loop_batch(store, raw, trajs, starts, K, max_ep_len):
    """One sample at a time, as the reference builds a batch (pad, normalise, concatenate)."""
    s, a, r, d, rtg, ts, mask = [], [], [], [], [], [], []
    S, A = store.state_dim, store.act_dim
    for i, si in zip(trajs.tolist(), starts.tolist()):
        b, e = int(store.offsets[i]), int(store.offsets[i + 1])
        obs, act, rew = raw[b:e], store.actions[b:e], store.rewards[b:e]
        s.append(obs[si : si + K].reshape(1, -1, S))
        a.append(act[si : si + K].reshape(1, -1, A))
        d.append(store.terminals[b:e][si : si + K].reshape(1, -1, 1))
        t = np.arange(si, si + s[-1].shape[1]).reshape(1, -1)
        t[t >= max_ep_len] = max_ep_len - 1
        ts.append(t)
        r.append(rew[si : si + K].reshape(1, -1, 1))
        g = np.cumsum(rew[si:][::-1])[::-1][: s[-1].shape[1] + 1].reshape(1, -1, 1)
        if g.shape[1] <= s[-1].shape[1]:
            g = np.concatenate([g, np.zeros((1, 1, 1))], axis=1)
        rtg.append(g)
        n = s[-1].shape[1]
        s[-1] = (
            np.concatenate([np.zeros((1, K - n, S)), s[-1]], 1) - store.state_mean
        ) / store.state_std
        a[-1] = np.concatenate([np.zeros((1, K - n, A)), a[-1]], 1)
        r[-1] = np.concatenate([np.zeros((1, K - n, 1)), r[-1]], 1)
        d[-1] = np.concatenate([np.ones((1, K - n, 1)), d[-1]], 1)
        rtg[-1] = np.concatenate([np.zeros((1, K - n, 1)), rtg[-1]], 1) / store.scale
        ts[-1] = np.concatenate([np.zeros((1, K - n)), ts[-1]], 1)
        mask.append(np.concatenate([np.zeros((1, K - n)), np.ones((1, n))], 1))
    cat = lambda x: torch.from_numpy(np.concatenate(x, 0)).float()  # noqa: E731
    return cat(s), cat(a), cat(r), cat(d), cat(rtg), cat(ts).long(), cat(mask)


def main() -> None:
    store = synthetic_store("hopper-medium-v2", trajectories=1000)
    raw = store.states[:-1] * store.state_std + store.state_mean  # un-normalised states
    K, max_ep_len = 20, 1000
    rows = []
    for B in (64, 256, 1024):
        rng = np.random.default_rng(0)

        def ours(B=B, rng=rng):
            return gather_segments(store, *draw_starts(store, B, K, rng), K, max_ep_len)

        def loop(B=B, rng=rng):
            return _loop_batch(store, raw, *draw_starts(store, B, K, rng), K, max_ep_len)

        t_ours = seconds_per_call(ours, repeats=20)
        t_loop = seconds_per_call(loop, repeats=5)
        rows.append((B, f"{t_loop * 1e3:.2f}", f"{t_ours * 1e3:.2f}", f"{t_loop / t_ours:.1f}x"))
    print(f"store: {store.summary()}; K={K}; one batch = draw + gather, median of repeats")
    print(table(rows, ("batch", "per-sample loop ms", "vectorised ms", "speedup")))


if __name__ == "__main__":
    main()

"""Shared pieces of the benchmarks: a synthetic dataset of a task's sizes, timing, and
floating-point work: FLOPs counted by `torch.utils.flop_counter` and by hand (the two must
agree), and the machine's peak matmul rate at a workload's own shapes, measured in the same
run."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

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


# ----------------------------------------------------------------------------- FLOPs
# PyTorch's counter knows the GPU attention kernels but not the CPU flash kernel that
# `scaled_dot_product_attention` picks on a CPU: count it by the same formula.
_aten = torch.ops.aten
_CPU_SDPA = {
    _aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v)
    ),
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda g, q, k, v, *args, out_shape=None, **kw: sdpa_backward_flop_count(g, q, k, v)
    ),
}


class _MatmulShapes(TorchDispatchMode):
    """Records every matmul (and CPU attention, as its two batched matmuls) that runs, as
    (batch, m, k, n, dtype): the shapes the peak is measured at."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, int, int, int, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in (_aten.mm, _aten.addmm):
            a, b = (args[0], args[1]) if packet is _aten.mm else (args[1], args[2])
            self.shapes.append((1, a.shape[0], a.shape[1], b.shape[1], a.dtype))
        elif packet in (_aten.bmm, _aten.baddbmm):
            a, b = (args[0], args[1]) if packet is _aten.bmm else (args[1], args[2])
            self.shapes.append((a.shape[0], a.shape[1], a.shape[2], b.shape[2], a.dtype))
        elif packet is _aten._scaled_dot_product_flash_attention_for_cpu:
            q, k = args[0], args[1]  # (B, H, Lq, hd), (B, H, Lk, hd)
            bh, lq, hd, lk = q.shape[0] * q.shape[1], q.shape[2], q.shape[3], k.shape[2]
            self.shapes += [(bh, lq, hd, lk, q.dtype), (bh, lq, lk, hd, q.dtype)]
        return func(*args, **kwargs)


def counted_flops(fn: Callable[[], object]) -> tuple[int, list, object]:
    """Floating-point operations of the matmuls and attention `fn` runs (2 per multiply-add),
    counted by `torch.utils.flop_counter.FlopCounterMode`; the matmul shapes it ran (see
    `_MatmulShapes`); and fn's result."""
    shapes = _MatmulShapes()
    with FlopCounterMode(display=False, custom_mapping=_CPU_SDPA) as counter, shapes:
        out = fn()
    return int(counter.get_total_flops()), shapes.shapes, out


def linear(rows: int, fan_in: int, fan_out: int) -> int:
    """FLOPs of one dense layer's matmul (bias and activation not counted)."""
    return 2 * rows * fan_in * fan_out


def actor_flops(windows: int, T: int, S: int, A: int, d: int, n_layer: int) -> dict[str, int]:
    """Forward FLOPs of `QTActor` on `windows` windows of T timesteps (3T tokens), by part."""
    L = 3 * T
    rows = windows * L
    embed = linear(windows * T, S, d) + linear(windows * T, A, d) + linear(windows * T, 1, d)
    block = linear(rows, d, 3 * d) + linear(rows, d, d) + linear(rows, d, 4 * d)
    block += linear(rows, 4 * d, d)
    attention = 2 * (2 * windows * L * L * d)  # q k^T and p v
    heads = linear(windows * T, d, A) + linear(windows * T, d, S)
    return {"embed": embed, "dense": n_layer * block + heads, "attention": n_layer * attention}


def critic_flops(rows: int, S: int, A: int, d: int) -> dict[str, int]:
    """Forward FLOPs of `TwinCritic` on `rows` (state, action) pairs, first layers apart."""
    first = 2 * linear(rows, S + A, d)
    rest = 2 * (2 * linear(rows, d, d) + linear(rows, d, 1))
    return {"first": first, "rest": rest}


def train_step_flops(
    B: int, K: int, S: int, A: int, d: int, n_layer: int, recompute_scores: bool = False
) -> int:
    """FLOPs of one QT training step (k_rewards, no max_q_backup), written out by hand.

    Backward of a dense layer costs one matmul for the weight gradient and one for the input
    gradient, the latter skipped where the input is data; attention backward is two matmuls
    per forward matmul. `recompute_scores`: torch's fused attention backward recomputes q k^T
    first (half the forward's attention FLOPs more), and torch's counter counts it. The actor
    trains through that kernel on CUDA; on the CPU, with dropout, it writes attention out as
    matmuls, whose backward recomputes nothing (on an H200 at the published size: 416.30 GFLOP
    counted against 414.41 by hand without the recompute, the gap exactly that half).
    """
    actor = actor_flops(B, K, S, A, d, n_layer)
    a_fwd = sum(actor.values())
    a_lin = actor["embed"] + actor["dense"]
    critic_all, critic_last = critic_flops(B * K, S, A, d), critic_flops(B, S, A, d)
    c_fwd = sum(critic_all.values())
    critic = c_fwd + c_fwd + critic_all["rest"]  # forward, weight grads, input grads past layer 1
    targets = a_fwd + sum(critic_last.values())  # EMA actor, target critic at the last step
    actor_step = a_fwd + a_lin + (a_lin - actor["embed"]) + 2 * actor["attention"]
    if recompute_scores:
        actor_step += actor["attention"] // 2
    # the frozen critic on the actor's actions: forward of both twins, input gradients through
    # the one in the numerator of the Q term only (the other's mean is detached)
    q_term = c_fwd + c_fwd // 2
    return critic + targets + actor_step + q_term


def act_flops(
    E: int, N: int, U: int, K: int, S: int, A: int, d: int, n_layer: int, shared: bool
) -> int:
    """FLOPs of one `QTPolicy.act` for E episodes, N candidates in U return-to-go groups, by hand.

    Windows are always padded to K timesteps, so the count does not depend on the step.
    Both modes score N actions and compute the Q-value candidate (E rows) with the critic.
    """
    critic = sum(critic_flops(E * N, S, A, d).values()) + sum(critic_flops(E, S, A, d).values())
    if not shared:  # one full window per candidate
        return sum(actor_flops(E * N, K, S, A, d, n_layer).values()) + critic
    P, old = 3 * (K - 1), K - 1  # prefix tokens and timesteps, run once per group
    prefix = actor_flops(E * U, old, S, A, d, n_layer)
    prefix_cost = prefix["embed"] + prefix["attention"]
    prefix_cost += n_layer * (
        linear(E * U * P, d, 3 * d)
        + linear(E * U * P, d, d)
        + linear(E * U * P, d, 4 * d)
        + linear(E * U * P, 4 * d, d)
    )
    new = 2 * E * N  # the newest return and state tokens of every candidate
    extend = linear(E * N, 1, d) + linear(E, S, d)  # their embeddings (the state once per episode)
    extend += n_layer * (
        linear(new, d, 3 * d)
        + linear(new, d, d)
        + linear(new, d, 4 * d)
        + linear(new, 4 * d, d)
        + 2 * 2 * E * N * 2 * (P + 2) * d
    )
    extend += linear(E * N, d, A)  # the action head on the state token
    return prefix_cost + extend + critic


def best_seconds(
    batch: int,
    m: int,
    k: int,
    n: int,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seconds: float = 0.5,
) -> float:
    """Wall time of the fastest `(batch, m, k) @ (batch, k, n)` matmul (a plain 2-d one for
    batch 1) among calls made for about `seconds`, after one warm-up call."""
    g = torch.Generator(device="cpu").manual_seed(0)
    shape_a, shape_b = ((m, k), (k, n)) if batch == 1 else ((batch, m, k), (batch, k, n))
    a = torch.randn(*shape_a, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(*shape_b, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ b  # warm-up
    sync()
    best, start, calls = float("inf"), time.perf_counter(), 0
    while calls < 2 or time.perf_counter() - start < seconds:
        t0 = time.perf_counter()
        a @ b
        sync()
        best, calls = min(best, time.perf_counter() - t0), calls + 1
    return best


def shape_flops(shapes: list) -> int:
    """FLOPs of recorded matmul shapes (2 per multiply-add): a third count, from the shapes."""
    return sum(2 * batch * m * k * n for batch, m, k, n, _ in shapes)


def peak_rate(shapes: list, device: str = "cpu") -> float:
    """This machine's peak FLOP/s at a workload's own matmul shapes: its matmul FLOPs divided by
    the time they take when each runs alone at its fastest (`best_seconds`, each distinct shape
    measured once, in the dtype it ran in)."""
    flops, secs, cache = 0, 0.0, {}
    for shape in shapes:
        if shape not in cache:
            cache[shape] = best_seconds(*shape, device=device)
        batch, m, k, n, _ = shape
        flops += 2 * batch * m * k * n
        secs += cache[shape]
    return flops / secs


def gflops(x: float) -> str:
    return f"{x / 1e9:.1f}"

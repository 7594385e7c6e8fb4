"""Training steps per second of QTModule in a Lightning fit (critic step, actor step, target
networks, logging), the batch drawn from the sampler inside the timed loop, and the
floating-point rate that achieves against this machine's peak, both measured in this run.

Sizes: the published one (B=256, K=20, d=256, 4 layers, 4 heads), a CPU one (B=64, K=20,
d=128, 3 layers, 4 heads) and the CPU studies' width-64 regime (B=64, K=20, d=64, 2 layers,
2 heads), hopper's state and action sizes. The FLOPs of one step (the matmuls
and attention of every forward and backward: critic, EMA actor, target critic, actor, the Q
term) are counted by `torch.utils.flop_counter` on a one-step fit and checked against a count
by hand (`bench._common.train_step_flops`) and one from the matmul shapes the step ran. The peak
is this machine's rate at those same shapes and dtypes: the step's matmul FLOPs over the time
its matmuls take when each distinct shape runs alone at its fastest, measured in this run with
the same threads (`bench._common.peak_rate`).
`--profile` instead runs torch's profiler over 10 steps (after 8 unprofiled ones) and prints
where a step's time goes: its wall time, the GPU's kernel time within it, the kernel launches
per step, and the most expensive operators.
`python -m bench train_step [--steps N] [--size width64|cpu|published] [--profile]`; set QT_BENCH_DEVICE=cuda (and
QT_BENCH_PRECISION=bf16-mixed, or QT_BENCH_MATMUL=high for TF32 float32 matmuls, as
cli.py's float32_matmul_precision) on a GPU machine.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import lightning as L
import numpy as np
import torch

from bench._common import (
    counted_flops,
    gflops,
    peak_rate,
    shape_flops,
    synthetic_store,
    table,
    train_step_flops,
)
from qt.callbacks.targets import TargetNetworks
from qt.data.sampler import SegmentStream, StreamLoader
from qt.module import QTModule
from qt.runtime import keep_freed_memory

K = 20
SIZES = {
    "published": dict(batch_size=256, hidden_size=256, n_layer=4, n_head=4),
    "cpu": dict(batch_size=64, hidden_size=128, n_layer=3, n_head=4),
    "width64": dict(batch_size=64, hidden_size=64, n_layer=2, n_head=2),
}
DEFAULT_SIZES = ("width64", "cpu", "published")  # when no --size is given


class _StepClock(L.Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def _fit(size: str, steps: int, device: str, precision: str, callbacks: list) -> QTModule:
    cfg = SIZES[size]
    store = synthetic_store("hopper-medium-v2", trajectories=300)
    stream = SegmentStream(
        store, K=K, batch_size=cfg["batch_size"], max_ep_len=1000, seed=0, full_windows_only=True
    )
    loader = StreamLoader(stream, lambda: 0, pin_memory=device == "cuda")
    model = QTModule(
        state_dim=store.state_dim,
        act_dim=store.act_dim,
        K=K,
        max_ep_len=1000,
        scale=1000.0,
        state_mean=store.state_mean.tolist(),
        state_std=store.state_std.tolist(),
        hidden_size=cfg["hidden_size"],
        n_layer=cfg["n_layer"],
        n_head=cfg["n_head"],
        eta=1.0,
        grad_norm=9.0,
        max_iters=500,
        k_rewards=True,
        use_discount=True,
    )
    # EMA from the first step, so its cost (every 5th step) is in the figure
    targets = TargetNetworks(step_start_ema=0, update_ema_every=5)
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        precision=precision,
        max_steps=-1,
        limit_train_batches=steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, targets],
        log_every_n_steps=50,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train_dataloaders=loader)
    return model


def seconds_per_step(size: str, steps: int, device: str, precision: str) -> float:
    clock = _StepClock()
    _fit(size, steps + 2, device, precision, [clock])
    gaps = np.diff(clock.stamps)[1:]  # the first two steps warm up
    return float(np.median(gaps))


def flops_per_step(size: str, device: str, precision: str) -> tuple[int, list]:
    """FLOPs of one step counted by torch's FlopCounterMode on a one-step fit, checked against
    the count by hand and the count from the recorded matmul shapes; and those shapes."""
    cfg = SIZES[size]
    counted, shapes, model = counted_flops(lambda: _fit(size, 1, device, precision, []))
    by_hand = train_step_flops(
        cfg["batch_size"],
        K,
        model.hparams.state_dim,
        model.hparams.act_dim,
        cfg["hidden_size"],
        cfg["n_layer"],
        recompute_scores=device == "cuda",
    )
    checks = [("by hand", by_hand)]
    if device != "cuda":  # CUDA's fused attention runs no matmul that the shape recorder sees
        checks.append(("from the matmul shapes", shape_flops(shapes)))
    for name, other in checks:
        if abs(counted - other) > 1e-3 * counted:
            raise SystemExit(
                f"train_step {size}: FlopCounterMode counts {counted} FLOPs per step, the count "
                f"{name} {other}: expected them to agree."
            )
    return counted, shapes


class _Profile(_StepClock):
    """torch.profiler over the steps of a fit: `wait` unprofiled steps, 3 warm-up, `active`;
    the step clock's stamps beside it."""

    def __init__(self, device: str, wait: int = 5, active: int = 10) -> None:
        from torch.profiler import ProfilerActivity, profile, schedule

        super().__init__()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        self.active, self.cuda = active, device == "cuda"
        self.prof = profile(activities=acts, schedule=schedule(wait=wait, warmup=3, active=active))

    def on_train_start(self, trainer, pl_module) -> None:
        self.prof.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.prof.step()

    def on_train_end(self, trainer, pl_module) -> None:
        self.prof.__exit__(None, None, None)


def profile_steps(size: str, device: str, precision: str) -> str:
    """Where one step's time goes, from torch's profiler (10 profiled steps)."""
    prof = _Profile(device)
    _fit(size, 5 + 3 + prof.active + 1, device, precision, [prof])
    gaps = np.diff(prof.stamps)
    events = prof.prof.key_averages()
    launches = sum(e.count for e in events if e.key.startswith("cudaLaunchKernel"))
    kernel_ms = sum(e.self_device_time_total for e in events) / 1e3 / prof.active
    # gaps[i] is batch i + 1; batches 2-4 run before the profiler starts (at batch 5's start),
    # batches 8-17 are the profiled ones (batch 18 pays for processing the trace)
    head = (
        f"{size}: {np.median(gaps[1:4]) * 1e3:.1f} ms a step unprofiled, "
        f"{np.median(gaps[7 : 7 + prof.active]) * 1e3:.1f} ms profiled"
    )
    if prof.cuda:
        head += (
            f"; per profiled step {kernel_ms:.2f} ms of GPU kernel time, "
            f"{launches / prof.active:.0f} kernel launches"
        )
    sort = "self_cuda_time_total" if prof.cuda else "self_cpu_time_total"
    return head + "\n" + events.table(sort_by=sort, row_limit=12, max_name_column_width=50)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench train_step")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per size")
    parser.add_argument(
        "--size", choices=sorted(SIZES), action="append", help="(default: all three)"
    )
    parser.add_argument("--profile", action="store_true", help="where a step's time goes")
    args, _ = parser.parse_known_args(argv if argv is not None else [])
    keep_freed_memory()  # as cli.py does
    device = os.environ.get("QT_BENCH_DEVICE", "cpu")
    precision = os.environ.get("QT_BENCH_PRECISION", "32-true")
    matmul = os.environ.get("QT_BENCH_MATMUL", "highest")
    torch.set_float32_matmul_precision(matmul)
    if args.profile:
        for size in args.size or DEFAULT_SIZES:
            print(profile_steps(size, device, precision), flush=True)
        return
    rows = []
    for size in args.size or DEFAULT_SIZES:
        cfg = SIZES[size]
        steps = args.steps or (6 if size == "published" else 30)
        if device == "cuda":
            steps = args.steps or 100
        counted, shapes = flops_per_step(size, device, precision)
        sec = seconds_per_step(size, steps, device, precision)
        peak = peak_rate(shapes, device=device)
        achieved = counted / sec
        rows.append(
            (
                size,
                str(cfg),
                f"{sec * 1e3:.0f}",
                f"{1 / sec:.2f}",
                gflops(counted),
                gflops(achieved),
                len(set(shapes)),
                gflops(peak),
                f"{100 * achieved / peak:.0f}%",
            )
        )
    print(
        f"device {device}, precision {precision}, float32 matmul {matmul}, torch threads {torch.get_num_threads()}. "
        "GFLOP per step: matmuls and attention of every forward and backward, counted by "
        "torch's FlopCounterMode, by hand and (on the CPU) from the shapes (equal to 0.1%). "
        "Peak: the step's matmul shapes, each timed alone at its fastest in this run (on CUDA "
        "without the fused attention's)."
    )
    print(
        table(
            rows,
            (
                "size",
                "settings",
                "ms/step",
                "steps/s",
                "GFLOP/step",
                "GFLOP/s",
                "matmul shapes",
                "peak GFLOP/s",
                "of peak",
            ),
        )
    )


if __name__ == "__main__":
    main()

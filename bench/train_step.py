"""Training steps per second of QTModule in a Lightning fit (critic step, actor step, target
networks, logging), the batch drawn from the sampler inside the timed loop.

Sizes: the published one (B=256, K=20, d=256, 4 layers, 4 heads) and a CPU one (B=64, K=20,
d=128, 3 layers, 4 heads), hopper's state and action sizes. The authors' code took about 5.3 s
per step at the published size and 0.49 s at the CPU size on this project's 2-core CPU machine
(figures from the issue, measured on that machine); the ratio column compares with those.
`python -m bench train_step [--steps N]`; set QT_BENCH_DEVICE=cuda (and QT_BENCH_PRECISION=bf16-mixed)
on a GPU machine.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import lightning as L
import numpy as np
import torch

from bench._common import synthetic_store, table
from qt.callbacks.targets import TargetNetworks
from qt.data.sampler import SegmentStream, StreamLoader
from qt.module import QTModule
from qt.runtime import keep_freed_memory

AUTHORS_SECONDS = {"published": 5.3, "cpu": 0.49}  # per step, this machine, reference code
SIZES = {
    "published": dict(batch_size=256, hidden_size=256, n_layer=4, n_head=4),
    "cpu": dict(batch_size=64, hidden_size=128, n_layer=3, n_head=4),
}


class _StepClock(L.Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def seconds_per_step(size: str, steps: int, device: str, precision: str) -> float:
    cfg = SIZES[size]
    store = synthetic_store("hopper-medium-v2", trajectories=300)
    K = 20
    stream = SegmentStream(
        store, K=K, batch_size=cfg["batch_size"], max_ep_len=1000, seed=0, full_windows_only=True
    )
    loader = StreamLoader(stream, lambda: 0, pin_memory=device == "cuda")
    model = QTModule(
        state_dim=store.state_dim, act_dim=store.act_dim, K=K, max_ep_len=1000, scale=1000.0,
        state_mean=store.state_mean.tolist(), state_std=store.state_std.tolist(),
        hidden_size=cfg["hidden_size"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
        eta=1.0, grad_norm=9.0, max_iters=500, k_rewards=True, use_discount=True,
    )  # fmt: skip
    clock = _StepClock()
    # EMA from the first step, so its cost (every 5th step) is in the figure
    targets = TargetNetworks(step_start_ema=0, update_ema_every=5)
    trainer = L.Trainer(
        accelerator=device, devices=1, precision=precision, max_steps=-1,
        limit_train_batches=steps + 2, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[clock, targets],
        log_every_n_steps=50,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, train_dataloaders=loader)
    gaps = np.diff(clock.stamps)[1:]  # the first two steps warm up
    return float(np.median(gaps))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench train_step")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per size")
    args, _ = parser.parse_known_args(argv if argv is not None else [])
    keep_freed_memory()  # as cli.py does
    device = os.environ.get("QT_BENCH_DEVICE", "cpu")
    precision = os.environ.get("QT_BENCH_PRECISION", "32-true")
    rows = []
    for size in ("cpu", "published"):
        steps = args.steps or (30 if size == "cpu" else 6)
        if device == "cuda":
            steps = args.steps or 100
        sec = seconds_per_step(size, steps, device, precision)
        ref = AUTHORS_SECONDS[size]
        speedup = f"{ref / sec:.1f}x" if device == "cpu" else "n/a (GPU)"
        rows.append((size, str(SIZES[size]), f"{sec * 1e3:.0f}", f"{1 / sec:.2f}", speedup))
    print(f"device {device}, precision {precision}, torch threads {torch.get_num_threads()}")
    print(table(rows, ("size", "settings", "ms/step", "steps/s", "vs authors' code")))


if __name__ == "__main__":
    main()

"""Ten fits as today's study runs them (separate processes) against packed fits.

(a) separate: `workers = cores` processes at once, each with `OMP_NUM_THREADS = cores //
workers`, each a Lightning fit of QTModule (target networks included) on synthetic batches of
hopper's sizes; a process times its steps after a warm-up, and the aggregate rate is the sum of
the processes' rates (the steady state of the study's pool, which runs ten fits `workers` at a
time). (b) packed: `PackedQTModule`s (compiled unless --no-compile) in Lightning fits on the same
kind of batches, stacked: on the CPU one pack per core by default (on 2 cores, two 1-thread
processes of five fits each, as the study runner divides the cores; a 2-thread process on a
loaded machine waits at every OpenMP barrier), `--packs 1` one pack of all the fits with all the
cores. The packed arm's peak is measured at the shapes of its packs. Both arms run in
this one invocation, alternating `--rounds` times; the machine's load is printed beside them.

FLOPs per fit-step are counted by torch's FlopCounterMode on one eager step of each arm and
checked against the count by hand (`bench._common.train_step_flops`); each arm's peak is this
machine's matmul rate at that arm's own matmul shapes and threads (`bench._common.peak_rate`).
`--profile`: torch's profiler over packed steps (compiled and eager), top operators.

    python -m bench pack [--quick] [--size width64|published] [--fits 10] [--steps N]
                         [--rounds R] [--packs P] [--no-compile] [--profile] [--compare-vmap]

The last line: `packed speed-up: N.Nx (10 fits, width64, <device>)`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings

import lightning as L
import numpy as np
import torch

from bench._common import counted_flops, gflops, peak_rate, synthetic_store, table, train_step_flops
from qt.callbacks.targets import TargetNetworks
from qt.data.batch import Segments
from qt.data.sampler import SegmentStream
from qt.module import QTModule
from qt.runtime import keep_freed_memory
from qt.study.packing import cores as usable_cores

K, MAX_EP_LEN = 20, 1000
SIZES = {
    "width64": dict(batch_size=64, hidden_size=64, n_layer=2, n_head=2),
    "published": dict(batch_size=256, hidden_size=256, n_layer=4, n_head=4),
}
POOL = 4  # distinct batches per fit, cycled


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{cpu_name()}, {usable_cores()} cores"


def hparams(size: str, store) -> dict:
    cfg = SIZES[size]
    return dict(
        state_dim=store.state_dim, act_dim=store.act_dim, K=K, max_ep_len=MAX_EP_LEN,
        scale=1000.0, state_mean=store.state_mean.tolist(), state_std=store.state_std.tolist(),
        hidden_size=cfg["hidden_size"], n_layer=cfg["n_layer"], n_head=cfg["n_head"],
        eta=1.0, grad_norm=9.0, max_iters=500, k_rewards=True, use_discount=True,
    )  # fmt: skip


def batches(size: str, store, seed: int) -> list[Segments]:
    stream = SegmentStream(
        store, K=K, batch_size=SIZES[size]["batch_size"], max_ep_len=MAX_EP_LEN, seed=seed,
        full_windows_only=True,
    )  # fmt: skip
    return [stream.batch(i) for i in range(POOL)]


class _Cycle(torch.utils.data.IterableDataset):
    def __init__(self, items: list, n: int) -> None:
        self.items, self.n = items, n

    def __iter__(self):
        return (self.items[i % len(self.items)] for i in range(self.n))


class _Clock(L.Callback):
    def __init__(self) -> None:
        self.stamps: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def _fit(module, items: list, steps: int, callbacks: list, device: str = "cpu") -> None:
    trainer = L.Trainer(
        accelerator=device, devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(_Cycle(items, steps), batch_size=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader)


def _rate(stamps: list[float], warmup: int) -> float:
    """Steps per second over the steps after `warmup` (median step time)."""
    return 1.0 / float(np.median(np.diff(stamps[warmup:])))


# ----------------------------------------------------------------------------- arm (a)
def worker(size: str, steps: int, seed: int, device: str, members: int, compile: bool) -> None:
    """One process of an arm: a separate fit (members 0), or a pack of `members` fits; prints
    its fit-steps/s as JSON."""
    keep_freed_memory()
    store = synthetic_store("hopper-medium-v2", trajectories=300)
    if members > 0:
        pack = make_pack(size, members, compile, store, first_seed=seed)
        items = stacked_batches(size, members, store, first_seed=seed)
        _fit(pack, items, 2, [], device)  # compilation and first steps, outside the timing
        rate = packed_rate(pack, items, steps, device)
        print(json.dumps({"rate": rate, "threads": torch.get_num_threads()}))
        return
    torch.manual_seed(seed)
    module = QTModule(**hparams(size, store))
    clock = _Clock()
    targets = TargetNetworks(step_start_ema=0, update_ema_every=5)
    _fit(module, batches(size, store, seed), steps + 3, [clock, targets], device)
    print(json.dumps({"rate": _rate(clock.stamps, 2), "threads": torch.get_num_threads()}))


def separate_rate(
    size: str, steps: int, workers: int, device: str, members: int = 0, compile: bool = True
) -> tuple[float, list]:
    """Aggregate fit-steps/s of `workers` concurrent processes (separate fits, or packs of
    `members` fits each), and their rates."""
    threads = max(1, usable_cores() // workers)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.pack",
                "--worker",
                "--size",
                size,
                "--steps",
                str(steps),
                "--seed",
                str(w),
                "--device",
                device,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )  # fmt: skip
        for w in range(workers)
    ]
    rates = []
    for p in procs:
        out, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"bench pack: a separate fit's process failed ({p.returncode}).")
        rates.append(json.loads(out.strip().splitlines()[-1])["rate"])
    return float(sum(rates)), rates


# ----------------------------------------------------------------------------- arm (b)
def make_pack(size: str, fits: int, compile: bool, store, first_seed: int = 0):
    from qt.pack.module import PackedQTModule

    members = [{"seed": first_seed + i} for i in range(fits)]
    return PackedQTModule(members, compile=compile, **hparams(size, store))


def stacked_batches(size: str, fits: int, store, first_seed: int = 0) -> list[Segments]:
    per_fit = [batches(size, store, first_seed + seed) for seed in range(fits)]
    return [Segments(*(torch.stack(f) for f in zip(*step))) for step in zip(*per_fit)]


def packed_rate(pack, items: list, steps: int, device: str) -> float:
    """Aggregate fit-steps/s of the pack (its first steps, compilation included, not timed)."""
    from qt.pack.module import PackedTargetNetworks

    clock = _Clock()
    targets = PackedTargetNetworks(step_start_ema=0, update_ema_every=5)
    _fit(pack, items, steps + 3, [clock, targets], device)
    return pack.n_members * _rate(clock.stamps, 2)


# ----------------------------------------------------------------------------- FLOPs
def flops(size: str, fits: int, store) -> dict:
    """FLOPs per fit-step of each arm (counted, and by hand) and each arm's matmul shapes."""
    cfg = SIZES[size]
    hp = hparams(size, store)
    torch.manual_seed(0)
    one = QTModule(**hp)
    items = batches(size, store, 0)[:1]
    sep, sep_shapes, _ = counted_flops(
        lambda: _fit(one, items, 1, [TargetNetworks(step_start_ema=0)])
    )
    pack = make_pack(size, fits, False, store)
    packed, pack_shapes, _ = counted_flops(
        lambda: _fit(pack, stacked_batches(size, fits, store)[:1], 1, [])
    )
    by_hand = train_step_flops(
        cfg["batch_size"], K, store.state_dim, store.act_dim, cfg["hidden_size"], cfg["n_layer"]
    )
    for name, count in (("separate", sep), ("packed, per fit", packed / fits)):
        if abs(count - by_hand) > 1e-3 * by_hand:
            raise SystemExit(
                f"bench pack {size}: {name} step counted {count:.0f} FLOPs against {by_hand} "
                "by hand: expected them to agree."
            )
    return dict(per_fit=by_hand, sep_shapes=sep_shapes, pack_shapes=pack_shapes)


def profile(size: str, fits: int, compile: bool, store) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    pack = make_pack(size, fits, compile, store)
    items = stacked_batches(size, fits, store)
    _fit(pack, items, 3, [])  # compile and warm up
    clock = _Clock()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        _fit(pack, items, 6, [clock])
    ms = 1e3 / _rate(clock.stamps, 1)
    head = (f"packed step, {fits} fits, {size}, {'compiled' if compile else 'eager'}: "
            f"{ms:.0f} ms a step profiled ({ms / fits:.1f} ms a fit-step), "
            f"{torch.get_num_threads()} threads; per-op totals over 6 steps")  # fmt: skip
    return (
        head
        + "\n"
        + prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60
        )
    )


def compare_vmap(size: str, fits: int, store, repeats: int = 3) -> str:
    """The design choice, measured: the actor's forward and backward for `fits` members as
    batched layers (`qt.pack.functional`) against `torch.func.functional_call` of QTActor under
    `vmap` over stacked parameters (dropout 0: vmap has no per-member stream), eager, alternated."""
    from torch.func import functional_call, stack_module_state

    from qt.pack import functional as PF

    hp = hparams(size, store) | dict(dropout=0.0, embed_dropout=0.0)
    actors = []
    for seed in range(fits):
        torch.manual_seed(seed)
        actors.append(QTModule(**hp).actor)
    params, _ = stack_module_state(actors)
    params = {k: v.detach().requires_grad_() for k, v in params.items()}
    b = stacked_batches(size, fits, store)[0]
    arch = dict(n_layer=hp["n_layer"], n_head=hp["n_head"], sar=False, scale=1000.0,
                dropout=0.0, embed_dropout=0.0, noise=None)  # fmt: skip
    base = actors[0]

    def batched():
        out = PF.actor_forward(params, b.states, b.actions, b.rewards, b.rtg[:, :, :-1],
                               b.timesteps, b.mask, **arch)[1]  # fmt: skip
        torch.autograd.grad(out.square().sum(), list(params.values()), allow_unused=True)

    def one(p, s, a, r, g, t, m):
        return functional_call(base, p, (s, a, r, g, t, m)).action_preds

    def vmapped():
        out = torch.vmap(one)(params, b.states, b.actions, b.rewards, b.rtg[:, :, :-1],
                              b.timesteps, b.mask)  # fmt: skip
        torch.autograd.grad(out.square().sum(), list(params.values()), allow_unused=True)

    times = {"batched layers": [], "vmap(functional_call)": []}
    for _ in range(repeats):
        for name, fn in (("batched layers", batched), ("vmap(functional_call)", vmapped)):
            fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    rows = [(name, f"{1e3 * min(t):.0f}") for name, t in times.items()]
    return (f"actor forward+backward, {fits} members, {size}, eager, {torch.get_num_threads()} "
            f"threads (best of {repeats}, alternated)\n") + table(rows, ("layers", "ms"))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench pack")
    parser.add_argument("--size", choices=sorted(SIZES), action="append", help="(default: both)")
    parser.add_argument("--fits", type=int, default=10)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per arm and round")
    parser.add_argument("--rounds", type=int, default=None, help="alternations of the two arms")
    parser.add_argument("--quick", action="store_true", help="width64 only, few steps")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--compare-vmap", action="store_true", help="batched layers vs vmap")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--members", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument(
        "--packs", type=int, default=None,
        help="packed arm as this many processes of fits/packs members, cores/packs threads "
        "each (default on the CPU: one pack per core, as the study runner divides the cores; "
        "1: one pack with all the cores)",
    )  # fmt: skip
    parser.add_argument("--device", default=os.environ.get("QT_BENCH_DEVICE", "cpu"))
    args, _ = parser.parse_known_args(argv if argv is not None else [])
    sizes = args.size or (["width64"] if args.quick else ["width64", "published"])
    if args.worker:
        worker(sizes[0], args.steps, args.seed, args.device, args.members, args.compile)
        return
    keep_freed_memory()
    store = synthetic_store("hopper-medium-v2", trajectories=300)
    cores = usable_cores()  # the cores this process may run on (taskset, cgroups)
    if args.compare_vmap:
        for size in sizes:
            print(compare_vmap(size, args.fits, store), flush=True)
        return
    if args.profile:
        for size in sizes:
            for compiled in [True, False] if args.compile else [False]:
                print(profile(size, args.fits, compiled, store), flush=True)
        return
    workers = cores if args.device == "cpu" else args.fits
    if args.packs is None and args.device == "cpu" and args.fits % cores == 0:
        args.packs = cores
    if args.packs == 1:
        args.packs = None
    rounds = args.rounds or (1 if args.quick else 2)
    print(f"device: {device_name(args.device)}; torch {torch.__version__}; "
          f"{args.fits} fits; separate: {workers} processes at once, "
          f"{max(1, cores // workers)} thread(s) each; packed: "
          + (f"{args.packs} processes of {args.fits // args.packs} fits, "
             f"{max(1, cores // args.packs)} thread(s) each, " if args.packs else
             f"one process, {torch.get_num_threads()} threads, ")
          + ('compiled' if args.compile else 'eager'),
          flush=True)  # fmt: skip
    rows, speedups = [], {}
    for size in sizes:
        steps = args.steps or (
            (8 if args.quick else 20) if size == "width64" else (3 if args.quick else 5)
        )
        f = flops(size, args.fits // (args.packs or 1), store)
        threads = max(1, cores // workers)
        torch.set_num_threads(threads)
        sep_peak = peak_rate(f["sep_shapes"]) * workers
        if args.packs:
            torch.set_num_threads(max(1, cores // args.packs))
            pack_peak = peak_rate(f["pack_shapes"]) * args.packs
        else:
            torch.set_num_threads(cores)
            pack_peak = peak_rate(f["pack_shapes"])
        torch.set_num_threads(cores)
        pack, items, warm = None, None, 0.0
        if not args.packs:
            pack = make_pack(size, args.fits, args.compile, store)
            items = stacked_batches(size, args.fits, store)
            t0 = time.perf_counter()
            _fit(pack, items, 2, [])  # compilation and first steps, outside the timing
            warm = time.perf_counter() - t0
        sep_rates, pack_rates = [], []
        for r in range(rounds):
            load = os.getloadavg()[0]
            sep, _ = separate_rate(size, steps, workers, args.device)
            sep_rates.append(sep)
            if args.packs:
                per = args.fits // args.packs
                pack_rates.append(
                    separate_rate(size, steps, args.packs, args.device, per, args.compile)[0]
                )
            else:
                pack_rates.append(packed_rate(pack, items, steps, args.device))
            print(f"  {size} round {r + 1}: separate {sep:.2f} fit-steps/s, packed "
                  f"{pack_rates[-1]:.2f} fit-steps/s (load average before: {load:.2f})",
                  flush=True)  # fmt: skip
        sep, packed = float(np.median(sep_rates)), float(np.median(pack_rates))
        speedups[size] = packed / sep
        for arm, rate, peak in (("separate", sep, sep_peak), ("packed", packed, pack_peak)):
            achieved = rate * f["per_fit"]
            rows.append((size, arm, f"{rate:.2f}", gflops(achieved), gflops(peak),
                         f"{100 * achieved / peak:.0f}%"))  # fmt: skip
        print(f"  {size}: {gflops(f['per_fit'])} GFLOP per fit-step; packed warm-up "
              f"(compilation, 2 steps) {warm:.0f} s", flush=True)  # fmt: skip
    print(table(rows, ("size", "arm", "fit-steps/s", "GFLOP/s", "peak GFLOP/s", "of peak")))
    print(f"uptime: {os.getloadavg()}")
    size = "width64" if "width64" in speedups else sizes[0]
    print(f"packed speed-up: {speedups[size]:.1f}x ({args.fits} fits, {size}, "
          f"{device_name(args.device)})")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])

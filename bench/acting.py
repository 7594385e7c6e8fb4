"""Acting throughput: environment steps per second of Q-guided acting (docs/algorithm.md §4, 50
candidates) for 10 hopper episodes at once against the same 10 episodes one after another with
batch 1, side by side in one run, at the CPU size (d=128, 3 layers) and the published size
(d=256, 4 layers, 4 heads); with the older timesteps run once per distinct return-to-go history
(`share_prefix`, the default) and once per candidate (one full window each), in float32, and
shared under bf16 autocast.

Each row also gives the floating-point rate achieved against this machine's peak, both measured
in this run. The FLOPs of one environment step (actor and critic matmuls and attention) do not
depend on the step, since windows are always padded to K: they are counted by
`torch.utils.flop_counter` on one batched `act` and checked against a count by hand
(`bench._common.act_flops`) and one from the matmul shapes. The peak is this machine's rate at
the matmul shapes and dtypes of one `act` (for one episode, and for all acting together), each
shape timed alone at its fastest in this run (`bench._common.peak_rate`).
Episodes are capped at `--max-steps` (default 100) so the benchmark takes minutes; the
network is untrained (acting cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import numpy as np
import torch

from bench._common import act_flops, counted_flops, gflops, peak_rate, shape_flops, table
from qt.acting.episodes import run_episodes
from qt.acting.policy import QTPolicy
from qt.envs import make_env
from qt.models import QTActor, TwinCritic
from qt.runtime import keep_freed_memory
from qt.tasks import get_task

TASK = "hopper-medium-v2"
K, N = 20, 50
SIZES = {
    "cpu": dict(hidden_size=128, n_layer=3, n_head=4),
    "published": dict(hidden_size=256, n_layer=4, n_head=4),
}


def _policy(size: str, max_steps: int, precision: str, share_prefix: bool = True) -> QTPolicy:
    task = get_task(TASK)
    cfg = SIZES[size]
    torch.manual_seed(0)
    actor = QTActor(
        task.state_dim,
        task.act_dim,
        cfg["hidden_size"],
        cfg["n_layer"],
        cfg["n_head"],
        K=K,
        max_ep_len=1000,
        dropout=0.1,
        sar=False,
        scale=task.scale,
    ).eval()
    critic = TwinCritic(task.state_dim, task.act_dim, cfg["hidden_size"])  # QT's critic width
    policy = QTPolicy(
        actor,
        critic,
        state_mean=[0.0] * task.state_dim,
        state_std=[1.0] * task.state_dim,
        scale=task.scale,
        env_targets=task.env_targets,
        K=K,
        max_ep_len=max_steps,
        num_candidates=N,
        share_prefix=share_prefix,
    )
    if precision == "bf16":
        act = policy.act

        def act_bf16():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return act()

        policy.act = act_bf16
    return policy


def ms_per_env_step(
    size: str, episodes: int, num_envs: int, max_steps: int, precision: str, share: bool = True
) -> float:
    policy = _policy(size, max_steps, precision, share)
    env_fn = partial(make_env, TASK)
    run_episodes(policy, env_fn, [999], num_envs=1)  # warm-up
    t0 = time.perf_counter()
    stats = run_episodes(policy, env_fn, list(range(episodes)), num_envs=num_envs)
    return 1e3 * (time.perf_counter() - t0) / stats.steps


def flops_per_env_step(size: str, episodes: int, share: bool, precision: str = "fp32"):
    """FLOPs of one environment step of one episode, counted by torch on one `act` for
    `episodes` episodes and checked against the counts by hand and from the matmul shapes; and
    the shapes of that `act` (to measure the peak at)."""
    task, cfg = get_task(TASK), SIZES[size]
    policy = _policy(size, 10, precision, share)
    envs = [make_env(TASK) for _ in range(episodes)]
    try:
        obs = [env.reset(seed=i)[0] for i, env in enumerate(envs)]
    finally:
        for env in envs:
            env.close()
    policy.reset(np.stack(obs), list(range(episodes)))
    counted, shapes, _ = counted_flops(policy.act)
    groups = len(task.env_targets) + N % len(task.env_targets)  # target histories, noise ones
    by_hand = act_flops(
        episodes,
        N,
        groups,
        K,
        task.state_dim,
        task.act_dim,
        cfg["hidden_size"],
        cfg["n_layer"],
        shared=share,
    )
    for name, other in (("by hand", by_hand), ("from the matmul shapes", shape_flops(shapes))):
        if abs(counted - other) > 1e-3 * counted:
            raise SystemExit(
                f"acting {size}, shared={share}: FlopCounterMode counts {counted} FLOPs per act "
                f"of {episodes} episodes, the count {name} {other}: expected them to agree."
            )
    return counted // episodes, shapes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench acting")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--episodes", type=int, default=10)
    args, _ = parser.parse_known_args(argv if argv is not None else [])
    keep_freed_memory()
    E = args.episodes
    rows = []
    for size in ("cpu", "published"):
        for precision, share in (("fp32", False), ("fp32", True), ("bf16", True)):
            flops, _ = flops_per_env_step(size, E, share)
            # the peak at the shapes one `act` runs, for one episode and for E at once
            peak_one = peak_rate(flops_per_env_step(size, 1, share, precision)[1])
            peak_many = peak_rate(flops_per_env_step(size, E, share, precision)[1])
            one = ms_per_env_step(size, E, 1, args.max_steps, precision, share)
            many = ms_per_env_step(size, E, E, args.max_steps, precision, share)
            rate_one, rate_many = flops / (one / 1e3), flops / (many / 1e3)
            mode = f"{precision}, {'shared prefixes' if share else 'one window per candidate'}"
            rows.append(
                (
                    size,
                    mode,
                    f"{flops / 1e6:.0f}",
                    f"{one:.1f}",
                    f"{many:.1f}",
                    f"{one / many:.1f}x",
                    f"{gflops(rate_one)} / {gflops(rate_many)}",
                    f"{gflops(peak_one)} / {gflops(peak_many)}",
                    f"{100 * rate_one / peak_one:.0f}% / {100 * rate_many / peak_many:.0f}%",
                )
            )
    print(
        f"hopper, {N} candidates, K={K}, {E} episodes of <= {args.max_steps} steps; torch "
        f"threads {torch.get_num_threads()}. MFLOP per environment step: counted by torch's "
        "FlopCounterMode, by hand and from the shapes (equal to 0.1%). Peak: the matmul shapes "
        f"of one act, each timed alone at its fastest in this run; batch 1 / {E} at once."
    )
    print(
        table(
            rows,
            (
                "size",
                "mode",
                "MFLOP/step",
                "ms/step batch 1",
                f"ms/step {E} at once",
                "batching gain",
                "GFLOP/s",
                "peak GFLOP/s",
                "of peak",
            ),
        )
    )


if __name__ == "__main__":
    main()

"""Acting throughput: environment steps per second of Q-guided acting (docs/algorithm.md §4, 50
candidates) for 10 hopper episodes at once against the same 10 episodes one after another with
batch 1, side by side in one run, at the CPU size (d=128, 3 layers) and the published size
(d=256, 4 layers, 4 heads); with the older timesteps run once per distinct return-to-go history
(`share_prefix`, the default) and once per candidate (as the reference does), in float32, and
shared under bf16 autocast.

The authors' code, one episode at a time on this project's 2-core machine, took 54 ms per
environment step at the CPU size and 0.15 s at the published size (figures from the issue).
Episodes are capped at `--max-steps` (default 100) so the benchmark takes minutes; the
network is untrained (acting cost does not depend on the weights).
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

from bench._common import table
from qt.acting.episodes import run_episodes
from qt.acting.policy import QTPolicy
from qt.envs import make_env
from qt.models import QTActor, TwinCritic
from qt.runtime import keep_freed_memory
from qt.tasks import get_task

AUTHORS_MS = {"cpu": 54.0, "published": 150.0}
SIZES = {
    "cpu": dict(hidden_size=128, n_layer=3, n_head=4),
    "published": dict(hidden_size=256, n_layer=4, n_head=4),
}


def _policy(size: str, max_steps: int, precision: str, share_prefix: bool = True) -> QTPolicy:
    task = get_task("hopper-medium-v2")
    cfg = SIZES[size]
    torch.manual_seed(0)
    actor = QTActor(
        task.state_dim, task.act_dim, cfg["hidden_size"], cfg["n_layer"], cfg["n_head"], K=20,
        max_ep_len=1000, dropout=0.1, sar=False, scale=task.scale,
    ).eval()  # fmt: skip
    critic = TwinCritic(task.state_dim, task.act_dim, 256)
    policy = QTPolicy(
        actor, critic, state_mean=[0.0] * task.state_dim, state_std=[1.0] * task.state_dim,
        scale=task.scale, env_targets=task.env_targets, K=20, max_ep_len=max_steps,
        share_prefix=share_prefix,
    )  # fmt: skip
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
    env_fn = partial(make_env, "hopper-medium-v2")
    run_episodes(policy, env_fn, [999], num_envs=1)  # warm-up
    t0 = time.perf_counter()
    stats = run_episodes(policy, env_fn, list(range(episodes)), num_envs=num_envs)
    return 1e3 * (time.perf_counter() - t0) / stats.steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench acting")
    parser.add_argument("--max-steps", type=int, default=100)
    parser.add_argument("--episodes", type=int, default=10)
    args, _ = parser.parse_known_args(argv if argv is not None else [])
    keep_freed_memory()
    rows = []
    for size in ("cpu", "published"):
        for precision, share in (("fp32", False), ("fp32", True), ("bf16", True)):
            one = ms_per_env_step(size, args.episodes, 1, args.max_steps, precision, share)
            many = ms_per_env_step(
                size, args.episodes, args.episodes, args.max_steps, precision, share
            )
            ref = AUTHORS_MS[size]
            mode = f"{precision}, {'shared prefixes' if share else 'one window per candidate'}"
            rows.append((size, mode, f"{one:.1f}", f"{many:.1f}", f"{one / many:.1f}x",
                         f"{ref / one:.1f}x", f"{ref / many:.1f}x"))  # fmt: skip
    print(f"hopper, 50 candidates, K=20, {args.episodes} episodes of <= {args.max_steps} steps; "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print(table(rows, ("size", "mode", "ms/step batch 1", f"ms/step {args.episodes} at once",
                       "batching gain", "vs authors (batch 1)", "vs authors (batched)")))  # fmt: skip


if __name__ == "__main__":
    main()

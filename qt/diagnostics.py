"""Diagnosing a trained QT: is its critic right, and what does the Q term do to the actions?

`python -m qt.diagnostics CKPT [CKPT ...] --task maze2d-umaze-v1 --data PATH` loads each
checkpoint and reports three things, each measured, none inferred:

1. The critic against Monte-Carlo returns on the dataset: `q_min` of the target critic at
   random dataset (state, action) pairs beside the discounted return (`discount` of the
   checkpoint) that actually followed in the data. The critic estimates the value of its own
   (EMA) actor, not of the behaviour policy, so it need not equal the Monte-Carlo return; but
   a critic that has learnt anything ranks states as the returns do (the correlations).
   Maze2D files are one continuing stream cut at goal arrivals (the point is never reset),
   so their returns run across those cuts; every other dataset restarts at trajectory ends.
2. The actor against the data: on random training windows, the distance of the actor's
   actions from the dataset's, and whether the critic prefers them (`Q(s, actor) -
   Q(s, data)`): the Q term's effect on the actions, in the critic's own units.
3. The critic along evaluation episodes: `q_min` at the states and actions the policy took
   beside the discounted return that followed in the episode (cut at the episode's end, so
   late steps are lower bounds).
4. Reaching and staying, where the reward is 1 at the goal and 0 elsewhere (sparse Maze2D and
   AntMaze: 1 inside the goal's radius): the share of episodes that reach the goal, the median
   step of the first arrival, and the share of the steps from the first arrival on spent at
   the goal. On D4RL's Maze2D data arriving is demonstrated from every cell and staying never
   (trajectories end on arrival), so the last number is where a critic's values can add to
   imitation.

The numbers go to stdout as a table and, with `--json`, to a file.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

from qt.acting.episodes import run_episodes
from qt.acting.policy import QTPolicy
from qt.checkpointing import load_checkpoint
from qt.data.readers import Trajectories, read_task
from qt.data.sampler import gather_segments
from qt.data.store import TrajectoryStore
from qt.envs import make_env
from qt.errors import ArgumentParser, UserError, report
from qt.module import QTModule
from qt.tasks import get_task


def discounted_returns(rewards: np.ndarray, ends: np.ndarray, discount: float) -> np.ndarray:
    """G_t = r_t + discount * G_{t+1}, restarting after every step where `ends` is true.

    rewards, ends: (N,). The last step always ends (nothing follows it).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    ends = np.asarray(ends, dtype=bool)
    if rewards.shape != ends.shape or rewards.ndim != 1:
        raise ValueError(f"rewards {rewards.shape} and ends {ends.shape}: expected equal (N,).")
    out = np.empty_like(rewards)
    g = 0.0
    r, e = rewards.tolist(), ends.tolist()
    for t in range(len(r) - 1, -1, -1):
        g = r[t] + (0.0 if e[t] else discount * g)
        out[t] = g
    return out


def rank_correlation(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties broken by order)."""
    rx = np.argsort(np.argsort(x)).astype(np.float64)
    ry = np.argsort(np.argsort(y)).astype(np.float64)
    return float(np.corrcoef(rx, ry)[0, 1])


def rewards_mark_the_goal(task: str) -> bool:
    """Whether the task's reward is 1 at the goal and 0 elsewhere: sparse Maze2D and AntMaze
    (not Kitchen, whose 0/1 rewards count subtasks completed in a step)."""
    found = get_task(task)
    return found.family in ("maze2d", "antmaze") and not found.dense


def goal_occupancy(episodes: Sequence[np.ndarray]) -> dict[str, float] | None:
    """Reaching and staying from per-episode rewards that are all 0 or 1 (1: at the goal):
    `reached` the share of episodes with a 1, `first_arrival_median` the median 0-based step
    of their first 1, `stay_share` the share of the steps from each first 1 to the episode's
    end that are 1s (pooled over the episodes that arrive). None where some reward is neither
    0 nor 1 (a dense reward says nothing about being at the goal)."""
    rewards = [np.asarray(r, dtype=np.float64).reshape(-1) for r in episodes]
    if not rewards or not all(np.isin(r, (0.0, 1.0)).all() for r in rewards):
        return None
    firsts = [int(np.argmax(r)) for r in rewards if r.any()]
    after = [r[int(np.argmax(r)) :] for r in rewards if r.any()]
    return {
        "episodes": len(rewards),
        "reached": len(firsts) / len(rewards),
        "first_arrival_median": float(np.median(firsts)) if firsts else float("nan"),
        "stay_share": float(np.concatenate(after).mean()) if after else float("nan"),
    }


def _compare(q: np.ndarray, g: np.ndarray) -> dict[str, float]:
    q, g = np.asarray(q, np.float64), np.asarray(g, np.float64)
    return {
        "n": int(q.size),
        "q_mean": float(q.mean()),
        "return_mean": float(g.mean()),
        "bias": float((q - g).mean()),
        "rmse": float(np.sqrt(((q - g) ** 2).mean())),
        "pearson": float(np.corrcoef(q, g)[0, 1]) if q.std() > 0 and g.std() > 0 else float("nan"),
        "spearman": rank_correlation(q, g),
    }


@torch.no_grad()
def critic_vs_returns(
    critic: torch.nn.Module,
    store: TrajectoryStore,
    discount: float,
    pairs: int,
    rng: np.random.Generator,
    continuing: bool,
) -> dict[str, float]:
    """`q_min` at `pairs` random dataset steps against the discounted return that followed."""
    n = store.num_steps
    ends = np.zeros(n, dtype=bool)
    ends[-1] = True
    if not continuing:
        ends[store.offsets[1:] - 1] = True
    g = discounted_returns(store.rewards[:n], ends, discount)
    idx = rng.choice(n, size=min(pairs, n), replace=False)
    s = torch.as_tensor(store.states[idx])
    a = torch.as_tensor(store.actions[idx])
    q = critic.q_min(s, a).reshape(-1).double().numpy()
    return _compare(q, g[idx])


@torch.no_grad()
def actor_vs_data(
    actor: torch.nn.Module,
    critic: torch.nn.Module,
    store: TrajectoryStore,
    K: int,
    max_ep_len: int,
    windows: int,
    rng: np.random.Generator,
) -> dict[str, float]:
    """The actor's actions on random training windows against the dataset's own actions."""
    traj = rng.choice(store.sample_trajs, size=windows, p=store.sample_p)
    starts = rng.integers(0, store.lengths[traj])
    batch = gather_segments(store, traj, starts, K=K, max_ep_len=max_ep_len)
    was = actor.training
    actor.eval()
    out = actor(
        batch.states, batch.actions, batch.rewards, batch.rtg[:, :K], batch.timesteps, batch.mask
    )
    actor.train(was)
    valid = batch.mask.bool()
    s, a_data, a_pred = batch.states[valid], batch.actions[valid], out.action_preds[valid]
    q_pred = critic.q_min(s, a_pred).reshape(-1)
    q_data = critic.q_min(s, a_data).reshape(-1)
    adv = (q_pred - q_data).double()
    return {
        "n": int(s.shape[0]),
        "action_mse": float(((a_pred - a_data) ** 2).sum(-1).mean()),
        "q_actor_mean": float(q_pred.mean()),
        "q_data_mean": float(q_data.mean()),
        "q_gain_mean": float(adv.mean()),
        "q_gain_positive": float((adv > 0).double().mean()),
        "abs_action_actor": float(a_pred.abs().mean()),
        "abs_action_data": float(a_data.abs().mean()),
    }


class _Recorder(gym.Wrapper):
    """Keeps every episode's observations (before each step), actions and rewards."""

    def __init__(self, env: gym.Env, log: list) -> None:
        super().__init__(env)
        self.log = log
        self.current: dict | None = None

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        self.current = {"obs": [], "actions": [], "rewards": []}
        self.log.append(self.current)
        self._obs = obs
        return obs, info

    def step(self, action):
        self.current["obs"].append(np.asarray(self._obs, np.float32).copy())
        self.current["actions"].append(np.asarray(action, np.float32).copy())
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.current["rewards"].append(float(reward))
        self._obs = obs
        return obs, reward, terminated, truncated, info


@torch.no_grad()
def critic_along_episodes(
    module, task: str, seeds: Sequence[int]
) -> tuple[dict[str, float], dict[str, float] | None]:
    """`q_min` along evaluation episodes against the discounted return that followed, and
    the episodes' reaching and staying (`goal_occupancy`; None unless the task's rewards mark
    the goal)."""
    hp = module.hparams
    log: list[dict] = []
    module.actor.eval()
    policy = QTPolicy.from_module(module, task)
    stats = run_episodes(policy, lambda: _Recorder(make_env(task), log), list(seeds))
    qs, gs = [], []
    for ep in log:
        if not ep["rewards"]:
            continue
        r = np.asarray(ep["rewards"])
        ends = np.zeros(len(r), bool)
        ends[-1] = True
        gs.append(discounted_returns(r, ends, hp.discount))
        s = (torch.as_tensor(np.stack(ep["obs"])) - module.state_mean) / module.state_std
        qs.append(module.critic_target.q_min(s, torch.as_tensor(np.stack(ep["actions"]))))
    q = torch.cat(qs).reshape(-1).double().numpy()
    result = _compare(q, np.concatenate(gs))
    result["episode_return_mean"] = float(stats.returns.mean())
    if not rewards_mark_the_goal(task):
        return result, None
    return result, goal_occupancy([np.asarray(ep["rewards"]) for ep in log if ep["rewards"]])


def diagnose(
    ckpt: str | Path,
    task: str,
    trajectories: Trajectories,
    pairs: int = 4000,
    windows: int = 256,
    episodes: int = 5,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """All three diagnoses of one checkpoint on the task's dataset (see the module's docstring)."""
    # the project's checked loader: weights only, one sentence for a broken file
    saved = load_checkpoint(ckpt)
    hparams = {k: v for k, v in saved["hyper_parameters"].items() if not k.startswith("_")}
    module = QTModule(**hparams)  # Lightning's own keys (`_instantiator`) left out
    module.load_state_dict(saved["state_dict"])
    module.eval()
    hp = module.hparams
    store = TrajectoryStore(trajectories, scale=hp.scale)
    if store.state_dim != hp.state_dim or store.act_dim != hp.act_dim:
        raise UserError(
            f"Checkpoint {ckpt} is for states/actions of size {hp.state_dim}/{hp.act_dim}; "
            f"the dataset has {store.state_dim}/{store.act_dim}: expected the task it was "
            "trained on."
        )
    rng = np.random.default_rng(seed)
    continuing = get_task(task).family == "maze2d"
    out = {
        "critic_vs_dataset_returns": critic_vs_returns(
            module.critic_target, store, hp.discount, pairs, rng, continuing
        ),
        "actor_vs_data": actor_vs_data(
            module.actor, module.critic_target, store, hp.K, hp.max_ep_len, windows, rng
        ),
    }
    if episodes > 0:
        along, occupancy = critic_along_episodes(module, task, [seed + i for i in range(episodes)])
        out["critic_along_episodes"] = along
        if occupancy is not None:
            out["reaching_and_staying"] = occupancy
    return out


def format_report(name: str, report: dict[str, dict[str, float]]) -> str:
    lines = [f"{name}"]
    for section, values in report.items():
        body = ", ".join(
            f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items()
        )
        lines.append(f"  {section}: {body}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m qt.diagnostics", description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpts", nargs="+", help="checkpoints (.ckpt) of one task")
    parser.add_argument("--task", required=True, help="the qt task name, e.g. maze2d-umaze-v1")
    parser.add_argument("--data", default=None, help="dataset path (as --data.path of a fit)")
    parser.add_argument("--source", default="d4rl-hdf5", help="as --data.source of a fit")
    parser.add_argument("--pairs", type=int, default=4000, help="dataset pairs for the critic")
    parser.add_argument("--windows", type=int, default=256, help="training windows for the actor")
    parser.add_argument("--episodes", type=int, default=5, help="evaluation episodes (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args(argv)

    reports = {}
    try:
        trajectories = read_task(args.task, source=args.source, path=args.data)
        for ckpt in args.ckpts:
            reports[ckpt] = diagnose(
                ckpt, args.task, trajectories, args.pairs, args.windows, args.episodes, args.seed
            )
            print(format_report(ckpt, reports[ckpt]), flush=True)
    except UserError as err:  # a bad checkpoint, task or dataset: one line, exit 2
        return report(err)
    if args.json:
        Path(args.json).write_text(json.dumps(reports, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Locomotion datasets made by D4RL's protocol: hopper, halfcheetah, walker2d on gymnasium -v4.

This module owns the behaviour policies and the rollouts of the `<family>-<kind>-v2` datasets:

- `random`: uniform actions in the action box;
- `medium`: a stable-baselines3 SAC run stopped at the first evaluation whose mean return
  crosses `target_return` (default a third of D4RL's expert reference score, as D4RL did),
  then rolled out with its stochastic actions;
- `medium-replay`: that same run's replay buffer, from its first step to the stopping step,
  in order (terminals and timeouts as in D4RL: a terminal only where the environment
  terminated, a timeout where the time limit cut the episode);
- `expert`: a SAC run trained for `expert_sac_steps` (to convergence, given the budget);
- `medium-expert`: the medium rollouts followed by the expert ones (`steps` of each, as
  D4RL's 2M-step files hold 1M of each).

SAC is stable-baselines3's (networks, losses, entropy tuning, target updates: `SAC.train`).
The environment loop around it is ours, so that each episode's reset is seeded from
(seed, episode) and checkpoints fall on episode boundaries: a run resumed from its last
checkpoint (model, optimisers, replay buffer, random states) continues exactly as the
uninterrupted run would, and a stopped generation resumes where it stopped. Checkpoints live
under `work_dir/sac-<medium|expert>-seed<seed>/`; the medium run is shared by `medium`,
`medium-replay` and `medium-expert`.

Every dataset is cut at exactly `steps` steps; the episode the cut falls in ends in a
timeout there (it was truncated). Rollout episodes end in a timeout at the time limit
(1000, or `max_episode_steps`). Reference scores are D4RL's published ones from the registry.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qt.datagen.generated import GeneratedDataset
from qt.envs.common import LOCOMOTION_LIMIT
from qt.envs.locomotion import make_locomotion_env
from qt.errors import UserError
from qt.seeding import derived_seed
from qt.tasks import get_task

FAMILIES = ("hopper", "halfcheetah", "walker2d")
KINDS = ("random", "medium", "medium-replay", "expert", "medium-expert")
D4RL_STEPS = {"random": 1_000_000, "medium": 1_000_000, "expert": 1_000_000}
# SB3's SAC hyperparameters for these tasks (rl-baselines3-zoo: learning_starts 10000), the
# rest SB3's defaults: lr 3e-4, batch 256, tau 0.005, gamma 0.99, automatic entropy, 256x256.
SAC_KWARGS = dict(learning_rate=3e-4, batch_size=256, tau=0.005, gamma=0.99, train_freq=1)

# Named streams keep the random numbers of different uses apart for one seed.
_STREAMS = {"sac": 1, "eval": 2, "random": 3, "medium": 4, "expert": 5}


def parse_name(name: str) -> tuple[str, str]:
    """`hopper-medium-replay-v2` -> ("hopper", "medium-replay")."""
    family, _, rest = name.partition("-")
    kind, _, version = rest.rpartition("-")
    if family not in FAMILIES or kind not in KINDS or not version.startswith("v"):
        raise UserError(
            f"Locomotion dataset name {name!r}: expected <family>-<kind>-v2 with family one of "
            f"{', '.join(FAMILIES)} and kind one of {', '.join(KINDS)}."
        )
    return family, kind


def episode_seed(seed: int, stream: str, episode: int) -> int:
    """The reset seed of one episode of one stream: independent of batching and resuming."""
    return derived_seed(seed, _STREAMS[stream], episode)


def _stream_seed(seed: int, stream: str) -> int:
    return derived_seed(seed, _STREAMS[stream])


def _ref_scores(family: str) -> tuple[float, float]:
    task = get_task(f"{family}-medium-v2")
    return task.ref_min_score, task.ref_max_score


# ---------------------------------------------------------------------------------------------
# rollouts


def rollout(
    family: str,
    policy: Callable[[np.ndarray], np.ndarray],
    steps: int,
    seed: int,
    stream: str,
    *,
    n_envs: int = 8,
    max_episode_steps: int = LOCOMOTION_LIMIT,
    desc: str | None = None,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Run `policy` (a batch of observations -> a batch of actions) in `n_envs` envs at once
    until episodes 0, 1, 2, ... (in order) hold `steps` steps; return D4RL's flat arrays.

    Episode k is reset with `episode_seed(seed, stream, k)`; episodes are stored in index
    order whichever slot ran them. The last episode is cut at `steps` and ends in a timeout.
    """
    envs = [make_locomotion_env(family) for _ in range(n_envs)]
    episodes: dict[int, dict[str, list]] = {}
    slot_ep = list(range(n_envs))
    obs = np.stack([env.reset(seed=episode_seed(seed, stream, k))[0] for k, env in enumerate(envs)])
    for k in slot_ep:
        episodes[k] = {"obs": [], "act": [], "rew": [], "term": False}
    next_ep, covered, prefix = n_envs, 0, 0  # prefix: episodes 0..prefix-1 are finished
    finished: set[int] = set()
    bar = tqdm(
        total=steps,
        desc=desc or f"{family} {stream} rollout",
        unit="step",
        unit_scale=True,
        disable=not progress,
        dynamic_ncols=True,
    )
    returns: list[float] = []
    while covered < steps:
        actions = np.asarray(policy(obs), dtype=np.float32)  # (n_envs, A)
        for i, env in enumerate(envs):
            ep = episodes[slot_ep[i]]
            nxt, reward, terminated, truncated, _ = env.step(actions[i])
            ep["obs"].append(obs[i].copy())  # obs[i] is overwritten below
            ep["act"].append(actions[i])
            ep["rew"].append(reward)
            if terminated or truncated or len(ep["rew"]) >= max_episode_steps:
                ep["term"] = bool(terminated)
                finished.add(slot_ep[i])
                returns.append(float(np.sum(ep["rew"])))
                while prefix in finished and covered < steps:
                    covered += len(episodes[prefix]["rew"])
                    prefix += 1
                slot_ep[i] = next_ep
                episodes[next_ep] = {"obs": [], "act": [], "rew": [], "term": False}
                nxt = env.reset(seed=episode_seed(seed, stream, next_ep))[0]
                next_ep += 1
            obs[i] = nxt
        bar.n = min(covered, steps)
        bar.set_postfix(
            episodes=prefix, ret=f"{np.mean(returns[-20:]):.0f}" if returns else "-", refresh=False
        )
        bar.update(0)
    bar.close()
    for env in envs:
        env.close()
    keep = [episodes[k] for k in range(prefix)]
    lengths = np.array([len(e["rew"]) for e in keep])
    terminals = np.zeros(lengths.sum(), bool)
    timeouts = np.zeros(lengths.sum(), bool)
    ends = np.cumsum(lengths) - 1
    is_term = np.array([e["term"] for e in keep])
    terminals[ends[is_term]] = True
    timeouts[ends[~is_term]] = True
    arrays = {
        "observations": np.concatenate([np.asarray(e["obs"], np.float32) for e in keep]),
        "actions": np.concatenate([np.asarray(e["act"], np.float32) for e in keep]),
        "rewards": np.concatenate([np.asarray(e["rew"], np.float32) for e in keep]),
        "terminals": terminals,
        "timeouts": timeouts,
    }
    arrays = {k: v[:steps] for k, v in arrays.items()}
    if arrays["terminals"][-1] == 0:  # the cut episode was truncated by the dataset size
        arrays["timeouts"][-1] = True
    return arrays


def random_policy(family: str, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """Uniform actions in the family's action box, from a generator seeded by `seed`."""
    env = make_locomotion_env(family)
    low, high = env.action_space.low, env.action_space.high
    env.close()
    rng = np.random.default_rng(_stream_seed(seed, "random"))
    return lambda obs: rng.uniform(low, high, size=(len(obs), len(low))).astype(np.float32)


def sac_policy(model, deterministic: bool = False) -> Callable[[np.ndarray], np.ndarray]:
    """A batched policy from an SB3 SAC model (its stochastic actions unless deterministic)."""
    return lambda obs: model.predict(obs, deterministic=deterministic)[0]


# ---------------------------------------------------------------------------------------------
# SAC runs with checkpoints


class SACRun:
    """One SB3 SAC run in `run_dir`: trains from its last checkpoint until the evaluation
    return crosses `target_return` (None: never) or `budget` env steps are done.

    The run's identity (family, seed, target, evaluation and SAC settings) is stored in
    `config.json`; resuming with different settings is refused, a larger budget is not.
    """

    def __init__(
        self,
        family: str,
        run_dir: Path,
        *,
        seed: int,
        budget: int,
        target_return: float | None,
        eval_every: int,
        eval_episodes: int,
        learning_starts: int,
        checkpoint_every: int,
        max_episode_steps: int = LOCOMOTION_LIMIT,
        progress: bool = True,
        on_step: Callable[[str, int], None] | None = None,
    ):
        if budget < 1 or eval_every < 1 or eval_episodes < 1 or checkpoint_every < 1:
            raise UserError(
                "SAC settings: budget, eval_every, eval_episodes and checkpoint_every must be "
                f"positive (got {budget}, {eval_every}, {eval_episodes}, {checkpoint_every})."
            )
        self.family, self.run_dir, self.seed, self.budget = family, Path(run_dir), seed, budget
        self.config = dict(
            family=family,
            seed=seed,
            target_return=target_return,
            eval_every=eval_every,
            eval_episodes=eval_episodes,
            learning_starts=learning_starts,
            max_episode_steps=max_episode_steps,
            sac=SAC_KWARGS,
        )
        self.checkpoint_every = checkpoint_every
        self.progress, self.on_step = progress, on_step

    @property
    def _buffer_size(self) -> int:
        # the budget is checked at episode ends, so a run may pass it by one episode
        return self.budget + self.config["max_episode_steps"]

    # -- checkpoint files ---------------------------------------------------------------
    @property
    def ckpt(self) -> Path:
        return self.run_dir / "checkpoint"

    def _existing_ckpt(self) -> Path | None:
        """The last complete checkpoint (a stop between the two renames leaves `-old`)."""
        for path in (self.ckpt, self.run_dir / "checkpoint-old"):
            if (path / "state.pkl").exists():
                return path
        return None

    def _check_config(self) -> None:
        path = self.run_dir / "config.json"
        stored = json.loads(path.read_text()) if path.exists() else None
        mine = json.loads(json.dumps(self.config))
        if stored is not None and stored != mine:
            diff = {k: (stored.get(k), mine.get(k)) for k in mine if stored.get(k) != mine.get(k)}
            raise UserError(
                f"SAC run {self.run_dir} was started with other settings {diff} (stored, asked): "
                "use the same settings, another --work-dir, or delete that directory."
            )
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(mine, indent=1, sort_keys=True))

    def _save(self, model, state: dict) -> None:
        """Write model + replay buffer + loop state into a new dir, then swap it into place."""
        new = self.run_dir / "checkpoint-new"
        shutil.rmtree(new, ignore_errors=True)
        new.mkdir()
        model.save(new / "model.zip")
        model.save_replay_buffer(new / "buffer.pkl")
        state = dict(
            state,
            torch_rng=torch.get_rng_state(),
            np_rng=np.random.get_state(),  # noqa: NPY002 (SB3 samples with it)
        )
        with open(new / "state.pkl", "wb") as f:
            pickle.dump(state, f)
        old = self.run_dir / "checkpoint-old"
        shutil.rmtree(old, ignore_errors=True)
        if self.ckpt.exists():
            os.replace(self.ckpt, old)
        os.replace(new, self.ckpt)
        shutil.rmtree(old, ignore_errors=True)

    def _load(self, path: Path, env):
        from stable_baselines3 import SAC

        model = SAC.load(path / "model.zip", env=env, device="cpu")
        model.load_replay_buffer(path / "buffer.pkl")
        with open(path / "state.pkl", "rb") as f:
            state = pickle.load(f)
        # SAC.load re-seeds the global generators; the run continues from the saved ones.
        torch.set_rng_state(state.pop("torch_rng"))
        np.random.set_state(state.pop("np_rng"))  # noqa: NPY002
        return model, state

    def _new(self, env):
        from stable_baselines3 import SAC

        model = SAC(
            "MlpPolicy",
            env,
            buffer_size=self._buffer_size,  # never wraps: the run is kept for medium-replay
            learning_starts=self.config["learning_starts"],
            seed=_stream_seed(self.seed, "sac"),
            device="cpu",
            verbose=0,
            **SAC_KWARGS,
        )
        state = dict(
            steps=0,
            episodes=0,
            explore_rng=np.random.default_rng(_stream_seed(self.seed, "sac")),
            evals=[],  # (steps, mean return)
            episode_returns=[],
            done=False,
            stop_reason=None,
        )
        return model, state

    def load_final(self):
        """The finished run's model and state (the run must be done)."""
        path = self._existing_ckpt()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            env = make_locomotion_env(self.family)
            model, state = self._load(path, env)
        return model, state

    # -- training -------------------------------------------------------------------------
    def evaluate(self, model, index: int) -> float:
        """Mean return of `eval_episodes` deterministic episodes (seeds from the eval index)."""
        n = self.config["eval_episodes"]
        envs = [make_locomotion_env(self.family) for _ in range(n)]
        obs = np.stack(
            [
                env.reset(seed=episode_seed(self.seed, "eval", index * 1000 + k))[0]
                for k, env in enumerate(envs)
            ]
        )
        active, ret = np.ones(n, bool), np.zeros(n)
        t = 0
        while active.any() and t < self.config["max_episode_steps"]:
            act = model.predict(obs, deterministic=True)[0]
            for i in np.flatnonzero(active):
                obs[i], r, term, trunc, _ = envs[i].step(act[i])
                ret[i] += r
                active[i] = not (term or trunc)
            t += 1
        for env in envs:
            env.close()
        return float(ret.mean())

    def train(self):
        """Train (or resume) to the target or the budget; return (model, state)."""
        from stable_baselines3.common.logger import configure

        self._check_config()
        cfg = self.config
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            env = make_locomotion_env(self.family)
            spaces_env = make_locomotion_env(self.family)
            path = self._existing_ckpt()
            model, state = self._load(path, spaces_env) if path else self._new(spaces_env)
        if state["stop_reason"] == "budget" and state["steps"] < self.budget:
            state["done"], state["stop_reason"] = False, None  # resumed with a larger budget
        if state["done"]:
            env.close()
            return model, state
        _grow_buffer(model.replay_buffer, self._buffer_size)
        model.set_logger(configure(None, []))
        bar = tqdm(
            total=self.budget,
            initial=state["steps"],
            desc=f"SAC {self.run_dir.name}",
            unit="step",
            unit_scale=True,
            disable=not self.progress,
            dynamic_ncols=True,
        )
        last_ckpt, target = state["steps"], cfg["target_return"]
        low, high = env.action_space.low, env.action_space.high
        while not state["done"]:
            # one episode; checkpoints and evaluations fall between episodes
            obs, _ = env.reset(seed=episode_seed(self.seed, "sac", state["episodes"]))
            ep_ret, ep_len, end = 0.0, 0, False
            while not end:
                if state["steps"] < cfg["learning_starts"]:
                    action = state["explore_rng"].uniform(low, high).astype(np.float32)
                else:
                    action = model.predict(obs, deterministic=False)[0]
                nxt, reward, terminated, truncated, _ = env.step(action)
                ep_len += 1
                truncated = bool(truncated or ep_len >= cfg["max_episode_steps"])
                end = bool(terminated) or truncated
                model.replay_buffer.add(
                    obs[None],
                    nxt[None],
                    model.policy.scale_action(action)[None],
                    np.array([reward]),
                    np.array([end]),
                    [{"TimeLimit.truncated": truncated and not terminated}],
                )
                obs, ep_ret = nxt, ep_ret + reward
                state["steps"] += 1
                model.num_timesteps = state["steps"]
                if state["steps"] > cfg["learning_starts"]:
                    model.train(gradient_steps=1, batch_size=SAC_KWARGS["batch_size"])
                bar.update(1)
                if self.on_step is not None:
                    self.on_step(self.run_dir.name, state["steps"])
            state["episodes"] += 1
            state["episode_returns"].append(ep_ret)
            n_evals = len(state["evals"])
            if state["steps"] >= (n_evals + 1) * cfg["eval_every"]:
                state["evals"].append((state["steps"], self.evaluate(model, n_evals)))
                if target is not None and state["evals"][-1][1] >= target:
                    state["done"], state["stop_reason"] = True, "target"
            if state["steps"] >= self.budget and not state["done"]:
                state["done"], state["stop_reason"] = True, "budget"
            postfix = {"ret": f"{ep_ret:.0f}"}
            if state["evals"]:
                # the medium run ends at its target, long before the budget the bar counts to
                shown = f"{state['evals'][-1][1]:.0f}"
                postfix["eval"] = shown if target is None else f"{shown}/{target:.0f}"
            bar.set_postfix(postfix)
            if state["done"] or state["steps"] - last_ckpt >= self.checkpoint_every:
                self._save(model, state)
                last_ckpt = state["steps"]
        bar.close()
        env.close()
        if state["stop_reason"] == "budget" and target is not None:
            raise UserError(
                f"SAC run {self.run_dir} used its budget of {self.budget} steps without an "
                f"evaluation return of {target} (last {state['evals'][-1:]}); resume with a "
                "larger --sac-steps (it continues from its checkpoint) or a lower --target-return."
            )
        return model, state


# ---------------------------------------------------------------------------------------------
# the generator


def generate(
    name: str,
    *,
    steps: int | None = None,
    seed: int = 0,
    work_dir: str | os.PathLike = Path("data") / "work" / "locomotion",
    sac_steps: int = 1_000_000,
    expert_sac_steps: int = 1_000_000,
    target_return: float | None = None,
    eval_every: int = 5000,
    eval_episodes: int = 5,
    learning_starts: int = 10_000,
    checkpoint_every: int = 20_000,
    n_envs: int = 8,
    deterministic: bool = False,
    max_episode_steps: int = LOCOMOTION_LIMIT,
    progress: bool = True,
    on_step: Callable[[str, int], None] | None = None,
) -> GeneratedDataset:
    """Generate a `<family>-<kind>-v2` dataset by D4RL's protocol (see the module docstring).

    steps: dataset size (default D4RL's 1M; medium-expert holds `steps` of each part;
        medium-replay ignores it: it is the replay buffer as it is).
    work_dir: where the SAC runs keep their checkpoints (a stopped generation resumes there).
    sac_steps: the medium run's budget of env steps; it stops earlier at `target_return`
        (default a third of D4RL's expert reference return).
    expert_sac_steps: the expert run's budget (it trains all of it).
    eval_every, eval_episodes: the medium run's evaluation cadence and size.
    learning_starts: uniform-action steps before SAC's first update.
    n_envs: environments stepped side by side in the rollouts.
    deterministic: roll out the SAC policies' mean actions instead of sampling them.
    max_episode_steps: episode cap below the 1000-step time limit (for tests).
    on_step: called with (run name, env steps) after each SAC step (tests stop runs with it).
    """
    family, kind = parse_name(name)
    steps = D4RL_STEPS.get(kind, 1_000_000) if steps is None else int(steps)
    if steps < 1:
        raise UserError(f"Dataset size {steps}: expected a positive number of steps.")
    if not 1 <= max_episode_steps <= LOCOMOTION_LIMIT:
        raise UserError(f"max_episode_steps {max_episode_steps}: expected 1..{LOCOMOTION_LIMIT}.")
    ref_min, ref_max = _ref_scores(family)
    if target_return is None:
        target_return = ref_max / 3.0
    work_dir = Path(work_dir)
    common = dict(
        seed=seed,
        eval_every=eval_every,
        eval_episodes=eval_episodes,
        learning_starts=learning_starts,
        checkpoint_every=checkpoint_every,
        max_episode_steps=max_episode_steps,
        progress=progress,
        on_step=on_step,
    )
    roll = dict(n_envs=n_envs, max_episode_steps=max_episode_steps, progress=progress)
    meta: dict = dict(family=family, kind=kind, seed=seed, protocol="D4RL", env="-v4")

    def sac_run(level: str, budget: int, target: float | None) -> tuple[object, dict]:
        """Train (or resume) the `level` SAC run under `work_dir`."""
        run = SACRun(
            family,
            work_dir / f"sac-{level}-seed{seed}",
            budget=budget,
            target_return=target,
            **common,
        )
        return run.train()

    def last_eval(state: dict):
        return state["evals"][-1] if state["evals"] else None

    def medium_run() -> tuple[object, dict]:
        model, state = sac_run("medium", sac_steps, target_return)
        meta["medium_sac"] = dict(
            sac_steps=state["steps"],
            episodes=state["episodes"],
            target_return=target_return,
            last_eval=last_eval(state),
        )
        return model, state

    def expert_run():
        model, state = sac_run("expert", expert_sac_steps, None)
        meta["expert_sac"] = dict(sac_steps=state["steps"], last_eval=last_eval(state))
        return model

    def sac_rollout(model, stream: str) -> dict[str, np.ndarray]:
        torch.manual_seed(_stream_seed(seed, stream))
        return rollout(family, sac_policy(model, deterministic), steps, seed, stream, **roll)

    if kind == "random":
        arrays = rollout(family, random_policy(family, seed), steps, seed, "random", **roll)
        algorithm = "uniform random actions"
    elif kind == "medium":
        arrays = sac_rollout(medium_run()[0], "medium")
        algorithm = "stable-baselines3 SAC, stopped at a third of expert return"
    elif kind == "medium-replay":
        model, _ = medium_run()
        arrays = replay_arrays(model.replay_buffer)
        algorithm = "stable-baselines3 SAC replay buffer up to the medium policy"
    elif kind == "expert":
        arrays = sac_rollout(expert_run(), "expert")
        algorithm = f"stable-baselines3 SAC, {expert_sac_steps} steps"
    else:  # medium-expert
        medium = sac_rollout(medium_run()[0], "medium")
        expert = sac_rollout(expert_run(), "expert")
        arrays = {k: np.concatenate([medium[k], expert[k]]) for k in medium}
        algorithm = "stable-baselines3 SAC: medium then expert rollouts"
    # no wall time in the metadata: one seed, one dataset, the same bytes (the summary says it)
    return GeneratedDataset(
        name=name,
        arrays=arrays,
        env_id=name,
        ref_min_score=ref_min,
        ref_max_score=ref_max,
        algorithm_name=algorithm,
        metadata=meta,
    )


def _grow_buffer(buffer, size: int) -> None:
    """Enlarge an SB3 replay buffer that has not wrapped to `size` steps (a larger budget)."""
    if buffer.buffer_size >= size:
        return
    for key in ("observations", "next_observations", "actions", "rewards", "dones", "timeouts"):
        old = getattr(buffer, key)
        new = np.zeros((size, *old.shape[1:]), dtype=old.dtype)
        new[: buffer.buffer_size] = old
        setattr(buffer, key, new)
    if buffer.full:  # exactly full (runs never add more than their buffer holds)
        buffer.pos, buffer.full = buffer.buffer_size, False
    buffer.buffer_size = size


def replay_arrays(buffer) -> dict[str, np.ndarray]:
    """D4RL's arrays from an SB3 replay buffer that never wrapped: its transitions in order.

    `dones` holds terminations and time-limit cuts alike; `timeouts` marks the latter.
    """
    if buffer.full and buffer.pos != 0:
        raise ValueError("The replay buffer wrapped around: its order is lost; use a larger one.")
    n = buffer.buffer_size if buffer.full else buffer.pos
    dones = buffer.dones[:n, 0] > 0
    timeouts = buffer.timeouts[:n, 0] > 0
    return {
        "observations": buffer.observations[:n, 0].astype(np.float32),
        "actions": buffer.actions[:n, 0].astype(np.float32),  # SAC's box is [-1, 1]: unscaled
        "rewards": buffer.rewards[:n, 0].astype(np.float32),
        "terminals": dones & ~timeouts,
        "timeouts": timeouts,
    }


__all__ = ["FAMILIES", "KINDS", "SACRun", "episode_seed", "generate", "parse_name", "rollout"]

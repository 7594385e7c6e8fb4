"""Q-guided acting (docs/algorithm.md §4), batched over E environments stepped in lockstep.

Each environment's history lives in preallocated tensors (E, max_ep_len + 1, ...) written in
place; a step builds the last-K window of every environment, the N candidate return-to-go
sequences of every environment, runs the actor once on all E x N candidates, scores each
candidate's newest action with the (target) critic and samples one per environment from the
softmax of the scores. Episodes that end are dropped from the batch (`keep`).

Randomness comes from one torch.Generator per episode, seeded by the episode's seed, drawn in a
fixed order (noise candidates, newest-return noise, the pick): an episode's actions do not
depend on which other episodes share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from qt.tasks import get_task

NOISE_STD = 0.1  # docs/algorithm.md §4 step 2


def candidate_rtg(
    target_rtg: torch.Tensor,
    noise_rtg: torch.Tensor,
    newest_noise: torch.Tensor,
    num_candidates: int,
) -> torch.Tensor:
    """Steps 1-2 of docs/algorithm.md §4 for one batch of windows.

    Args:
        target_rtg: (E, M, K) each target's return-to-go window.
        noise_rtg: (E, N - M * (N // M), K) standard-normal return-to-go windows.
        newest_noise: (E, N - M) standard-normal draws for the newest return-to-go of
            candidates M..N-1.

    Returns:
        (E, N, K): target m repeated N // M times consecutively, then the noise candidates;
        candidates M.. get `0.1 * newest_noise` added to their newest entry.
    """
    E, M, K = target_rtg.shape
    copies = num_candidates // M
    rtg = torch.cat([target_rtg.repeat_interleave(copies, dim=1), noise_rtg], dim=1)
    newest = rtg[:, M:, -1] + NOISE_STD * newest_noise
    return torch.cat([rtg[:, :M], torch.cat([rtg[:, M:, :-1], newest[..., None]], -1)], dim=1)


class QTPolicy:
    """Acts for E environments at once with an actor and a critic (docs/algorithm.md §4).

    Args:
        actor: a `QTActor` (its eval mode is the caller's business).
        critic: the critic that scores actions: the target critic (docs/algorithm.md §4); `q_min` used.
        state_mean, state_std: (S,) the dataset's state statistics.
        scale: return scale; env_targets: conditioning targets in raw return units.
        K: context length; max_ep_len: longest episode (history size, timestep range).
        num_candidates: N, 50 in the paper.
        rtg_no_q: no Q-value return-to-go candidate; infer_no_q: act with candidate 0.
        device: where the histories live (default: the actor's device).
        share_prefix: run the older K-1 timesteps once per distinct return-to-go history
            instead of once per candidate (`QTActor.newest_actions`; same actions, up to
            float rounding, at a fraction of the cost). Needs an actor in eval mode, no `sar`.
    """

    def __init__(
        self,
        actor: nn.Module,
        critic: nn.Module,
        *,
        state_mean: Sequence[float] | torch.Tensor,
        state_std: Sequence[float] | torch.Tensor,
        scale: float,
        env_targets: Sequence[float],
        K: int,
        max_ep_len: int,
        num_candidates: int = 50,
        rtg_no_q: bool = False,
        infer_no_q: bool = False,
        device: torch.device | str | None = None,
        share_prefix: bool = True,
    ) -> None:
        if len(env_targets) < 1:
            raise ValueError("QTPolicy needs at least one conditioning target in env_targets.")
        if num_candidates < len(env_targets):
            raise ValueError(
                f"num_candidates={num_candidates}: expected at least one per target "
                f"({len(env_targets)} targets)."
            )
        self.actor, self.critic = actor, critic
        self.device = (
            torch.device(device) if device is not None else next(actor.parameters()).device
        )
        self.state_mean = torch.as_tensor(state_mean, dtype=torch.float32, device=self.device)
        self.state_std = torch.as_tensor(state_std, dtype=torch.float32, device=self.device)
        self.scale = float(scale)
        self.targets = [float(t) / self.scale for t in env_targets]  # as the reference divides
        self.K, self.max_ep_len, self.N = K, max_ep_len, num_candidates
        self.rtg_no_q, self.infer_no_q = rtg_no_q, infer_no_q
        self.share_prefix = share_prefix
        self.state_dim = self.state_mean.numel()
        self.act_dim = actor.act_dim
        self.t = 0
        self.generators: list[torch.Generator] = []

    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        task: str,
        max_ep_len: int | None = None,
        device: torch.device | str | None = None,
    ) -> QTPolicy:
        """The policy a `QTModule` acts with: its actor, its target critic (docs/algorithm.md
        §4), its data's statistics and its hyperparameters. A module built without the data's
        facts (no `env_targets`) acts with the registry's targets of `task`; `max_ep_len`, when
        given, replaces the module's (a shorter evaluation)."""
        hp = module.hparams
        return cls(
            module.actor,
            module.critic_target,
            state_mean=module.state_mean,
            state_std=module.state_std,
            scale=hp.scale,
            env_targets=list(hp.env_targets or get_task(task).env_targets),
            K=hp.K,
            max_ep_len=max_ep_len or hp.max_ep_len,
            num_candidates=hp.num_candidates,
            rtg_no_q=hp.rtg_no_q,
            infer_no_q=hp.infer_no_q,
            device=device,
        )

    # ------------------------------------------------------------------ episode bookkeeping
    def reset(self, observations: np.ndarray | torch.Tensor, seeds: Sequence[int]) -> None:
        """Start len(seeds) episodes at their first observations (E, S)."""
        obs = torch.as_tensor(np.asarray(observations), dtype=torch.float32, device=self.device)
        E, H, M = obs.shape[0], self.max_ep_len + 1, len(self.targets)
        if len(seeds) != E:
            raise ValueError(
                f"reset got {E} observations and {len(seeds)} seeds: expected one each."
            )
        dev = self.device
        self.states = torch.zeros(E, H, self.state_dim, device=dev)
        self.actions = torch.zeros(E, H, self.act_dim, device=dev)
        self.rewards = torch.zeros(E, H, device=dev)
        self.rtg = torch.zeros(E, M, H, device=dev)
        self.rtg[:, :, 0] = torch.tensor(self.targets, dtype=torch.float32, device=dev)
        self.states[:, 0] = self._normalise(obs)
        self.t = 0
        self.generators = [torch.Generator(device="cpu").manual_seed(int(s) % 2**63) for s in seeds]

    def _normalise(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.state_mean) / self.state_std

    def keep(self, rows: torch.Tensor | np.ndarray | Sequence[int]) -> None:
        """Keep only these episodes (indices into the current batch), in this order."""
        idx = torch.as_tensor(np.asarray(rows, dtype=np.int64), device=self.device)
        self.states, self.actions = self.states[idx], self.actions[idx]
        self.rewards, self.rtg = self.rewards[idx], self.rtg[idx]
        self.generators = [self.generators[int(i)] for i in idx.tolist()]

    def observe(
        self,
        actions: torch.Tensor | np.ndarray,
        rewards: np.ndarray | Sequence[float],
        next_observations: np.ndarray | torch.Tensor,
    ) -> None:
        """Record step t's actions and rewards and step t+1's observations."""
        t = self.t
        if t + 1 > self.max_ep_len:
            raise ValueError(f"episodes are longer than max_ep_len={self.max_ep_len}.")
        rewards = np.asarray(rewards, dtype=np.float64)
        self.actions[:, t] = torch.as_tensor(actions, dtype=torch.float32, device=self.device)
        self.rewards[:, t] = torch.as_tensor(rewards, dtype=torch.float32, device=self.device)
        # R_{t+1} = R_t - r_t / scale: the quotient in double, the subtraction in float32
        step = torch.as_tensor(rewards / self.scale, dtype=torch.float32, device=self.device)
        self.rtg[:, :, t + 1] = self.rtg[:, :, t] - step[:, None]
        obs = torch.as_tensor(
            np.asarray(next_observations), dtype=torch.float32, device=self.device
        )
        self.states[:, t + 1] = self._normalise(obs)
        self.t = t + 1

    # ------------------------------------------------------------------ acting
    def window(self) -> dict[str, torch.Tensor]:
        """The last-K window of every episode, left-padded with zeros (docs/algorithm.md §4)."""
        t, K = self.t, self.K
        L = min(t + 1, K)
        E = self.states.shape[0]
        lo = t + 1 - L
        pad = K - L

        def padded(x: torch.Tensor) -> torch.Tensor:  # (E, ..., H) -> (E, ..., K) on dim -1
            out = x.new_zeros((*x.shape[:-1], K))
            out[..., pad:] = x[..., lo : t + 1]
            return out

        states = self.states.new_zeros(E, K, self.state_dim)
        states[:, pad:] = self.states[:, lo : t + 1]
        actions = self.actions.new_zeros(E, K, self.act_dim)
        actions[:, pad:] = self.actions[:, lo : t + 1]  # entry t is still the zero placeholder
        timesteps = torch.zeros(K, dtype=torch.long, device=self.device)
        timesteps[pad:] = torch.arange(lo, t + 1, device=self.device)
        mask = torch.zeros(K, dtype=torch.long, device=self.device)
        mask[pad:] = 1
        return {
            "states": states,
            "actions": actions,
            "rewards": padded(self.rewards),  # (E, K), entry t is the zero placeholder
            "target_rtg": padded(self.rtg),  # (E, M, K)
            "timesteps": timesteps,
            "mask": mask,
        }

    def _draws(self, M: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-episode noise: return-to-go noise candidates (E, n, L) and newest noise (E, N-M)."""
        n_noise = self.N - M * (self.N // M)
        noise, newest = [], []
        for g in self.generators:
            noise.append(torch.randn(n_noise, L, generator=g))
            newest.append(torch.randn(self.N - M, generator=g))
        return torch.stack(noise).to(self.device), torch.stack(newest).to(self.device)

    @torch.no_grad()
    def candidates(self, window: dict[str, torch.Tensor]) -> torch.Tensor:
        """The (E, N, K) return-to-go windows of docs/algorithm.md §4 steps 1-3."""
        return self._candidates(window)[0]

    def _candidates(self, window):
        """Candidates (E, N, K), the distinct histories they extend (E, U, K), and which (N,)."""
        target_rtg = window["target_rtg"]
        E, M, K = target_rtg.shape
        L = int(window["mask"].sum())
        noise, newest = self._draws(M, L)
        noise_rtg = target_rtg.new_zeros(E, noise.shape[1], K)
        noise_rtg[..., K - L :] = noise
        rtg = candidate_rtg(target_rtg, noise_rtg, newest, self.N)
        if not self.rtg_no_q and K >= 2:
            # the previous step's Q-value, less its reward, as the last candidate's newest R
            q_prev = self.critic.q_min(window["states"][:, -2], window["actions"][:, -2])[:, 0]
            rtg[:, -1, -1] = q_prev - window["rewards"][:, -2] / self.scale
        copies = self.N // M
        group_of = torch.cat(
            [torch.arange(M).repeat_interleave(copies), M + torch.arange(noise.shape[1])]
        ).to(self.device)
        return rtg, torch.cat([target_rtg, noise_rtg], dim=1), group_of

    def _all_candidates(self, win, rtg: torch.Tensor) -> torch.Tensor:
        """Every candidate's newest action (E, N, A), one full window per candidate."""
        E, N, K = rtg.shape

        def rep(x: torch.Tensor) -> torch.Tensor:  # (E, K, ...) -> (E * N, K, ...)
            return x[:, None].expand(E, N, *x.shape[1:]).reshape(E * N, *x.shape[1:])

        out = self.actor(
            rep(win["states"]),
            rep(win["actions"]),
            rep(win["rewards"][..., None]),
            rtg.reshape(E * N, K, 1),
            win["timesteps"].expand(E * N, K),
            win["mask"].expand(E * N, K),
        )
        return out.action_preds[:, -1].reshape(E, N, self.act_dim)

    @torch.no_grad()
    def act(self) -> np.ndarray:
        """Actions (E, A) for the current step of every episode in the batch."""
        win = self.window()
        rtg, group_rtg, group_of = self._candidates(win)  # (E, N, K), (E, U, K), (N,)
        E, N, K = rtg.shape
        if self.infer_no_q:
            # Candidate 0 is the first target's own history (no noise, never the Q candidate),
            # so its action needs that one window; the draws above keep the streams in step.
            return self._all_candidates(win, rtg[:, :1])[:, 0].float().cpu().numpy()
        shared = self.share_prefix and K >= 2 and not self.actor.sar and not self.actor.training
        if shared:
            preds = self.actor.newest_actions(
                win["states"],
                win["actions"],
                group_rtg,
                rtg[:, :, -1],
                group_of,
                win["timesteps"],
                win["mask"],
            )
        else:
            preds = self._all_candidates(win, rtg)
        last_state = win["states"][:, -1][:, None].expand(E, N, self.state_dim)
        q = self.critic.q_min(last_state, preds)[..., 0]  # (E, N)
        probs = torch.softmax(q.float(), dim=-1).cpu()
        idx = torch.cat(
            [torch.multinomial(probs[e], 1, generator=g) for e, g in enumerate(self.generators)]
        )
        chosen = preds[torch.arange(E, device=preds.device), idx.to(preds.device)]
        return chosen.float().cpu().numpy()


__all__ = ["NOISE_STD", "QTPolicy", "candidate_rtg"]

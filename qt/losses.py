"""QT's losses and critic targets as pure functions of tensors (docs/algorithm.md §3).

Owns the maths of one training step; `QTModule.training_step` wires it to the
networks. Notation: B batch, K window, R repetitions (`max_q_backup`), γ discount.
All inputs are left-padded windows as in `qt.data.batch.Segments`; `mask` (B, K) is
1 on data. Masked means are sums over the masked elements divided by their count
(what the reference's `F.mse_loss` on boolean-indexed tensors computes), written
without boolean indexing so that no host-device synchronisation happens. When no
element is selected the reference gives NaN; these functions give 0.

Order of use in one step (the reference's):
    1. `repeat_for_max_q_backup` (only with max_q_backup) -> EMA actor -> a'.
    2. target critic on (s, a') -> `bootstrap_q` -> q'.
    3. `k_step_targets` / `k_step_targets_rtg` / `one_step_targets` -> targets; the
       discounted k-step variant also returns the rewards with rewards[:, K-1] = 0,
       which the reference then feeds to the actor and to the `sar` reward loss.
    4. `critic_loss`; then, for the actor, `bc_loss` and `q_loss` (`coin_flip`).
"""

from __future__ import annotations

import math

import torch

from qt.data.batch import Segments


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of x over the elements where mask is 1, trailing dims included.

    x (B, K, *rest), mask (B, K): sum(mask * x) / (sum(mask) * prod(rest)); 0 when
    the mask is empty.
    """
    m = mask.to(x.dtype).reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    per_position = math.prod(x.shape[mask.dim() :])
    count = (m.sum() * per_position).clamp(min=1.0)
    return (x * m).sum() / count


# ----------------------------------------------------------------------------- targets


def repeat_for_max_q_backup(
    batch: Segments,
    repeats: int = 10,
    noise_std: float = 0.1,
    generator: torch.Generator | None = None,
) -> Segments:
    """Each sample repeated `repeats` times in a row, with noisy last input return-to-go.

    Row b*R + r is sample b, repetition r. rtg[:, K-1] (the last return-to-go the
    actor sees; rtg has K+1 entries) of repetition r gets `noise_std * n_r` with
    n_0 = 0 and n_1..n_{R-1} ~ N(0, 1). As in the reference, the R-1 noise values are
    drawn once and shared by every sample of the batch. They are drawn on the
    generator's device (CPU by default) and moved to the batch's device.

    Returns:
        Segments of batch size B*R (rtg (B*R, K+1, 1)); the input is not modified.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats}.")
    rep = Segments(*(t.repeat_interleave(repeats, dim=0) for t in batch))
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(repeats - 1, generator=generator, device=gen_device, dtype=batch.rtg.dtype)
    noise = torch.cat([noise.new_zeros(1), noise]).to(batch.rtg.device)  # (R,)
    K = batch.rtg.shape[1] - 1
    rtg = rep.rtg.clone()
    rtg[:, K - 1, 0] += noise_std * noise.repeat(batch.rtg.shape[0])  # row b*R + r gets noise[r]
    return rep._replace(rtg=rtg)


def bootstrap_q(q1: torch.Tensor, q2: torch.Tensor, repeats: int = 1) -> torch.Tensor:
    """Target critic values -> bootstrap value: max over repetitions, then min over twins.

    q' = min(max_r Q1'(b, r), max_r Q2'(b, r)). q1, q2 (B*R, ...) with row b*R + r
    as made by `repeat_for_max_q_backup`; returns (B, ...). With repeats = 1 this is
    min(Q1', Q2').
    """
    if repeats > 1:
        q1 = q1.unflatten(0, (-1, repeats)).amax(dim=1)
        q2 = q2.unflatten(0, (-1, repeats)).amax(dim=1)
    return torch.minimum(q1, q2)


def k_step_targets(
    rewards: torch.Tensor,
    dones: torch.Tensor,
    mask: torch.Tensor,
    q_next: torch.Tensor,
    discount: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Discounted k-step targets bootstrapped at the window's last step (k_rewards, use_discount).

    With rewards[:, K-1] set to 0 and not_done = 1 - dones[:, K-1], for every valid
    position t:

        target[t] = sum_{j=t}^{K-2} γ^(j-t) rewards[j] + γ^(K-1-t) * not_done * q'

    Args:
        rewards: (B, K, 1), 0 on padding.
        dones: (B, K), 1 on padding.
        mask: (B, K), 1 on data (left padding).
        q_next: (B, 1) bootstrap value q' at the last step (`bootstrap_q`).
        discount: γ.

    Returns:
        targets (B, K, 1), detached; and the rewards with rewards[:, K-1] = 0 (a new
        tensor: the reference zeroes its batch in place, so its actor forward and
        its `sar` reward loss see these). At padded positions the targets are the
        reference's (sum_{j>=o} γ^(j-o) rewards[j] + not_done * q', o the first valid
        position); the critic loss masks them, only a logged mean sees them.
    """
    B, K = mask.shape
    rewards = rewards.clone()
    rewards[:, K - 1] = 0.0
    # The reference's arithmetic, vectorised: weight γ^(j-o) on rewards[j], reverse
    # cumulative sum, divide by γ^(t-o); exponents are 0 on padding.
    length = mask.sum(dim=1, keepdim=True)  # (B, 1) valid steps L; o = K - L
    pos = torch.arange(K, device=mask.device, dtype=length.dtype)  # (K,)
    valid = pos >= K - length  # (B, K)
    from_first = torch.where(valid, pos - (K - length), 0.0).to(torch.float32)  # t - o
    to_last = torch.where(valid, K - 1 - pos, 0.0).to(torch.float32)  # K-1-t
    w = (discount**from_first).unsqueeze(-1)  # (B, K, 1)
    k_rewards = torch.cumsum((rewards * w).flip(1), dim=1).flip(1) / w
    not_done = 1.0 - dones[:, K - 1 : K]  # (B, 1)
    targets = k_rewards + (not_done * discount**to_last * q_next).unsqueeze(-1)
    return targets.detach(), rewards


def k_step_targets_rtg(
    rtg: torch.Tensor, dones: torch.Tensor, q_next: torch.Tensor, scale: float
) -> torch.Tensor:
    """Undiscounted k-step targets from returns-to-go (k_rewards without use_discount).

        target[t] = (rtg[t] - rtg[K-1]) * scale + not_done * q',  not_done = 1 - dones[:, K-1]

    rtg (B, K+1, 1) divided by scale, dones (B, K), q_next (B, 1) -> (B, K, 1), detached.
    """
    K = dones.shape[1]
    not_done = 1.0 - dones[:, K - 1 : K]  # (B, 1)
    k_rewards = (rtg[:, :K] - rtg[:, K - 1 : K]) * scale
    return (k_rewards + (not_done * q_next).unsqueeze(-1)).detach()


def one_step_targets(rewards: torch.Tensor, q_next: torch.Tensor, discount: float) -> torch.Tensor:
    """One-step targets (k_rewards off): no done mask, as in the reference.

        target[t] = rewards[t] + γ * q'[t+1] for t < K-1,   target[K-1] = 0

    rewards (B, K, 1); q_next (B, K, 1) = min over twins of the target critic at
    (states[t], a'[t]) (`bootstrap_q`) -> (B, K, 1), detached.
    """
    targets = rewards[:, :-1] + discount * q_next[:, 1:]
    return torch.cat([targets, torch.zeros_like(targets[:, :1])], dim=1).detach()


def critic_targets(
    batch: Segments,
    q_next: torch.Tensor,
    *,
    discount: float,
    scale: float,
    k_rewards: bool = True,
    use_discount: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch to the target variant of docs/algorithm.md §3.1.

    q_next is (B, 1) (at the last step) with k_rewards, else (B, K, 1) (every step).
    Returns (targets (B, K, 1), rewards the actor step must use (B, K, 1)): the
    zeroed copy from `k_step_targets` with k_rewards and use_discount, else
    batch.rewards itself.
    """
    if k_rewards and use_discount:
        return k_step_targets(batch.rewards, batch.dones, batch.mask, q_next, discount)
    if k_rewards:
        return k_step_targets_rtg(batch.rtg, batch.dones, q_next, scale), batch.rewards
    return one_step_targets(batch.rewards, q_next, discount), batch.rewards


# ----------------------------------------------------------------------------- losses


def critic_loss(
    q1: torch.Tensor, q2: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """MSE(q1, target) + MSE(q2, target) over positions t < K-1 with mask[t] = 1.

    q1, q2, targets (B, K, 1); mask (B, K). The last position never counts. Targets
    are detached here too.
    """
    m = mask[:, :-1]
    t = targets[:, :-1].detach()
    return masked_mean((q1[:, :-1] - t) ** 2, m) + masked_mean((q2[:, :-1] - t) ** 2, m)


def bc_loss(
    action_preds: torch.Tensor,
    actions: torch.Tensor,
    state_preds: torch.Tensor,
    states: torch.Tensor,
    mask: torch.Tensor,
    reward_preds: torch.Tensor | None = None,
    rewards: torch.Tensor | None = None,
    scale: float = 1.0,
    next_state: bool = True,
) -> torch.Tensor:
    """Behaviour cloning loss with the next-state (and, with `sar`, reward) terms.

        MSE(action_preds, actions) over valid positions (mean over positions x A)
      + MSE(state_preds[:, :K-1], states[:, 1:]) over mask[:, :K-1] (mean over positions x S)
      + MSE(reward_preds, rewards / scale) over valid positions   (only when reward_preds given)

    `next_state=False` leaves the next-state term out: the Decision Transformer's loss, the
    action term alone (docs/baselines.md); `state_preds` then receives no gradient.

    With k_rewards and use_discount, pass the rewards returned by `k_step_targets`
    (rewards[:, K-1] = 0), as the reference does.
    Shapes: action_preds, actions (B, K, A); state_preds, states (B, K, S);
    reward_preds, rewards (B, K, 1); mask (B, K).
    """
    loss = masked_mean((action_preds - actions) ** 2, mask)
    if next_state:
        loss = loss + masked_mean((state_preds[:, :-1] - states[:, 1:]) ** 2, mask[:, :-1])
    if reward_preds is not None:
        if rewards is None:
            raise ValueError("bc_loss got reward_preds but no rewards to compare them with.")
        loss = loss + masked_mean((reward_preds - rewards / scale) ** 2, mask)
    return loss


def q_loss(q1: torch.Tensor, q2: torch.Tensor, mask: torch.Tensor, use_q1: bool) -> torch.Tensor:
    """The normalised Q term on the actor's actions at valid positions.

        use_q1:      -mean(Q1) / mean(|Q2|).detach()
        otherwise:   -mean(Q2) / mean(|Q1|).detach()

    q1, q2 (B, K, 1) = critic(states, action_preds); mask (B, K). The reference picks
    the branch with probability 0.5 per step (`coin_flip`).
    """
    num, den = (q1, q2) if use_q1 else (q2, q1)
    return -masked_mean(num, mask) / masked_mean(den.abs(), mask).detach()


def coin_flip(generator: torch.Generator | None = None) -> bool:
    """True with probability 0.5 (the reference's `np.random.uniform() > 0.5`).

    Drawn on the CPU (pass a CPU generator), so it never synchronises with a GPU.
    """
    return bool(torch.rand((), generator=generator) > 0.5)

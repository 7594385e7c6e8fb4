"""The QT actor: a Decision Transformer over (R_t, s_t, a_t) tokens (docs/algorithm.md §2).

Owns the token layout (interleaving, timestep embedding, `embed_ln`), the heads and
which hidden state each head reads, and a converter from the authors' checkpoints.

Token layout per timestep t (3 tokens, 3T in all, interleaved in this order):
    default: (R_t, s_t, a_t)  action <- h(s_t), next state <- h(a_t)
    sar:     (s_t, a_t, r_t)  action <- h(s_t), reward <- h(a_t), next state <- h(r_t)
These are the reference's heads exactly (in `sar` mode its state head reads the
reward token). The reward token embeds `rewards / scale`, as the reference does.

Unlike the reference, modules a mode never uses are not created (`embed_return` in
`sar` mode; `embed_rewards` and `predict_rewards` without it; GPT-2's vocabulary
embedding `wte`): parameters without gradients would break DDP, and they change no
output. `from_reference_state_dict` drops them when loading the authors' weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from qt.models.transformer import CausalTransformer


class ActorOutput(NamedTuple):
    """Predictions at every timestep of the input window.

    state_preds   (B, T, S) next-state prediction
    action_preds  (B, T, A) in (-1, 1)
    reward_preds  (B, T, 1) reward / scale prediction with `sar`, else None
    """

    state_preds: torch.Tensor
    action_preds: torch.Tensor
    reward_preds: torch.Tensor | None


class QTActor(nn.Module):
    """Decision Transformer actor of QT.

    Args:
        state_dim: S.
        act_dim: A.
        hidden_size: token width d.
        n_layer: transformer blocks.
        n_head: attention heads.
        K: context length (the longest window `forward` accepts).
        max_ep_len: rows of the timestep embedding (timesteps must be < this).
        dropout: attention and residual dropout.
        sar: use (s, a, r) tokens and a reward head instead of (R, s, a).
        scale: rewards are divided by it before the reward embedding (`sar` only).
        embed_dropout: dropout on the token embeddings (0.1 in the reference, whatever
            `dropout` is).
    """

    def __init__(
        self,
        state_dim: int,
        act_dim: int,
        hidden_size: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        K: int = 20,
        max_ep_len: int = 1000,
        dropout: float = 0.1,
        sar: bool = False,
        scale: float = 1.0,
        embed_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        for name, value in (
            ("state_dim", state_dim),
            ("act_dim", act_dim),
            ("hidden_size", hidden_size),
            ("n_layer", n_layer),
            ("n_head", n_head),
            ("K", K),
            ("max_ep_len", max_ep_len),
        ):
            if value < 1:
                raise ValueError(
                    f"QTActor argument {name} must be a positive integer, got {value}."
                )
        if hidden_size % n_head != 0:
            raise ValueError(
                f"QTActor hidden_size ({hidden_size}) must be divisible by n_head ({n_head})."
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"QTActor dropout must be in [0, 1), got {dropout}.")
        if scale <= 0:
            raise ValueError(f"QTActor scale must be positive, got {scale}.")
        self.state_dim, self.act_dim, self.hidden_size = state_dim, act_dim, hidden_size
        self.K, self.max_ep_len, self.sar, self.scale = K, max_ep_len, sar, float(scale)

        # Creation order follows the reference (trunk, then embeddings, then heads).
        self.transformer = CausalTransformer(hidden_size, n_layer, n_head, dropout, embed_dropout)
        self.embed_timestep = nn.Embedding(max_ep_len, hidden_size)  # N(0, 1), PyTorch default
        if sar:
            self.embed_rewards = nn.Linear(1, hidden_size)
        else:
            self.embed_return = nn.Linear(1, hidden_size)
        self.embed_state = nn.Linear(state_dim, hidden_size)
        self.embed_action = nn.Linear(act_dim, hidden_size)
        self.embed_ln = nn.LayerNorm(hidden_size)
        self.predict_state = nn.Linear(hidden_size, state_dim)
        self.predict_action = nn.Sequential(nn.Linear(hidden_size, act_dim), nn.Tanh())
        if sar:
            self.predict_rewards = nn.Linear(hidden_size, 1)

    def forward(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        rewards: torch.Tensor,
        rtg: torch.Tensor,
        timesteps: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> ActorOutput:
        """Predict actions (and next states, rewards) at every position of a window.

        Args:
            states: (B, T, S) normalised states, T <= K.
            actions: (B, T, A).
            rewards: (B, T, 1) raw rewards (divided by `scale` here; used with `sar`).
            rtg: (B, T, 1) returns-to-go already divided by scale (unused with `sar`).
            timesteps: (B, T) int64 in [0, max_ep_len).
            mask: (B, T), 1 on data and 0 on left padding; None means no padding.

        Returns:
            ActorOutput with state_preds (B, T, S), action_preds (B, T, A) and
            reward_preds (B, T, 1) with `sar`, else None.
        """
        B, T = states.shape[:2]
        assert T <= self.K, f"window length {T} exceeds K={self.K}"
        d = self.hidden_size
        x = self._tokens(states, actions, rewards, rtg, timesteps)

        key_mask = None if mask is None else mask.repeat_interleave(3, dim=1)  # (B, 3T)
        h = self.transformer(x, key_mask).reshape(B, T, 3, d)

        if self.sar:
            action_preds = self.predict_action(h[:, :, 0])
            reward_preds = self.predict_rewards(h[:, :, 1])
            state_preds = self.predict_state(h[:, :, 2])
        else:
            action_preds = self.predict_action(h[:, :, 1])
            state_preds = self.predict_state(h[:, :, 2])
            reward_preds = None
        return ActorOutput(state_preds, action_preds, reward_preds)

    def _tokens(self, states, actions, rewards, rtg, timesteps) -> torch.Tensor:
        """(B, T, ...) inputs -> (B, 3T, d) token embeddings; token 3t+i is modality i of t."""
        B, T = states.shape[:2]
        time_emb = self.embed_timestep(timesteps)  # (B, T, d)
        s_emb = self.embed_state(states)
        a_emb = self.embed_action(actions)
        if self.sar:
            tokens = (s_emb, a_emb, self.embed_rewards(rewards / self.scale))
        else:
            tokens = (self.embed_return(rtg), s_emb, a_emb)
        x = (torch.stack(tokens, dim=2) + time_emb.unsqueeze(2)).reshape(B, 3 * T, -1)
        return self.embed_ln(x)

    @torch.no_grad()
    def newest_actions(
        self,
        states: torch.Tensor,
        actions: torch.Tensor,
        group_rtg: torch.Tensor,
        newest_rtg: torch.Tensor,
        group_of: torch.Tensor,
        timesteps: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """The newest action of many return-to-go candidates that share their history.

        For each of E windows (states (E, K, S), actions (E, K, A), timesteps and mask (K,)),
        candidate c's return-to-go window is group `group_of[c]`'s (`group_rtg`, (E, U, K))
        with its newest entry replaced by `newest_rtg[:, c]` ((E, N)). Equal to
        `forward(...).action_preds[:, -1]` on every candidate's full window, at a fraction of
        the cost: the K-1 older timesteps run once per group, the newest return and state
        tokens once per candidate (they cannot see the newest action token). Eval mode,
        without `sar` (which ignores returns-to-go), K >= 2.
        """
        if self.sar or self.training:
            raise ValueError("newest_actions needs eval mode and an actor without `sar`.")
        E, K = states.shape[:2]
        U, N, d = group_rtg.shape[1], newest_rtg.shape[1], self.hidden_size
        old = K - 1

        def per_group(x: torch.Tensor) -> torch.Tensor:  # (E, old, ...) -> (E * U, old, ...)
            return x[:, None].expand(E, U, *x.shape[1:]).reshape(E * U, *x.shape[1:])

        prefix = self._tokens(
            per_group(states[:, :old]),
            per_group(actions[:, :old]),
            None,
            group_rtg[..., :old].reshape(E * U, old, 1),
            timesteps[:old].expand(E * U, old),
        )
        prefix_mask = mask[:old].repeat_interleave(3).expand(E * U, 3 * old)
        kv = self.transformer.prefix(prefix, prefix_mask)
        # newest return and state tokens of every candidate, at the newest timestep
        t_emb = self.embed_timestep(timesteps[old])  # (d,)
        r_tok = self.embed_return(newest_rtg.reshape(E * N, 1)) + t_emb
        s_tok = (self.embed_state(states[:, old]) + t_emb)[:, None].expand(E, N, d)
        x = self.embed_ln(torch.stack([r_tok, s_tok.reshape(E * N, d)], dim=1))  # (E*N, 2, d)
        rows = (torch.arange(E, device=states.device)[:, None] * U + group_of[None]).reshape(-1)
        h = self.transformer.extend(x, kv, prefix_mask, rows)
        return self.predict_action(h[:, 1]).reshape(E, N, -1)

    def from_reference_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load weights saved by the authors' `DecisionTransformer` (HF GPT-2 trunk).

        Conv1D weights (in, out) are transposed to Linear (out, in); the GPT-2
        buffers, `wte` and the modules this mode does not use are dropped. Raises
        ValueError naming the keys when the state dict does not fit this actor.
        """
        converted: dict[str, torch.Tensor] = {}
        unused = ("embed_return.",) if self.sar else ("embed_rewards.", "predict_rewards.")
        for key, value in state_dict.items():
            if key.startswith(unused) or key == "transformer.wte.weight":
                continue
            if key.endswith((".attn.bias", ".attn.masked_bias")):
                continue  # HF's causal-mask buffers
            if key.startswith("transformer.h.") and key.endswith(
                ("c_attn.weight", "c_proj.weight", "c_fc.weight")
            ):
                value = value.t()
            converted[key] = value
        own = set(self.state_dict())
        missing, unexpected = sorted(own - set(converted)), sorted(set(converted) - own)
        if missing or unexpected:
            raise ValueError(
                "The reference state dict does not fit this QTActor: "
                f"missing {missing}, unexpected {unexpected}."
            )
        self.load_state_dict(converted)

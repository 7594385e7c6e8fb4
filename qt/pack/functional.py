"""QT's networks as functions of stacked parameters: every tensor has a leading member dim N.

`QTActor` and `TwinCritic` written once more, for N members at once: each linear layer is one
batched matmul over the members (`baddbmm` on (N, rows, in) x (N, in, out)), each LayerNorm a
normalisation followed by the member's own scale and shift. Parameters are dicts keyed by the
names of `QTActor.named_parameters()` / `TwinCritic.named_parameters()`, each (N, *shape), so a
member's slice is exactly a separate module's state dict. The maths is the modules' (same
operations, same order), which the packed-against-separate equality tests check.

Dropout here is `member_dropout`: member n's mask at a site comes from its own noise, which does
not depend on which other members share the pack. The noise is one of two kinds:
- drawn (the CPU's): uniforms from a torch generator of the member's own, seeded from its seed,
  step and phase, one draw per member covering every site (`drawn_uniforms`); as cheap as
  torch's own dropout, 5x cheaper than hashing on the CPU;
- hashed (CUDA's): a counter-based integer hash of (the member's key, the site, the element's
  index) (`uniform_bits`), which needs no buffer and compiles into the surrounding
  element-wise kernels, where it costs next to nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qt.models.transformer import causal_padding_bias

Params = dict[str, torch.Tensor]

_M32 = 0xFFFFFFFF
_HASH = 0x45D9F3B  # < 2^31: a product with a 32-bit value stays inside int64
_GOLDEN = 0x9E3779B9


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply) of int64 tensors holding values in [0, 2^32)."""
    x = ((x >> 16) ^ x) * _HASH & _M32
    x = ((x >> 16) ^ x) * _HASH & _M32
    return (x >> 16) ^ x


def uniform_bits(keys: torch.Tensor, site: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Per-member pseudo-random 32-bit values (as int64) of `shape` (N, ...).

    keys (N, 2) int64 in [0, 2^32): member n's value at element j of `site` is
    h((j * a + b) mod 2^32) with a = h(keys[n, 1] ^ site') | 1 (odd, < 2^31) and
    b = h(keys[n, 0] ^ site'): a counter-based stream, a function of (key, site, j) alone.
    Each (member, site) walks the counter with its own stride and offset, so two streams are
    not shifted copies of each other.
    """
    n = shape[0]
    per_member = math.prod(shape[1:])
    idx = torch.arange(per_member, device=keys.device, dtype=torch.int64).view(1, *shape[1:])
    view = (n,) + (1,) * (len(shape) - 1)
    salt = (site * _GOLDEN) & _M32
    offset = _hash32(keys[:, 0] ^ salt).view(view)
    stride = ((_hash32(keys[:, 1] ^ salt) >> 1) | 1).view(view)  # < 2^31: no int64 overflow
    return _hash32((idx * stride + offset) & _M32)


def hashed_dropout(x: torch.Tensor, p: float, keys: torch.Tensor | None, site: int) -> torch.Tensor:
    """Dropout of x (N, ...) with member n's mask from `uniform_bits(keys, site)`.

    Keeps an element when its 32-bit value is >= p * 2^32 (keep probability 1 - p to within
    2^-32) and scales kept ones by 1 / (1 - p), as `F.dropout`. keys None or p 0: identity.
    """
    if keys is None or p == 0.0:
        return x
    return _keep_scaled(x, uniform_bits(keys, site, tuple(x.shape)) >= int(round(p * 2**32)), p)


def _keep_scaled(x: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """x where `keep`, scaled by 1 / (1 - p) as `F.dropout` scales it; 0 elsewhere."""
    return torch.where(keep, x * (1.0 / (1.0 - p)), torch.zeros((), dtype=x.dtype))


Noise = torch.Tensor | dict[int, torch.Tensor] | None


def dropout_sites(
    rows: int, T: int, d: int, *, n_layer: int, n_head: int, dropout: float, embed_dropout: float
) -> dict[int, tuple[int, ...]]:
    """The actor's dropout sites that drop anything, in order, each with its per-member shape
    for `rows` sequences of T steps at width d: 0 the embeddings (rows, 3T, d); for layer i,
    1 + 3i the attention weights (rows, heads, 3T, 3T), 2 + 3i and 3 + 3i the attention's and
    the MLP's outputs (rows, 3T, d)."""
    L = 3 * T
    sites: dict[int, tuple[int, ...]] = {}
    if embed_dropout > 0.0:
        sites[0] = (rows, L, d)
    if dropout > 0.0:
        for i in range(n_layer):
            sites[1 + 3 * i] = (rows, n_head, L, L)
            sites[2 + 3 * i] = (rows, L, d)
            sites[3 + 3 * i] = (rows, L, d)
    return sites


def drawn_uniforms(
    seeds: list[int], sites: dict[int, tuple[int, ...]], device: torch.device | str = "cpu"
) -> dict[int, torch.Tensor]:
    """Member n's uniforms in [0, 1) for every site, (N, *shape) each: one draw of all its sites
    from a torch generator seeded with seeds[n] alone, cut in the sites' order, so that a
    member's noise is the same whoever shares the pack."""
    sizes = [math.prod(shape) for shape in sites.values()]
    buf = torch.empty(len(seeds), sum(sizes), device=device)
    for n, seed in enumerate(seeds):
        buf[n].uniform_(generator=torch.Generator(device=device).manual_seed(seed))
    out, start = {}, 0
    for (site, shape), size in zip(sites.items(), sizes):
        out[site] = buf[:, start : start + size].view(len(seeds), *shape)
        start += size
    return out


def member_dropout(x: torch.Tensor, p: float, noise: Noise, site: int) -> torch.Tensor:
    """Dropout of x (N, ...) at `site` with each member's own noise: keys (N, 2) int64 for
    `hashed_dropout`, or `drawn_uniforms`' dict (an element is kept when its uniform is >= p,
    probability 1 - p, and scaled by 1 / (1 - p), as `F.dropout`). None or p 0: identity."""
    if not isinstance(noise, dict):
        return hashed_dropout(x, p, noise, site)
    if p == 0.0:
        return x
    return _keep_scaled(x, noise[site].view(x.shape) >= p, p)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x (N, ..., in), w (N, out, in), b (N, out) -> (N, ..., out), one batched matmul."""
    n, fan_in = x.shape[0], x.shape[-1]
    y = torch.baddbmm(b.unsqueeze(1), x.reshape(n, -1, fan_in), w.transpose(1, 2))
    return y.view(*x.shape[:-1], w.shape[1])


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, eps: float = 1e-5):
    """LayerNorm over the last dim with member n's weight w[n] and bias b[n] (N, d)."""
    view = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    return F.layer_norm(x, x.shape[-1:], eps=eps) * w.view(view) + b.view(view)


def actor_forward(
    p: Params,
    states: torch.Tensor,
    actions: torch.Tensor,
    rewards: torch.Tensor,
    rtg: torch.Tensor,
    timesteps: torch.Tensor,
    mask: torch.Tensor,
    *,
    n_layer: int,
    n_head: int,
    sar: bool,
    scale: float,
    dropout: float,
    embed_dropout: float,
    noise: Noise,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """`QTActor.forward` for N members: inputs (N, B, T, ...); noise (`member_dropout`'s) None
    means eval mode.

    Returns (state_preds (N, B, T, S), action_preds (N, B, T, A), reward_preds or None).
    """
    N, B, T = states.shape[:3]
    d = p["embed_state.weight"].shape[1]
    max_ep_len = p["embed_timestep.weight"].shape[1]
    # timestep embedding: member n's rows are n * max_ep_len + t of the flattened tables
    offsets = (torch.arange(N, device=timesteps.device) * max_ep_len).view(N, 1, 1)
    time_emb = F.embedding(timesteps + offsets, p["embed_timestep.weight"].reshape(-1, d))
    s_emb = linear(states, p["embed_state.weight"], p["embed_state.bias"])
    a_emb = linear(actions, p["embed_action.weight"], p["embed_action.bias"])
    if sar:
        r_emb = linear(rewards / scale, p["embed_rewards.weight"], p["embed_rewards.bias"])
        tokens = (s_emb, a_emb, r_emb)
    else:
        tokens = (linear(rtg, p["embed_return.weight"], p["embed_return.bias"]), s_emb, a_emb)
    x = (torch.stack(tokens, dim=3) + time_emb.unsqueeze(3)).reshape(N, B, 3 * T, d)
    x = layer_norm(x, p["embed_ln.weight"], p["embed_ln.bias"])

    L = 3 * T
    bias = causal_padding_bias(mask.reshape(N * B, T).repeat_interleave(3, dim=1))
    x = member_dropout(x, embed_dropout, noise, 0)
    hd = d // n_head
    for i in range(n_layer):
        pre = f"transformer.h.{i}."
        h = layer_norm(x, p[pre + "ln_1.weight"], p[pre + "ln_1.bias"])
        qkv = linear(h, p[pre + "attn.c_attn.weight"], p[pre + "attn.c_attn.bias"])
        q, k, v = qkv.view(N * B, L, 3, n_head, hd).permute(2, 0, 3, 1, 4).unbind(0)
        if noise is not None and dropout > 0.0:
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd)) + bias.to(q.dtype)
            probs = scores.softmax(dim=-1).view(N, B, n_head, L, L)
            probs = member_dropout(probs, dropout, noise, 1 + 3 * i).view(N * B, n_head, L, L)
            y = probs @ v
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        y = y.transpose(1, 2).reshape(N, B, L, d)
        y = linear(y, p[pre + "attn.c_proj.weight"], p[pre + "attn.c_proj.bias"])
        x = x + member_dropout(y, dropout, noise, 2 + 3 * i)
        h = layer_norm(x, p[pre + "ln_2.weight"], p[pre + "ln_2.bias"])
        h = F.relu(linear(h, p[pre + "mlp.c_fc.weight"], p[pre + "mlp.c_fc.bias"]))
        h = linear(h, p[pre + "mlp.c_proj.weight"], p[pre + "mlp.c_proj.bias"])
        x = x + member_dropout(h, dropout, noise, 3 + 3 * i)
    x = layer_norm(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"])
    h = x.reshape(N, B, T, 3, d)

    def head(name: str, j: int) -> torch.Tensor:
        return linear(h[:, :, :, j], p[name + ".weight"], p[name + ".bias"])

    if sar:
        action_preds = torch.tanh(head("predict_action.0", 0))
        reward_preds = head("predict_rewards", 1)
        state_preds = head("predict_state", 2)
    else:
        action_preds = torch.tanh(head("predict_action.0", 1))
        state_preds = head("predict_state", 2)
        reward_preds = None
    return state_preds, action_preds, reward_preds


def q_mlp(p: Params, prefix: str, x: torch.Tensor) -> torch.Tensor:
    """One of the twin Q networks (`prefix` q1_model or q2_model) on x (N, ..., S + A)."""
    for j in (0, 2, 4):
        x = F.mish(linear(x, p[f"{prefix}.{j}.weight"], p[f"{prefix}.{j}.bias"]))
    return linear(x, p[f"{prefix}.6.weight"], p[f"{prefix}.6.bias"])


def critic_forward(
    p: Params, state: torch.Tensor, action: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`TwinCritic.forward` for N members: (N, ..., S), (N, ..., A) -> q1, q2 (N, ..., 1)."""
    x = torch.cat([state, action], dim=-1)
    return q_mlp(p, "q1_model", x), q_mlp(p, "q2_model", x)

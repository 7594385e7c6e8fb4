"""A GPT-2 style causal transformer over given token embeddings (docs/algorithm.md §2).

Owns the trunk of the actor: pre-LN blocks (causal self-attention on
`scaled_dot_product_attention`, then a 4d ReLU MLP), dropout on attention
probabilities and residual branches, a final LayerNorm. It has no token or position
embedding of its own: the actor adds a timestep embedding before calling it.

Behaves like the GPT2Model the authors vendored from HuggingFace transformers
(`trajectory_gpt2.py`, the 2021 code without positional embeddings) on every
non-padded token: same architecture, same LayerNorm eps, same initialisation
(every block linear N(0, 0.02), biases 0, LayerNorms (1, 0); that version has no
GPT-2 "scaled c_proj" initialisation, which later transformers releases added).
Weights are stored as `nn.Linear` (out, in); HF's `Conv1D` stores (in, out).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# The reference adds -1e4 to the scores of padded keys. A large finite value keeps
# every softmax row finite, and exp(-1e4) is exactly 0 in float32/bfloat16/float16,
# so a valid query gives a padded or future key exactly zero weight.
MASK_VALUE = -1e4


class _BitsDropout(torch.autograd.Function):
    """Dropout from 31 random bits per element: keep where bits >= p * 2^31.

    On the CPU, `F.dropout` draws its mask with `bernoulli_`, which costs several times what
    drawing raw integers does (about 26 ms against 7 ms for a 256 x 60 x 256 tensor here);
    this gives the same distribution (keep probability 1 - p to within 2^-31) at a fraction of
    the cost. The mask comes from the global torch generator, like `F.dropout`'s.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float) -> torch.Tensor:
        bits = torch.empty(x.shape, dtype=torch.int32, device=x.device).random_()  # [0, 2^31)
        keep = bits >= int(round(p * 2**31))
        scale = 1.0 / (1.0 - p)
        ctx.save_for_backward(keep)
        ctx.scale = scale
        return torch.where(keep, x * scale, torch.zeros((), dtype=x.dtype, device=x.device))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (keep,) = ctx.saved_tensors
        zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
        return torch.where(keep, grad * ctx.scale, zero), None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`F.dropout`, with a cheaper mask on the CPU (see `_BitsDropout`)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training=True)
    return _BitsDropout.apply(x, p)


class Dropout(nn.Dropout):
    """`nn.Dropout` on `dropout` above (same argument, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused qkv projection."""

    def __init__(self, hidden_size: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if hidden_size % n_head != 0:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by n_head ({n_head}).")
        self.n_head = n_head
        self.c_attn = nn.Linear(hidden_size, 3 * hidden_size)  # q, k, v in this order
        self.c_proj = nn.Linear(hidden_size, hidden_size)
        self.attn_dropout = dropout
        self.resid_dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, d); attn_bias (B, 1, L, L) additive, or None for plain causal."""
        B, L, d = x.shape
        qkv = self.c_attn(x).view(B, L, 3, self.n_head, d // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, hd)
        p = self.attn_dropout if self.training else 0.0
        if p > 0.0 and x.device.type == "cpu":
            # the math path of SDPA, written out so that its dropout is the cheap one
            scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
            if attn_bias is None:
                causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
                scores = scores.masked_fill(~causal, MASK_VALUE)
            else:
                scores = scores + attn_bias.to(q.dtype)
            y = dropout(scores.softmax(dim=-1), p, True) @ v
        elif attn_bias is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:
            # SDPA wants the mask in the query's dtype (bf16/fp16 under autocast).
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_bias.to(q.dtype), dropout_p=p
            )
        y = y.transpose(1, 2).reshape(B, L, d)
        return self.resid_dropout(self.c_proj(y))

    def forward_cached(
        self,
        x: torch.Tensor,
        attn_bias: torch.Tensor,
        past: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Inference with cached keys and values (no dropout).

        x (B, L, d) new tokens; past (k, v), each (B, H, P, hd), of P earlier tokens;
        attn_bias (B, 1, L, P + L) additive. Returns the output and (k, v) of all P + L tokens.
        """
        B, L, d = x.shape
        qkv = self.c_attn(x).view(B, L, 3, self.n_head, d // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias.to(q.dtype))
        return self.c_proj(y.transpose(1, 2).reshape(B, L, d)), (k, v)


class MLP(nn.Module):
    """d -> 4d -> d with ReLU (the reference's `activation_function='relu'`)."""

    def __init__(self, hidden_size: int, dropout: float) -> None:
        super().__init__()
        self.c_fc = nn.Linear(hidden_size, 4 * hidden_size)
        self.c_proj = nn.Linear(4 * hidden_size, hidden_size)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.relu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, hidden_size: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_size, eps=1e-5)
        self.attn = CausalSelfAttention(hidden_size, n_head, dropout)
        self.ln_2 = nn.LayerNorm(hidden_size, eps=1e-5)
        self.mlp = MLP(hidden_size, dropout)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), attn_bias)
        return x + self.mlp(self.ln_2(x))

    def forward_cached(self, x, attn_bias, past=None):
        """`forward` at inference with cached keys/values (see `CausalSelfAttention`)."""
        a, kv = self.attn.forward_cached(self.ln_1(x), attn_bias, past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class CausalTransformer(nn.Module):
    """GPT-2 trunk: embedding dropout, `n_layer` pre-LN blocks, final LayerNorm.

    Args:
        hidden_size: token width d.
        n_layer: number of blocks.
        n_head: attention heads (d must be divisible by it).
        dropout: dropout on attention probabilities and residual branches.
        embed_dropout: dropout on the input embeddings (GPT2Config's `embd_pdrop`,
            which the reference never sets, so it is always 0.1 there).
    """

    def __init__(
        self,
        hidden_size: int = 256,
        n_layer: int = 4,
        n_head: int = 4,
        dropout: float = 0.1,
        embed_dropout: float = 0.1,
    ) -> None:
        super().__init__()
        self.drop = Dropout(embed_dropout)
        self.h = nn.ModuleList(Block(hidden_size, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(hidden_size, eps=1e-5)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 initialisation of the reference: linear N(0, 0.02), bias 0, LayerNorm (1, 0)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the trunk.

        Args:
            x: (B, L, d) token embeddings.
            key_mask: (B, L), nonzero/True on tokens that may be attended to, 0 on
                padding; None means no padding.

        Returns:
            (B, L, d) hidden states after the final LayerNorm.
        """
        attn_bias = None if key_mask is None else causal_padding_bias(key_mask)
        x = self.drop(x)
        for block in self.h:
            x = block(x, attn_bias)
        return self.ln_f(x)

    # ------------------------------------------------------------------ shared prefixes
    @torch.no_grad()
    def prefix(self, x: torch.Tensor, key_mask: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """Keys and values of every layer for prefix tokens x (B, P, d) (inference)."""
        bias = causal_padding_bias(key_mask)
        kvs = []
        x = self.drop(x)
        for block in self.h:
            x, kv = block.forward_cached(x, bias)
            kvs.append(kv)
        return kvs

    @torch.no_grad()
    def extend(
        self,
        x: torch.Tensor,
        prefix_kv: list[tuple[torch.Tensor, ...]],
        prefix_mask: torch.Tensor,
        rows: torch.Tensor,
    ) -> torch.Tensor:
        """Hidden states of new tokens x (B', L, d) that follow prefix `rows[i]` (inference).

        Token i of sequence b sees every non-padded token of its prefix (`prefix_mask`, (B, P))
        and the new tokens up to itself: the same as running the whole sequence, at the cost
        of the new tokens only.
        """
        Bn, L, _ = x.shape
        P = prefix_mask.shape[1]
        seen = torch.ones(Bn, 1, L, P + L, dtype=torch.bool, device=x.device)
        seen[..., :P] = (prefix_mask[rows] != 0)[:, None, None, :]
        seen[..., P:] = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        bias = torch.where(seen, zero, torch.full_like(zero, MASK_VALUE))
        x = self.drop(x)
        for block, (k, v) in zip(self.h, prefix_kv):
            x, _ = block.forward_cached(x, bias, (k[rows], v[rows]))
        return self.ln_f(x)


def causal_padding_bias(key_mask: torch.Tensor) -> torch.Tensor:
    """Additive attention bias (B, 1, L, L): 0 where query i may see key j, else -1e4.

    Query i may see key j when j <= i and key j is not padding. A padded query's
    row is all -1e4 at worst, never -inf, so the softmax stays finite (no NaN that
    could leak into valid tokens in the next layer); valid queries give masked keys
    exactly zero weight, as in the reference.
    """
    B, L = key_mask.shape
    causal = torch.ones(L, L, dtype=torch.bool, device=key_mask.device).tril()  # (L, L)
    allowed = causal & (key_mask != 0)[:, None, None, :]  # (B, 1, L, L)
    zero = torch.zeros((), dtype=torch.float32, device=key_mask.device)
    return torch.where(allowed, zero, torch.full_like(zero, MASK_VALUE))

"""The actor: padding, causality, NaN safety, head wiring, initialisation, size."""

from __future__ import annotations

import pytest
import torch

from qt.models import QTActor
from tests.models.conftest import TINY, padded_window


def _actor(seed: int = 0, **kw) -> QTActor:
    torch.manual_seed(seed)
    return QTActor(**{**TINY, **kw}).eval()


@pytest.mark.parametrize("sar", [False, True])
def test_padding_never_changes_valid_outputs(tiny_inputs, sar):
    actor = _actor(sar=sar)
    x = tiny_inputs
    pad = (x["mask"] == 0)[..., None]
    g = torch.Generator().manual_seed(1)
    # Huge values on padding: anything leaking would move the valid outputs.
    noisy = {
        k: torch.where(pad, 1e3 * torch.randn(v.shape, generator=g), v)
        for k, v in x.items()
        if k in ("states", "actions", "rewards", "rtg")
    }
    noisy_ts = torch.where(
        pad[..., 0], torch.randint(0, 50, x["timesteps"].shape, generator=g), x["timesteps"]
    )
    with torch.no_grad():
        a = actor(x["states"], x["actions"], x["rewards"], x["rtg"], x["timesteps"], x["mask"])
        b = actor(
            noisy["states"], noisy["actions"], noisy["rewards"], noisy["rtg"], noisy_ts, x["mask"]
        )
    valid = x["mask"].bool()
    for u, w in zip(a, b):
        if u is not None:
            assert torch.isfinite(w).all()
            torch.testing.assert_close(u[valid], w[valid], rtol=0, atol=1e-6)
    # And the padded outputs did change, so the test can see a leak at all.
    assert not torch.allclose(a.action_preds[~valid], b.action_preds[~valid])


def test_padded_window_equals_unpadded_window(tiny_inputs):
    """A window of T valid steps, left-padded to K, gives the outputs of the bare T steps."""
    actor = _actor()
    x = tiny_inputs
    i = int((x["mask"].sum(1) < TINY["K"]).nonzero()[0])
    T = int(x["mask"][i].sum())
    with torch.no_grad():
        full = actor(
            *(x[k][i : i + 1] for k in ("states", "actions", "rewards", "rtg", "timesteps", "mask"))
        )
        bare = actor(
            *(x[k][i : i + 1, -T:] for k in ("states", "actions", "rewards", "rtg", "timesteps"))
        )
    torch.testing.assert_close(full.action_preds[:, -T:], bare.action_preds, rtol=0, atol=1e-5)


@pytest.mark.parametrize("sar", [False, True])
def test_causality(tiny_inputs, sar):
    """Changing timestep t's inputs leaves every output before the token it enters unchanged."""
    actor = _actor(sar=sar)
    x = {k: v[:1] for k, v in tiny_inputs.items()}  # the full window
    t = 3
    with torch.no_grad():
        base = actor(x["states"], x["actions"], x["rewards"], x["rtg"], x["timesteps"])
        acts = x["actions"].clone()
        acts[:, t] += 5.0
        moved = actor(x["states"], acts, x["rewards"], x["rtg"], x["timesteps"])
    # a_t is read after s_t in both layouts: actions up to t are unchanged, the next-state
    # prediction at t (read from a_t or r_t) is changed, as are later actions.
    torch.testing.assert_close(
        base.action_preds[:, : t + 1], moved.action_preds[:, : t + 1], rtol=0, atol=1e-6
    )
    torch.testing.assert_close(base.state_preds[:, :t], moved.state_preds[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(base.state_preds[:, t], moved.state_preds[:, t])
    assert not torch.allclose(base.action_preds[:, t + 1], moved.action_preds[:, t + 1])


def test_head_reads_state_token():
    """Without sar the action at t depends on R_t and s_t but not on a_t."""
    actor = _actor()
    x = padded_window(1, TINY["K"], TINY["state_dim"], TINY["act_dim"], seed=3)
    t = 2
    with torch.no_grad():
        base = actor(x["states"], x["actions"], x["rewards"], x["rtg"], x["timesteps"]).action_preds
        s = x["states"].clone()
        s[:, t] += 1.0
        r = x["rtg"].clone()
        r[:, t] += 1.0
        by_s = actor(s, x["actions"], x["rewards"], x["rtg"], x["timesteps"]).action_preds
        by_r = actor(x["states"], x["actions"], x["rewards"], r, x["timesteps"]).action_preds
        by_rew = actor(
            x["states"], x["actions"], x["rewards"] + 9.0, x["rtg"], x["timesteps"]
        ).action_preds
    assert not torch.allclose(by_s[:, t], base[:, t])
    assert not torch.allclose(by_r[:, t], base[:, t])
    torch.testing.assert_close(by_rew, base, rtol=0, atol=0)  # rewards are no token without sar


def test_fully_padded_rows_give_no_nan():
    actor = QTActor(**TINY).train()  # dropout on, gradients through everything
    x = padded_window(4, TINY["K"], TINY["state_dim"], TINY["act_dim"], seed=4)
    x["mask"][1] = 0.0
    x["mask"][1, -1] = 1.0  # K-1 padded tokens in front of one valid step
    out = actor(x["states"], x["actions"], x["rewards"], x["rtg"], x["timesteps"], x["mask"])
    loss = sum(o.sum() for o in out if o is not None)
    loss.backward()
    assert all(torch.isfinite(o).all() for o in out if o is not None)
    assert all(torch.isfinite(p.grad).all() for p in actor.parameters() if p.grad is not None)


def test_initialisation_statistics():
    torch.manual_seed(0)
    actor = QTActor(state_dim=11, act_dim=3)
    block_weights = [
        m.weight for m in actor.transformer.modules() if isinstance(m, torch.nn.Linear)
    ]
    w = torch.cat([p.flatten() for p in block_weights])
    assert abs(w.std().item() - 0.02) < 2e-4 and abs(w.mean().item()) < 2e-4
    # no GPT-2 scaled c_proj init in the reference: every projection has std 0.02 on its own
    for blk in actor.transformer.h:
        assert abs(blk.attn.c_proj.weight.std().item() - 0.02) < 1e-3
        assert abs(blk.mlp.c_proj.weight.std().item() - 0.02) < 1e-3
    for m in actor.transformer.modules():
        if isinstance(m, torch.nn.Linear):
            assert torch.count_nonzero(m.bias) == 0
        if isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.count_nonzero(m.bias) == 0
    # the timestep embedding keeps nn.Embedding's N(0, 1)
    assert abs(actor.embed_timestep.weight.std().item() - 1.0) < 0.01
    # modality embeddings keep nn.Linear's U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    bound = 1 / 11**0.5
    assert (
        actor.embed_state.weight.abs().max() <= bound
        and actor.embed_state.weight.std() > 0.5 * bound / 3**0.5
    )


def _reference_count(d: int, n_layer: int, S: int, A: int, max_ep_len: int) -> int:
    """The authors' DecisionTransformer, by hand (HF Conv1D (in, out) + bias)."""
    block = (
        2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    )
    trunk = n_layer * block + 2 * d + 1 * d  # + ln_f + wte (vocab_size 1, unused)
    embeds = max_ep_len * d + (d + d) * 2 + (S * d + d) + (A * d + d) + 2 * d  # t, R, r, s, a, ln
    heads = (d * S + S) + (d * A + A) + (d + 1)
    return trunk + embeds + heads


def test_parameter_count_matches_reference_architecture():
    d, S, A = 256, 11, 3
    ref = _reference_count(d, 4, S, A, 1000)
    assert ref == 3_425_295  # also what the authors' model reports (checked with their code)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # We create no module a mode leaves unused: wte (d), and embed_rewards (2d) +
    # predict_rewards (d+1) without sar, or embed_return (2d) with it.
    assert count(QTActor(S, A, d, 4, 4)) == ref - d - 2 * d - (d + 1)
    assert count(QTActor(S, A, d, 4, 4, sar=True)) == ref - d - 2 * d


@pytest.mark.parametrize("sar", [False, True])
def test_every_parameter_gets_a_gradient(tiny_inputs, sar):
    """No unused parameters: DDP would stop on them."""
    actor = QTActor(**TINY, sar=sar)
    x = tiny_inputs
    out = actor(x["states"], x["actions"], x["rewards"], x["rtg"], x["timesteps"], x["mask"])
    sum(o.sum() for o in out if o is not None).backward()
    assert [n for n, p in actor.named_parameters() if p.grad is None] == []


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="divisible by n_head"):
        QTActor(3, 2, hidden_size=30, n_head=4)
    with pytest.raises(ValueError, match="state_dim"):
        QTActor(0, 2)


def test_cpu_dropout_keeps_the_right_fraction_scales_and_reuses_its_mask():
    from qt.models.transformer import dropout

    torch.manual_seed(0)
    x = torch.ones(400_000, requires_grad=True)
    y = dropout(x, 0.1, training=True)
    kept = y != 0
    # keep probability 0.9 (binomial std ~0.0005), kept values scaled by 1/0.9
    assert abs(kept.float().mean().item() - 0.9) < 0.003
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.9))
    y.backward(torch.arange(400_000, dtype=torch.float32))
    # the gradient flows exactly where the forward kept, with the same scale
    expected = torch.where(kept, torch.arange(400_000, dtype=torch.float32) * (1 / 0.9), 0.0)
    assert torch.equal(x.grad, expected)
    # the global generator drives it: same seed, same mask; eval mode is the identity
    torch.manual_seed(0)
    assert torch.equal(dropout(x.detach(), 0.1, training=True) != 0, kept)
    assert dropout(x, 0.1, training=False) is x


def test_attention_dropout_path_matches_sdpa_without_dropout():
    """The written-out attention used under CPU dropout equals SDPA when nothing is dropped."""
    from qt.models.transformer import CausalSelfAttention, causal_padding_bias

    torch.manual_seed(1)
    attn = CausalSelfAttention(16, 2, dropout=1e-12)  # the manual path, dropping ~nothing
    x = torch.randn(3, 7, 16)
    mask = torch.ones(3, 7)
    mask[0, :3] = 0
    bias = causal_padding_bias(mask)
    attn.train()
    manual = attn(x, bias)
    attn.eval()
    reference = attn(x, bias)
    torch.testing.assert_close(manual, reference, rtol=1e-5, atol=1e-6)
    attn.train()
    torch.testing.assert_close(attn(x, None), attn.eval()(x, None), rtol=1e-5, atol=1e-6)


def test_embedding_dropout_stays_at_the_references_value_whatever_dropout_is():
    # docs/algorithm.md §7: the authors' GPT-2 keeps its default embd_pdrop 0.1
    from qt.module import QTModule

    assert QTActor(**{**TINY, "dropout": 0.0}).transformer.drop.p == 0.1
    module = QTModule(state_dim=3, act_dim=2, K=4, max_ep_len=10, hidden_size=8, n_layer=1,
                      n_head=2, dropout=0.3)  # fmt: skip
    assert module.actor.transformer.drop.p == 0.1
    assert all(b.attn.resid_dropout.p == 0.3 for b in module.actor.transformer.h)

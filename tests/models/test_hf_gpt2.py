"""Optional: our causal transformer against HuggingFace's GPT2Model on identical weights.

Skipped unless `transformers` is importable; the project does not depend on it.
GPT2Model gets the reference's settings (ReLU, 4d MLP, eps 1e-5) and zeroed
position embeddings (the reference removed them).
"""

from __future__ import annotations

import pytest
import torch

from qt.models import QTActor
from qt.models.transformer import CausalTransformer

transformers = pytest.importorskip("transformers")


def _hf(d: int, n_layer: int, n_head: int):
    cfg = transformers.GPT2Config(
        vocab_size=1,
        n_embd=d,
        n_layer=n_layer,
        n_head=n_head,
        n_inner=4 * d,
        activation_function="relu",
        n_positions=1024,
        layer_norm_epsilon=1e-5,
    )
    torch.manual_seed(0)
    model = transformers.GPT2Model(cfg).eval()
    with torch.no_grad():
        model.wpe.weight.zero_()
        for p in model.h.parameters():  # make biases and LayerNorms non-trivial
            p.add_(0.05 * torch.randn_like(p))
    return model


def _trunk_state(hf_model) -> dict[str, torch.Tensor]:
    """HF keys/layout -> ours: Conv1D (in, out) -> Linear (out, in)."""
    out = {}
    for k, v in hf_model.state_dict().items():
        if k.startswith(("wte.", "wpe.")) or k.endswith((".attn.bias", ".attn.masked_bias")):
            continue
        out[k] = v.t() if k.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) else v
    return out


def test_transformer_matches_hf_gpt2():
    d, n_layer, n_head, B, L = 64, 3, 4, 6, 18
    hf = _hf(d, n_layer, n_head)
    ours = CausalTransformer(d, n_layer, n_head).eval()
    ours.load_state_dict(_trunk_state(hf))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, d, generator=g)
    lengths = torch.randint(1, L + 1, (B,), generator=g)
    mask = (torch.arange(L)[None] >= L - lengths[:, None]).long()
    with torch.no_grad():
        want = hf(inputs_embeds=x, attention_mask=mask).last_hidden_state
        got = ours(x, mask)
        want_full = hf(inputs_embeds=x).last_hidden_state
        got_full = ours(x)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(got_full, want_full, rtol=0, atol=1e-5)


def test_from_reference_state_dict_loads_an_hf_trunk():
    """The converter maps the authors' key layout (HF trunk under `transformer.`) onto ours."""
    d, S, A = 32, 4, 2
    hf = _hf(d, 2, 2)
    torch.manual_seed(2)
    donor = QTActor(S, A, d, 2, 2, K=5, max_ep_len=30)
    # the authors' trunk is HF's without the position embedding `wpe`
    ref_sd = {f"transformer.{k}": v for k, v in hf.state_dict().items() if not k.startswith("wpe.")}
    ref_sd.update({k: v for k, v in donor.state_dict().items() if not k.startswith("transformer.")})
    ref_sd["embed_rewards.weight"] = torch.zeros(d, 1)  # present in the reference, unused here
    actor = QTActor(S, A, d, 2, 2, K=5, max_ep_len=30)
    actor.from_reference_state_dict(ref_sd)
    torch.testing.assert_close(actor.transformer.h[1].mlp.c_fc.weight, hf.h[1].mlp.c_fc.weight.t())
    torch.testing.assert_close(actor.embed_state.weight, donor.embed_state.weight)
    with pytest.raises(ValueError, match="missing"):
        actor.from_reference_state_dict({k: v for k, v in ref_sd.items() if "ln_f" not in k})

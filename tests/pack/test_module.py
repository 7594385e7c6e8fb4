"""A packed member against a separate fit of the same seed and settings, and what stays a member's
own: its dropout masks, its non-finite step, its Adam state, its schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from qt.acting.policy import QTPolicy
from qt.errors import UserError
from qt.module import QTModule
from qt.pack.functional import (
    drawn_uniforms,
    dropout_sites,
    hashed_dropout,
    member_dropout,
    uniform_bits,
)
from qt.pack.module import PackedQTModule
from tests.pack.conftest import SHARED, S, fit_pack, fit_separate, stack, stream

NETS = ("actor", "critic", "ema_actor", "critic_target")
# member 0 clips (its grad norms are 1-5), member 1 does not; both decay their learning rates
# over the 2 iterations of 100 steps (T_max 3), divide eta2 by their own lambda_, and start
# their EMA at step 21.
MEMBERS = [
    dict(seed=1, eta=1.0, learning_rate=1e-3, grad_norm=0.5, lambda_=2.0),
    dict(seed=2, eta=0.5, critic_lr=5e-4, weight_decay=1e-3, lambda_=1.5, rtg_no_q=True),
]
STEPS, EPOCHS = 200, 2


def hparams_of(member: dict, **extra) -> dict:
    return SHARED | {k: v for k, v in member.items() if k != "seed"} | extra


def assert_same_networks(
    a: QTModule, b: QTModule, atol: float = 1e-5, rtol: float = 1e-4, key_bias_atol: float = 1e-3
) -> None:
    """Every parameter equal to `atol`, but for the attention's key biases: their true
    gradient is 0 (a key bias adds the same q.b_k to every score of a query's row, which the
    softmax ignores), so in float32 Adam moves them by up to a learning rate a step along the
    sign of rounding noise, which differs between any two ways of computing the same step.
    They are held to `key_bias_atol`, by default 1e-3 (a few steps' learning rates), and they
    change no output. Elsewhere Adam's normalisation also lifts rounding differences to ~1e-5
    of a parameter's size within tens of steps (rtol)."""
    for net in NETS:
        pa, pb = dict(getattr(a, net).named_parameters()), dict(getattr(b, net).named_parameters())
        assert pa.keys() == pb.keys()
        for name in pa:
            x, y = pa[name].detach().clone(), pb[name].detach().clone()
            if name.endswith("attn.c_attn.bias"):
                d = x.shape[0] // 3
                key_x, key_y = x[d : 2 * d].clone(), y[d : 2 * d].clone()
                torch.testing.assert_close(key_x, key_y, rtol=0, atol=key_bias_atol)
                x[d : 2 * d], y[d : 2 * d] = 0.0, 0.0
            torch.testing.assert_close(
                x, y, rtol=rtol, atol=atol, msg=lambda m, n=f"{net}.{name}": f"{n}: {m}"
            )


@pytest.fixture(scope="module")
def fitted():
    streams = [stream(m["seed"], STEPS) for m in MEMBERS]
    pack = fit_pack(PackedQTModule(MEMBERS, compile=False, **SHARED), stack(streams), EPOCHS)
    separate = [
        fit_separate(hparams_of(m), m["seed"], streams[i], EPOCHS) for i, m in enumerate(MEMBERS)
    ]
    return pack, separate


def test_a_member_trains_to_its_separate_fit(fitted):
    pack, separate = fitted
    for i, sep in enumerate(separate):
        member = pack.member_module(i)
        assert_same_networks(member, sep)
        assert float(member.eta2) == float(sep.eta2) == 1.0 / MEMBERS[i]["lambda_"] ** EPOCHS
        assert int(member.train_steps) == int(sep.train_steps) == STEPS
        assert int(member.rng_seed) == MEMBERS[i]["seed"]
        # the cosine schedule moved and the learning rates are the separate fit's, exactly
        opts = sep.trainer.optimizers
        assert pack._lrs[i] == [opts[0].param_groups[0]["lr"], opts[1].param_groups[0]["lr"]]
        assert pack._lrs[i][0] < hparams_of(MEMBERS[i]).get("learning_rate", 3e-4)
        # the EMA actor moved away from the initial actor (it started at step 21)
        torch.manual_seed(MEMBERS[i]["seed"])
        init = QTModule(**hparams_of(MEMBERS[i]))
        moved = [
            (p - q).abs().max()
            for p, q in zip(member.ema_actor.parameters(), init.actor.parameters())
        ]
        assert max(moved) > 1e-3
    # member 0's clipping was active: its pre-clip norms exceed its limit of 0.5
    metrics = pack.last_metrics
    assert float(metrics[0]["train/actor_grad_norm"]) > 0.5
    assert float(metrics[0]["train/critic_grad_norm"]) > 0.5
    assert set(metrics[1]) >= {"train/critic_loss", "train/bc_loss", "train/q_loss",
                               "lr/actor", "lr/critic", "train/nonfinite"}  # fmt: skip


def _act(module: QTModule, steps: int = 4) -> np.ndarray:
    hp = module.hparams
    module.eval()
    policy = QTPolicy(
        module.actor, module.critic_target, state_mean=module.state_mean,
        state_std=module.state_std, scale=hp.scale, env_targets=[30.0, 10.0], K=hp.K,
        max_ep_len=hp.max_ep_len, num_candidates=6, rtg_no_q=hp.rtg_no_q,
        infer_no_q=hp.infer_no_q,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    policy.reset(rng.normal(size=(3, S)), seeds=[5, 6, 7])
    taken = []
    for _ in range(steps):
        actions = policy.act()
        taken.append(actions)
        policy.observe(actions, rng.normal(size=3), rng.normal(size=(3, S)))
    return np.stack(taken)


def test_a_member_acts_as_its_separate_fit(fitted):
    pack, separate = fitted
    for i, sep in enumerate(separate):
        member = pack.member_module(i)
        assert member.hparams.rtg_no_q == MEMBERS[i].get("rtg_no_q", False)
        np.testing.assert_allclose(_act(member), _act(sep), atol=1e-5)


@pytest.fixture
def float64():
    """Modules and batches built in float64 for one test, then float32 again."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize(
    "variant",
    [
        dict(max_q_backup=True, sar=True),
        dict(k_rewards=False),
        dict(use_discount=False),
        dict(next_state_loss=False),
    ],
    ids=["max_q_backup-sar", "one-step", "rtg-targets", "no-next-state"],
)
def test_variants_train_to_their_separate_fits(variant, float64):
    """In float64, so that rounding cannot pass for a difference: in float32 Adam lifts the
    rounding differences between the batched and the separate step to 1e-4 of a parameter
    within 20 steps (the rtg-targets variant's layer-1 ln_2 and c_fc did), while in float64
    every parameter of every variant agrees to 1e-8. A real difference is far larger: a pack
    trained with rtg targets against a separate fit with discounted ones is 6e-3 apart in the
    critic and 7e-4 in the actor after these 20 steps (measured), so 1e-7 tells them apart."""
    members = [dict(seed=4, grad_norm=1.0), dict(seed=9, eta=2.0)]
    shared = SHARED | variant
    streams = [stream(m["seed"], 20) for m in members]
    pack = fit_pack(PackedQTModule(members, compile=False, **shared), stack(streams), 2)
    for i, m in enumerate(members):
        hp = shared | {k: v for k, v in m.items() if k != "seed"}
        member, separate = pack.member_module(i), fit_separate(hp, m["seed"], streams[i], 2)
        assert all(
            p.dtype == torch.float64 for net in NETS for p in getattr(member, net).parameters()
        )
        assert_same_networks(member, separate, atol=1e-7, rtol=0, key_bias_atol=1e-7)


# ----------------------------------------------------------------------------- dropout
def test_hashed_dropout_masks_are_each_members_own():
    p = 0.25
    keys = torch.tensor([[1, 2], [1, 3], [7, 2]], dtype=torch.int64)
    x = torch.ones(3, 64, 200)
    y = hashed_dropout(x, p, keys, site=4)
    kept = y != 0
    n = kept[0].numel()
    for row in range(3):  # keep rate 1 - p within 5 binomial standard deviations
        assert abs(kept[row].float().mean() - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)
        assert torch.all(y[row][kept[row]] == 1 / (1 - p))
    # two members (any key word differing) agree about as often as independent masks would
    agree = (kept[0] == kept[1]).float().mean(), (kept[0] == kept[2]).float().mean()
    expected = p**2 + (1 - p) ** 2
    for a in agree:
        assert abs(a - expected) < 0.02
    # another site gives another mask; the same (key, site) the same mask, whoever is beside it
    assert not torch.equal(uniform_bits(keys, 5, (3, 10)), uniform_bits(keys, 4, (3, 10)))
    alone = hashed_dropout(x[1:2], p, keys[1:2], site=4)
    assert torch.equal(alone[0], y[1])


def test_drawn_dropout_masks_are_each_members_own():
    p = 0.25
    sites = dropout_sites(4, 5, 8, n_layer=2, n_head=2, dropout=p, embed_dropout=0.1)
    # the sites and their shapes as the actor meets them: embeddings, then per layer the
    # attention weights (rows, heads, 3T, 3T) and two residual branches (rows, 3T, d)
    assert sites == {0: (4, 15, 8), 1: (4, 2, 15, 15), 2: (4, 15, 8), 3: (4, 15, 8),
                     4: (4, 2, 15, 15), 5: (4, 15, 8), 6: (4, 15, 8)}  # fmt: skip
    assert list(dropout_sites(4, 5, 8, n_layer=2, n_head=2, dropout=0.0, embed_dropout=0.1)) == [0]
    noise = drawn_uniforms([11, 12, 11], sites)
    # member n's noise is torch's uniform stream of its seed, cut in the sites' order
    for n, seed in enumerate([11, 12, 11]):
        expected = torch.rand(sum(math.prod(s) for s in sites.values()),
                              generator=torch.Generator().manual_seed(seed))  # fmt: skip
        got = torch.cat([noise[k][n].reshape(-1) for k in sites])
        assert torch.equal(got, expected)
    assert torch.equal(noise[4][0], noise[4][2]) and not torch.equal(noise[4][0], noise[4][1])
    alone = drawn_uniforms([12], sites)
    assert all(torch.equal(alone[k][0], noise[k][1]) for k in sites)
    # dropout keeps an element when its uniform is >= p, scaled by 1 / (1 - p)
    x = torch.ones(3, 4, 2, 15, 15)
    y = member_dropout(x, p, noise, 4)
    assert torch.equal(y != 0, noise[4] >= p)
    assert torch.all(y[y != 0] == 1 / (1 - p))
    kept = (y != 0).float().mean()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / y.numel())
    assert member_dropout(x, p, None, 4) is x and member_dropout(x, 0.0, noise, 4) is x


@pytest.mark.parametrize("noise", ["drawn", "hashed"])
def test_dropout_stream_does_not_depend_on_the_other_members(noise):
    shared = SHARED | dict(dropout=0.2, embed_dropout=0.1, dropout_noise=noise)
    batches = {s: stream(s, 12) for s in (1, 3)}
    alone = fit_pack(
        PackedQTModule([dict(seed=3)], compile=False, **shared), stack([batches[3]]), 1
    )
    pair = fit_pack(
        PackedQTModule([dict(seed=1), dict(seed=3)], compile=False, **shared),
        stack([batches[1], batches[3]]), 1,
    )  # fmt: skip
    assert_same_networks(alone.member_module(0), pair.member_module(1), atol=1e-6)
    # and dropout acted: the same member without dropout trains elsewhere
    plain = fit_pack(
        PackedQTModule(
            [dict(seed=3)], compile=False, **SHARED | dict(embed_dropout=0.0, dropout_noise=noise)
        ),
        stack([batches[3]]), 1,
    )  # fmt: skip
    diff = max(
        (a - b).abs().max()
        for a, b in zip(
            alone.member_module(0).actor.parameters(), plain.member_module(0).actor.parameters()
        )
    )
    assert diff > 1e-4


# ----------------------------------------------------------------------------- members apart
def _snapshot(pack: PackedQTModule, i: int) -> dict[str, torch.Tensor]:
    return {
        k: v[i].clone()
        for k, v in pack.state_dict().items()
        if v.dim() > 0 and v.shape[0] == pack.n_members
    }


def test_a_non_finite_member_stops_and_the_others_go_on():
    members = [dict(seed=1), dict(seed=2)]
    streams = [stream(1, 12), stream(2, 12)]
    poisoned = [b._replace(states=b.states.clone()) for b in streams[1]]
    poisoned[5].states[0, 2, 0] = float("nan")  # member 1's sixth batch
    pack = PackedQTModule(members, compile=False, **SHARED)
    fit_pack(pack, stack([streams[0][:5], poisoned[:5]]), 1)
    before = _snapshot(pack, 1)
    fit_pack(pack, stack([streams[0][5:6], poisoned[5:6]]), 1)
    assert [float(m["train/nonfinite"]) for m in pack.last_metrics] == [0.0, 1.0]
    assert pack.active.tolist() == [True, False]
    fit_pack(pack, stack([streams[0][6:], poisoned[6:]]), 1)
    after = _snapshot(pack, 1)
    for name, value in before.items():
        if name == "active":
            continue
        assert torch.equal(after[name], value), name
    # member 0 is what it would be alone
    alone = PackedQTModule(members[:1], compile=False, **SHARED)
    for chunk in (slice(0, 5), slice(5, 6), slice(6, 12)):
        fit_pack(alone, stack([streams[0][chunk]]), 1)
    assert_same_networks(pack.member_module(0), alone.member_module(0), atol=1e-6)


def test_an_inactive_member_is_frozen_through_epochs_and_targets():
    pack = PackedQTModule([dict(seed=1), dict(seed=2)], compile=False, **SHARED)
    batches = stack([stream(1, 6), stream(2, 6)])
    fit_pack(pack, batches[:3], 1)
    pack.set_member_active(0, False)
    before = _snapshot(pack, 0)
    fit_pack(pack, batches[3:], 1)
    after = _snapshot(pack, 0)
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    assert int(pack.train_steps[1]) == 6 and int(pack.train_steps[0]) == 3


def test_optimizer_states_are_a_separate_fits_and_a_member_resumes_alone():
    member = dict(seed=5, weight_decay=1e-3)
    batches = stream(5, 8)
    pack = fit_pack(PackedQTModule([member], compile=False, **SHARED), stack([batches]), 1)
    sep = fit_separate(hparams_of(member), 5, batches, 1)
    states = pack.member_optimizer_states(0)
    for mine, theirs in zip(states, [o.state_dict() for o in sep.trainer.optimizers]):
        assert mine["param_groups"] == theirs["param_groups"]
        assert mine["state"].keys() == theirs["state"].keys()
        for k, s in theirs["state"].items():
            assert float(mine["state"][k]["step"]) == float(s["step"]) == 8.0
            for field in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(mine["state"][k][field], s[field], rtol=1e-4, atol=1e-7)
    # a second pack slot loaded from the separate fit's state continues as the first member
    two = PackedQTModule([dict(seed=0), dict(seed=0)], compile=False, **SHARED)
    two.load_member(0, pack.member_module(0), states, pack.member_scheduler_states(0))
    two.load_member(
        1, sep, [o.state_dict() for o in sep.trainer.optimizers],
        [c.scheduler.state_dict() for c in sep.trainer.lr_scheduler_configs],
    )  # fmt: skip
    assert two.seeds == [5, 5]
    more = stream(55, 6)
    fit_pack(two, stack([more, more]), 1)
    assert_same_networks(two.member_module(0), two.member_module(1), atol=1e-5)


def test_pack_state_dict_resumes_where_it_was():
    members = [dict(seed=1), dict(seed=2, lambda_=2.0)]
    shared = SHARED | dict(dropout=0.1)
    batches = stack([stream(1, 8), stream(2, 8)])
    whole = fit_pack(PackedQTModule(members, compile=False, **shared), batches, 2)
    first = fit_pack(PackedQTModule(members, compile=False, **shared), batches[:4], 1)
    resumed = PackedQTModule(members, compile=False, **shared)
    resumed.load_state_dict(first.state_dict())
    fit_pack(resumed, batches[4:], 1)
    for i in range(2):
        assert_same_networks(whole.member_module(i), resumed.member_module(i), atol=1e-6)
        assert whole._lrs[i] == resumed._lrs[i]
    assert torch.equal(whole.eta2, resumed.eta2)


def test_cosine_is_torchs_recursive_form_over_many_epochs():
    shared = SHARED | dict(max_iters=7, lr_min=1e-6)
    pack = PackedQTModule([dict(seed=0, learning_rate=1e-3), dict(seed=1)], compile=False, **shared)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt := torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3), T_max=7, eta_min=1e-6
    )
    closed_differs = False
    for epoch in range(1, 40):
        pack.on_train_epoch_end()
        ref.step()
        assert pack._lrs[0][0] == opt.param_groups[0]["lr"]
        closed = 1e-6 + (1e-3 - 1e-6) * (1 + math.cos(math.pi * epoch / 7)) / 2
        closed_differs |= closed != pack._lrs[0][0]
    assert closed_differs  # the recursion is not the closed form in float
    assert float(pack.lr[1, 1]) == pack._lrs[1][1]


def test_members_that_differ_in_architecture_are_refused():
    with pytest.raises(UserError, match="hidden_size"):
        PackedQTModule([dict(seed=0), dict(seed=1, hidden_size=32)], **SHARED)
    with pytest.raises(UserError, match="seed"):
        PackedQTModule([dict(eta=1.0)], **SHARED)
    with pytest.raises(UserError, match="QT's recipe"):
        PackedQTModule([dict(seed=0)], **SHARED, optimizer="adamw")
    with pytest.raises(UserError, match="expected 2"):
        pack = PackedQTModule([dict(seed=0), dict(seed=1)], compile=False, **SHARED)
        pack.training_step(stack([stream(0, 1)])[0], 0)


@pytest.mark.slow
def test_compiled_step_equals_the_eager_step():
    members = [dict(seed=1, grad_norm=0.5), dict(seed=2)]
    shared = SHARED | dict(dropout=0.1)
    batches = stack([stream(1, 6), stream(2, 6)])
    eager = fit_pack(PackedQTModule(members, compile=False, **shared), batches, 2)
    compiled = fit_pack(PackedQTModule(members, compile=True, **shared), batches, 2)
    for i in range(2):
        assert_same_networks(eager.member_module(i), compiled.member_module(i), atol=1e-5)

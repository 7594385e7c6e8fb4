"""A pack's bad inputs stop with one sentence naming what is wrong, before anything trains."""

from __future__ import annotations

import pytest

from qt.errors import UserError
from qt.pack.fit import check_compatible
from qt.pack.loop import LoopPackedQTModule


def _config(**model) -> dict:
    return {"seed_everything": 0, "model": {"hidden_size": 16, "eta": 1.0, **model},
            "data": {"task": "maze2d-umaze-v1", "batch_size": 8},
            "trainer": {"max_epochs": 2, "logger": {"init_args": {"run_name": "x"}}}}  # fmt: skip


def test_members_may_differ_in_seed_and_member_settings_only():
    other = _config(eta=0.0, rtg_no_q=True)
    other["seed_everything"] = 5
    other["trainer"]["logger"]["init_args"]["run_name"] = "y"  # its own run
    check_compatible([_config(), other])
    with pytest.raises(UserError, match=r"member 1 sets model\.hidden_size=32 .* member 0 has 16"):
        check_compatible([_config(), _config(hidden_size=32)])
    wider = _config()
    wider["data"]["batch_size"] = 16
    with pytest.raises(UserError, match=r"data\.batch_size"):
        check_compatible([_config(), wider])


def test_a_member_with_a_setting_of_the_architecture_is_refused():
    shared = dict(state_dim=3, act_dim=2, K=4, hidden_size=8, n_layer=1, n_head=2)
    with pytest.raises(UserError, match="hidden_size"):
        LoopPackedQTModule([{"seed": 0}, {"seed": 1, "hidden_size": 16}], **shared)
    with pytest.raises(UserError, match="seed"):
        LoopPackedQTModule([{"eta": 1.0}], **shared)
    pack = LoopPackedQTModule([{"seed": 0}, {"seed": 1, "eta": 0.0}], **shared)
    assert pack.n_members == 2 and pack.member_module(1).hparams.eta == 0.0
    assert pack.seeds == [0, 1] and int(pack.member_module(1).rng_seed) == 1


def test_the_decision_transformer_recipe_is_not_packed():
    shared = dict(state_dim=3, act_dim=2, K=4, hidden_size=8, n_layer=1, n_head=2, eta=0.0,
                  rtg_no_q=True, infer_no_q=True)  # fmt: skip
    with pytest.raises(UserError, match="train_critic"):
        LoopPackedQTModule([{"seed": 0}], train_critic=False, **shared)
    with pytest.raises(UserError, match="warmup_steps"):
        LoopPackedQTModule([{"seed": 0}], warmup_steps=10, lr_decay=False, **shared)

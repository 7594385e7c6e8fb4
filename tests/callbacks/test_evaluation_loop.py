"""The Evaluation callback in a fit (its cadence, its metrics against the same episodes run
directly) and in a test (the table), without a data module."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

from qt.acting.episodes import run_episodes
from qt.acting.policy import QTPolicy
from qt.callbacks.evaluation import Evaluation
from qt.data.batch import Segments
from qt.envs import make_env
from qt.module import QTModule
from qt.tasks import get_task

TASK = "hopper-medium-v2"
S, A, K = 11, 3, 4


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def tiny_module() -> QTModule:
    torch.manual_seed(0)
    return QTModule(state_dim=S, act_dim=A, K=K, max_ep_len=20, hidden_size=8, n_layer=1,
                    n_head=2, num_candidates=6)  # fmt: skip


def batches(n: int) -> list[Segments]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        B = 4
        out.append(
            Segments(
                torch.randn(B, K, S, generator=g),
                torch.rand(B, K, A, generator=g) * 2 - 1,
                torch.randn(B, K, 1, generator=g),
                torch.zeros(B, K),
                torch.randn(B, K + 1, 1, generator=g),
                torch.arange(K).repeat(B, 1),
                torch.ones(B, K),
            )  # fmt: skip
        )
    return out


def trainer(callback: Evaluation, epochs: int = 1) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, callbacks=[callback])  # fmt: skip


def direct(module: QTModule, seeds: list[int], max_ep_len: int) -> np.ndarray:
    """The same episodes through run_episodes, one at a time, without the callback."""
    policy = QTPolicy(module.actor.eval(), module.critic_target, state_mean=module.state_mean,
                      state_std=module.state_std, scale=1000.0,
                      env_targets=get_task(TASK).env_targets, K=K, max_ep_len=max_ep_len,
                      num_candidates=6)  # fmt: skip
    return run_episodes(policy, lambda: make_env(TASK), seeds, num_envs=1).returns


def test_fit_logs_every_n_epochs_with_the_registry_task():
    module = tiny_module()
    cb = Evaluation(num_eval_episodes=2, eval_every_n_epochs=2, max_ep_len=6, seed=7, task=TASK)
    t = trainer(cb, epochs=1)
    t.fit(module, torch.utils.data.DataLoader(batches(1), batch_size=None))
    assert "eval/return_mean" not in t.callback_metrics  # epoch 0 is not an evaluation epoch
    t = trainer(cb, epochs=2)
    module = tiny_module()
    t.fit(module, torch.utils.data.DataLoader(batches(1), batch_size=None))
    m = {k: float(v) for k, v in t.callback_metrics.items() if k.startswith("eval/")}
    want = direct(module, [7 + 100_000, 7 + 100_001], 6)  # after the 2nd epoch (index 1)
    assert m["eval/return_mean"] == pytest.approx(want.mean(), rel=1e-5)
    assert m["eval/return_std"] == pytest.approx(want.std(), rel=1e-4, abs=1e-6)
    ref = 100 * (want.mean() + 20.272305) / (3234.3 + 20.272305)  # D4RL hopper scores
    assert m["eval/normalized_score"] == pytest.approx(ref, rel=1e-5)
    assert m["eval/best_normalized_score"] == pytest.approx(ref, rel=1e-5)
    assert 1 <= m["eval/length_mean"] <= 6
    # The best so far survives a worse evaluation.
    cb.best["eval/best_normalized_score"] = 1e9
    assert cb.state_dict()["best"]["eval/best_normalized_score"] == 1e9


def test_test_prints_the_table_and_keeps_the_summary(capsys):
    module = tiny_module()
    cb = Evaluation(test_episodes=3, max_ep_len=5, seed=1, task=TASK, num_envs=2)
    trainer(cb).test(module, torch.utils.data.DataLoader(batches(1), batch_size=None))
    out = capsys.readouterr().out
    assert f"Evaluation of {TASK}" in out and "(3 episodes)" in out
    for name in ("return", "normalized score", "length"):
        assert any(line.startswith(name) for line in out.splitlines())
    np.testing.assert_allclose(cb.last_summary.returns, direct(module, [1, 2, 3], 5), rtol=1e-6)


def test_reference_scores_are_d4rls_published_ones():
    # d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE, by hand
    assert Evaluation._ref_scores(TASK) == (-20.272305, 3234.3)
    assert Evaluation._ref_scores("maze2d-umaze-v1") == (23.85, 161.86)
    with pytest.raises(ValueError, match="needs a task"):
        Evaluation()._task_name(SimpleNamespace(datamodule=None))
    with pytest.raises(ValueError, match="num_eval_episodes"):
        Evaluation(num_eval_episodes=0)

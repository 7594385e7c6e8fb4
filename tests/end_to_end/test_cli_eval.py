"""`cli.py test` and `cli.py validate` on a checkpoint of a tiny fit: the checkpoint's networks
act, `--episodes` sets the episode count, the table is printed, and the episodes' returns
equal the same seeds run one at a time through `run_episodes`."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from qt import cli
from qt.acting.episodes import run_episodes
from qt.acting.policy import QTPolicy
from qt.callbacks.evaluation import Evaluation
from qt.checkpointing import load_checkpoint
from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5
from qt.envs import make_env
from qt.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs" / "tiny.yaml")
TASK = "maze2d-umaze-dense-v1"  # dense rewards: every step's action shows in the return


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A one-iteration tiny fit; its last.ckpt and the data file."""
    root = tmp_path_factory.mktemp("cli_eval")
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    ds = generate(TASK, steps=2000, seed=0, ref_episodes=1, max_episode_steps=60)
    data = write_d4rl_hdf5(ds, root / "maze2d-umaze-dense-v1.hdf5")
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.chdir(root)
        cli.main(["fit", "--config", TINY, "--data.path", str(data), "--data.task", TASK,
                  "--seed_everything", "3", "--trainer.max_epochs", "1"])  # fmt: skip
    [last] = root.glob("runs/*/*/checkpoints/last.ckpt")
    # the fit's store does not leak into the environment (mlflow.set_tracking_uri exports it)
    assert os.environ.get("MLFLOW_TRACKING_URI") == user_uri
    return root, data, last


def _run(root: Path, argv: list[str]):
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.chdir(root)
        return cli.main(argv)


def _evaluation(run) -> Evaluation:
    [cb] = [c for c in run.trainer.callbacks if isinstance(c, Evaluation)]
    return cb


def _one_at_a_time(module, cb: Evaluation, seeds: list[int]) -> np.ndarray:
    hp = module.hparams
    policy = QTPolicy(module.actor.eval(), module.critic_target, state_mean=module.state_mean,
                      state_std=module.state_std, scale=hp.scale, env_targets=list(hp.env_targets),
                      K=hp.K, max_ep_len=cb.max_ep_len, num_candidates=hp.num_candidates)  # fmt: skip
    return run_episodes(policy, lambda: make_env(TASK), seeds, num_envs=1).returns


def test_test_and_validate_act_with_the_checkpoint(fitted, capsys):
    root, data, last = fitted
    common = ["--config", TINY, "--data.path", str(data), "--data.task", TASK, "--ckpt_path",
              str(last)]  # fmt: skip
    run = _run(root, ["test", *common, "--episodes", "3"])
    out = capsys.readouterr().out
    assert f"Evaluation of {TASK}" in out and "(3 episodes)" in out
    cb = _evaluation(run)
    assert cb.test_episodes == 3 and len(cb.last_summary.returns) == 3
    # the networks that acted are the checkpoint's, not a fresh initialisation
    saved = load_checkpoint(last)["state_dict"]
    for name, value in run.model.state_dict().items():
        assert torch.equal(value, saved[name]), name
    # the start states are the fit's seed's (3, in the checkpoint), whatever this run's seed
    assert cb.seed is None and cb.episode_base(run.model) == 3 * 2**32
    seeds = [3 * 2**32 + i for i in range(3)]
    want = _one_at_a_time(run.model, cb, seeds)
    np.testing.assert_allclose(cb.last_summary.returns, want, rtol=1e-6)
    assert len(set(want.round(6))) == 3  # three different episodes, each with its own return
    row = next(line for line in out.splitlines() if line.startswith("return"))
    assert float(row.split()[1]) == pytest.approx(want.mean(), abs=0.01)

    # validate: the same protocol and seeds, logged under eval/
    run = _run(root, ["validate", *common, "--episodes", "2", "--seed_everything", "11"])
    cb = _evaluation(run)
    np.testing.assert_allclose(cb.last_summary.returns, want[:2], rtol=1e-6)
    logged = run.trainer.callback_metrics
    assert float(logged["eval/return_mean"]) == pytest.approx(want[:2].mean(), rel=1e-5)


def test_bad_episode_count_is_one_sentence(fitted):
    root, data, last = fitted
    with pytest.raises(UserError, match=r"--episodes 0: expected a whole number >= 1"):
        _run(root, ["test", "--config", TINY, "--data.path", str(data), "--data.task", TASK,
                    "--ckpt_path", str(last), "--episodes", "0"])  # fmt: skip


def test_diagnostics_reports_reaching_and_staying_where_rewards_are_sparse(fitted, tmp_path):
    """`python -m qt.diagnostics` on the checkpoint: the sparse task's episodes (reward 1 at
    the goal) get the reaching-and-staying section, consistent with their returns; the dense
    task's do not."""
    import json

    from qt.diagnostics import main as diagnostics

    root, data, last = fitted
    for task, episodes in (("maze2d-umaze-v1", 2), (TASK, 1)):
        out = tmp_path / f"{task}.json"
        argv = [str(last), "--task", task, "--data", str(data), "--pairs", "64", "--windows",
                "8", "--episodes", str(episodes), "--json", str(out)]  # fmt: skip
        assert diagnostics(argv) == 0
        [report] = json.loads(out.read_text()).values()
        if task == TASK:
            assert "reaching_and_staying" not in report
            continue
        occupancy, along = report["reaching_and_staying"], report["critic_along_episodes"]
        assert occupancy["episodes"] == episodes
        # every reward is 1 at the goal, 0 elsewhere: no return without an arrival, and the
        # mean return is at most the 300 steps of an episode times the share that arrive
        assert 0.0 <= occupancy["reached"] <= 1.0
        assert (occupancy["reached"] == 0.0) == (along["episode_return_mean"] == 0.0)
        assert along["episode_return_mean"] <= 300 * occupancy["reached"]

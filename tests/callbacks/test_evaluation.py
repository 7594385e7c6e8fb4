"""The evaluation callback: D4RL's normalised score, and under DDP every episode once."""

from __future__ import annotations

import json
import os
import socket
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from qt.callbacks.evaluation import EvalSummary, Evaluation
from qt.module import QTModule
from qt.tasks import get_task


@pytest.mark.parametrize(
    "task, ret, expected",
    [
        # D4RL infos.py: hopper REF_MIN_SCORE -20.272305, REF_MAX_SCORE 3234.3
        ("hopper-medium-v2", 3234.3, 100.0),
        ("hopper-medium-v2", -20.272305, 0.0),
        ("hopper-medium-v2", 1422.0, 100 * (1422.0 + 20.272305) / (3234.3 + 20.272305)),
        # maze2d-umaze-v1: 23.85 / 161.86
        ("maze2d-umaze-v1", 92.855, 50.0),
    ],
)
def test_normalised_score_uses_d4rls_reference_returns(task, ret, expected):
    t = get_task(task)
    summary = EvalSummary(
        np.array([ret, ret]), np.array([10, 12]), t.ref_min_score, t.ref_max_score
    )
    metrics = summary.metrics("eval")
    assert metrics["eval/normalized_score"] == pytest.approx(expected, abs=1e-9)
    assert metrics["eval/length_mean"] == 11 and metrics["eval/return_std"] == 0


def _tiny_module() -> QTModule:
    torch.manual_seed(0)
    return QTModule(
        state_dim=4, act_dim=2, K=3, max_ep_len=6, scale=10.0, hidden_size=8, n_layer=1,
        n_head=1, dropout=0.0, embed_dropout=0.0,
        env_targets=list(get_task("maze2d-umaze-v1").env_targets),
    )  # fmt: skip


def _worker(rank: int, world: int, port: int, seeds: list[int], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import qt.callbacks.evaluation as evaluation  # where Evaluation looks run_episodes up

        ran: list[int] = []
        real = evaluation.run_episodes

        def spy(policy, env_fn, my_seeds, num_envs=None):
            ran.extend(my_seeds)
            return real(policy, env_fn, my_seeds, num_envs)

        evaluation.run_episodes = spy
        module = _tiny_module()  # same seed: same weights on both ranks
        trainer = SimpleNamespace(global_rank=rank, world_size=world, datamodule=None)
        summary = Evaluation(task="maze2d-umaze-v1").evaluate(trainer, module, seeds)
        with open(f"{out}.{rank}", "w") as f:
            json.dump({"ran": ran, "returns": summary.returns.tolist(),
                       "lengths": summary.lengths.tolist()}, f)  # fmt: skip
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_evaluation_runs_each_episode_once(tmp_path):
    seeds = [10, 11, 12, 13, 14]
    out = str(tmp_path / "rank")
    mp.start_processes(_worker, args=(2, _free_port(), seeds, out), nprocs=2, start_method="spawn")
    ranks = [json.load(open(f"{out}.{r}")) for r in range(2)]
    ran = ranks[0]["ran"] + ranks[1]["ran"]
    assert sorted(ran) == seeds and len(set(ran)) == len(seeds)  # every episode, once
    assert ranks[0]["ran"] and ranks[1]["ran"]  # both ranks worked
    # both ranks hold all five results, the same as one process playing every episode
    alone = Evaluation(task="maze2d-umaze-v1").evaluate(
        SimpleNamespace(global_rank=0, world_size=1, datamodule=None), _tiny_module(), seeds
    )
    for r in ranks:
        assert sorted(r["lengths"]) == sorted(alone.lengths.tolist())
        assert sorted(r["returns"]) == sorted(alone.returns.tolist())
        assert len(r["returns"]) == len(seeds)


def _can_render() -> bool:
    os.environ.setdefault("MUJOCO_GL", "egl")  # offscreen, as Evaluation(record_video) sets it
    try:
        import imageio  # noqa: F401

        from qt.envs import make_env

        env = make_env("maze2d-umaze-v1", render_mode="rgb_array")
        env.reset(seed=0)
        ok = env.render() is not None
        env.close()
        return ok
    except Exception:
        return False


@pytest.mark.skipif(not _can_render(), reason="no offscreen MuJoCo rendering or imageio here")
def test_record_episode_writes_one_frame_per_step(tmp_path):
    import imageio.v2 as imageio

    from qt.callbacks.evaluation import record_episode

    module = _tiny_module().eval()
    policy = Evaluation(task="maze2d-umaze-v1", max_ep_len=6)._policy(
        SimpleNamespace(global_rank=0, world_size=1, datamodule=None), module
    )
    n = record_episode(policy, "maze2d-umaze-v1", 3, tmp_path / "ep.mp4", fps=10)
    frames = imageio.mimread(tmp_path / "ep.mp4")
    assert n == len(frames) == 6 and frames[0].ndim == 3


def test_video_failure_is_said_once_and_evaluation_goes_on(monkeypatch):
    import qt.callbacks.evaluation as ev

    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        raise RuntimeError("no GL context")

    monkeypatch.setattr(ev, "record_episode", broken)
    logger = SimpleNamespace(run_id="r", experiment=SimpleNamespace(log_artifact=None))
    trainer = SimpleNamespace(global_rank=0, world_size=1, datamodule=None, loggers=[logger])
    cb = Evaluation(task="maze2d-umaze-v1", record_video=True)
    with pytest.warns(UserWarning, match="Rollout videos are off: recording failed"):
        cb._video(trainer, _tiny_module(), 0, "epoch0000")
    cb._video(trainer, _tiny_module(), 1, "epoch0001")  # said once: no second attempt
    assert calls == [1] and cb.record_video is False


def _fit_and_record_starts(monkeypatch, seed: int, **options) -> tuple[list[int], list]:
    """Fit a tiny module for one step with `seed_everything(seed)`; the episode seeds its
    evaluation played and their first observations (the episodes themselves are not run)."""
    import lightning as L

    from qt.acting import episodes
    from qt.data.batch import Segments
    from qt.envs import make_env

    played: list[int] = []

    def record(policy, env_fn, seeds, num_envs=None):
        played.extend(seeds)
        n = len(seeds)
        return episodes.EpisodeStats(np.array(seeds), np.zeros(n), np.ones(n, dtype=np.int64))

    monkeypatch.setattr("qt.callbacks.evaluation.run_episodes", record)
    L.seed_everything(seed)
    module = QTModule(
        state_dim=4, act_dim=2, K=3, max_ep_len=6, scale=10.0, hidden_size=8, n_layer=1,
        n_head=1, env_targets=list(get_task("maze2d-umaze-v1").env_targets), **options,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    mask = torch.ones(2, 3)
    batch = Segments(torch.randn(2, 3, 4, generator=g), torch.rand(2, 3, 2, generator=g),
                     torch.zeros(2, 3, 1), torch.zeros(2, 3), torch.zeros(2, 4, 1),
                     torch.arange(3).expand(2, 3), mask)  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
        callbacks=[Evaluation(num_eval_episodes=4, task="maze2d-umaze-v1")],
    )  # fmt: skip
    trainer.fit(module, torch.utils.data.DataLoader([batch], batch_size=None))
    starts = []
    for s in played:
        env = make_env("maze2d-umaze-v1")
        starts.append(env.reset(seed=s)[0])
        env.close()
    return played, starts


def test_each_seed_plays_its_own_start_states_and_its_variants_the_same(monkeypatch):
    dt = dict(eta=0.0, rtg_no_q=True, infer_no_q=True, train_critic=False,
              next_state_loss=False, optimizer="adamw", lr_decay=False, warmup_steps=10)  # fmt: skip
    qt0, qt0_starts = _fit_and_record_starts(monkeypatch, 0)
    dt0, dt0_starts = _fit_and_record_starts(monkeypatch, 0, **dt)
    qt1, qt1_starts = _fit_and_record_starts(monkeypatch, 1)
    assert qt0 == dt0 == [0, 1, 2, 3]  # seed 0: the set every fit played before
    assert qt1 == [2**32 + i for i in range(4)]
    for a, b in zip(qt0_starts, dt0_starts, strict=True):
        np.testing.assert_array_equal(a, b)
    # seed 1's start states are none of seed 0's
    assert not any(np.array_equal(a, b) for a in qt0_starts for b in qt1_starts)
    assert len({tuple(np.round(x, 9)) for x in qt0_starts}) == 4

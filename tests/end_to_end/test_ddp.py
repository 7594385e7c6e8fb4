"""DDP on 2 CPU processes (gloo): both ranks end with the same actor, critic and target
networks, equal to what the mean of the two ranks' gradients gives; the ranks drew
different segments."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import torch

from qt import losses
from qt.data.batch import Segments
from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5
from qt.module import QTModule, _clip

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3


def _critic_loss(m, b, k, noise_gen, rewards) -> torch.Tensor:
    loss, _, rewards[k] = m._critic_loss(b, noise_gen)  # the rewards the actor step sees
    return loss


def _actor_loss(m, b, rewards, coin) -> torch.Tensor:
    hp = m.hparams
    out = m.actor(b.states, b.actions, rewards, b.rtg[:, :-1], b.timesteps, b.mask)
    bc = losses.bc_loss(out.action_preds, b.actions, out.state_preds, b.states, b.mask,
                        reward_preds=out.reward_preds, rewards=rewards, scale=hp.scale)  # fmt: skip
    m.critic.requires_grad_(False)  # the Q term does not train the critic
    q1, q2 = m.critic(b.states, out.action_preds)
    m.critic.requires_grad_(True)
    return m.eta2 * bc + hp.eta * losses.q_loss(q1, q2, b.mask, coin)


def _mean_gradient_replay(record0: dict, record1: dict) -> dict[str, torch.Tensor]:
    """The training step of QTModule, written out, with each rank's gradient averaged before
    clipping and stepping (what DDP's all-reduce does), then the target-network updates."""
    hp = {k: v for k, v in record0["hparams"].items() if not k.startswith("_")}
    m = QTModule(**hp)
    m.load_state_dict(record0["start"])
    m._steps, m._seed = 0, int(m.rng_seed)
    opts = m.configure_optimizers()
    actor_opt, critic_opt = opts[0] if isinstance(opts, tuple) else opts

    def averaged_step(params, opt, closures):
        grads = []
        for closure in closures:  # in order: the critic closures fill `rewards`
            opt.zero_grad(set_to_none=True)
            closure().backward()
            grads.append([p.grad.clone() for p in params])
        for p, *gs in zip(params, *grads):
            p.grad = torch.stack(gs).mean(0)
        _clip(params, hp["grad_norm"])
        opt.step()

    for i in range(STEPS):
        batches = [Segments(*record0["batches"][i]), Segments(*record1["batches"][i])]
        coin_gen, noise_gen = m._step_generators()
        coin = losses.coin_flip(coin_gen)
        rewards: dict[int, torch.Tensor] = {}
        critic_params = list(m.critic.parameters())
        closures = [
            partial(_critic_loss, m, b, k, noise_gen, rewards) for k, b in enumerate(batches)
        ]
        averaged_step(critic_params, critic_opt, closures)
        actor_params = list(m.actor.parameters())
        closures = [partial(_actor_loss, m, b, rewards[k], coin) for k, b in enumerate(batches)]
        averaged_step(actor_params, actor_opt, closures)
        m._steps += 1
        with torch.no_grad():  # TargetNetworks: Polyak critic every step (no EMA before 1000)
            for t, s in zip(m.critic_target.parameters(), m.critic.parameters()):
                t.lerp_(s, 0.005)
    return {k: v.detach() for k, v in m.state_dict().items()}


def test_two_process_ddp_matches_the_mean_gradient(tmp_path):
    ds = generate("maze2d-umaze-v1", steps=3000, seed=0, ref_episodes=1, max_episode_steps=60)
    data = write_d4rl_hdf5(ds, tmp_path / "maze2d-umaze-sparse-v1.hdf5")
    cmd = [
        sys.executable, str(ROOT / "cli.py"), "fit", "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--data.path", str(data), "--trainer.strategy", "ddp", "--trainer.devices", "2",
        "--trainer.accelerator", "cpu", "--trainer.max_epochs", "1",
        "--data.num_steps_per_iter", str(STEPS), "--model.dropout", "0",
        "--model.embed_dropout", "0", "--model.eta", "1.0", "--trainer.logger", "false",
        "--trainer.callbacks+=tests.support.probe.Probe",
    ]  # fmt: skip
    env = dict(os.environ, QT_PROBE_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["world_size"] == 2 and len(r0["batches"]) == len(r1["batches"]) == STEPS
    # the ranks drew different segments
    for b0, b1 in zip(r0["batches"], r1["batches"]):
        assert not torch.equal(b0[0], b1[0])
    # identical networks on both ranks, at the start and at the end
    for key in r0["end"]:
        assert torch.equal(r0["start"][key], r1["start"][key]), key
        assert torch.equal(r0["end"][key], r1["end"][key]), key
    # equal to the mean gradient of both ranks' batches
    expected = _mean_gradient_replay(r0, r1)
    moved = 0
    for key, value in r0["end"].items():
        if key.startswith(("actor.", "critic.", "critic_target.", "ema_actor.")):
            torch.testing.assert_close(value, expected[key], rtol=1e-5, atol=1e-6, msg=key)
            moved += int(not torch.equal(value, r0["start"][key]))
    assert moved > 10  # training did change the networks

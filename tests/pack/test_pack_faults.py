"""A pack's faults: a member whose loss is not finite stops there and leaves the others as they
would have been without it; a pack stopped by SIGTERM mid-iteration and resumed with
`--ckpt_path last` ends where the uninterrupted pack ends."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import lightning as L
import mlflow
import pytest
import torch

from qt.checkpointing import load_checkpoint
from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5
from qt.pack.fit import fit_pack
from qt.pack.loop import LoopPackedQTModule

ROOT = Path(__file__).resolve().parents[2]


def common(data: Path, save_dir: Path) -> list[str]:
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--data.path", str(data),
            "--trainer.max_epochs", "3", "--model.max_iters", "3",
            "--trainer.logger.init_args.save_dir", str(save_dir)]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    ds = generate("maze2d-umaze-v1", steps=2000, seed=0, ref_episodes=1, max_episode_steps=60)
    return write_d4rl_hdf5(ds, tmp_path_factory.mktemp("faults_data") / "umaze.hdf5")


def last_states(fit) -> list[dict]:
    return [load_checkpoint(m.ckpt_dir / "last.ckpt")["state_dict"] for m in fit.members]


def test_a_nonfinite_member_stops_and_leaves_the_others_untouched(data, tmp_path):
    """eta 1e39 overflows the actor's loss in the first step: that member stops (its critic's
    finite half-step kept, its actor untouched); the other member ends with the parameters of
    a pack without it. Dropout on: each member's streams are its own."""
    args = common(data, tmp_path / "runs")
    bad = ["--seed_everything", "2", "--model.eta", "1e39"]
    with_bad = fit_pack([args + ["--seed_everything", "1"], args + bad],
                        module_class=LoopPackedQTModule)  # fmt: skip
    alone = fit_pack([args + ["--seed_everything", "1"]], module_class=LoopPackedQTModule,
                     pack_dir=tmp_path / "alone")  # fmt: skip
    assert with_bad.module.active.tolist() == [True, False]
    good = load_checkpoint(with_bad.members[0].ckpt_dir / "last.ckpt")["state_dict"]
    ref = last_states(alone)[0]
    assert good.keys() == ref.keys()
    for key in good:
        assert torch.equal(good[key], ref[key]), key
    assert int(good["train_steps"]) == 30

    # the stopped member: no step counted, its actor as it started, its run says why
    m = with_bad.members[1]
    stopped = with_bad.module.member_module(1)
    assert int(stopped.train_steps) == 0
    start = fit_pack([args + bad], module_class=LoopPackedQTModule, run=False).module
    first = start.member_module(0)
    for (name, p), q in zip(stopped.actor.named_parameters(), first.actor.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, q) for p, q in
               zip(stopped.critic.parameters(), first.critic.parameters()))  # fmt: skip
    client = mlflow.MlflowClient(m.logger._tracking_uri)
    run = client.get_run(m.logger.run_id)
    assert run.data.tags["qt.pack.stopped"] == "nonfinite"
    assert [
        (h.step, h.value) for h in client.get_metric_history(run.info.run_id, "train/nonfinite")
    ] == [(0, 1.0)]
    assert "eval/return_mean" not in run.data.metrics
    assert "eval/return_mean" in client.get_run(with_bad.members[0].logger.run_id).data.metrics


class StopAt(L.Callback):
    """SIGTERM to this process after `n` training batches (a scheduler's pre-emption)."""

    def __init__(self, n: int) -> None:
        self.n, self.seen = n, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen += 1
        if self.seen == self.n:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_pack_stopped_by_sigterm_resumes_where_it_was(data, tmp_path, monkeypatch):
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from qt.console import STATUS_ENV

    def members(save_dir: Path) -> list[list[str]]:
        args = common(data, save_dir)
        return [args + ["--seed_everything", "1"],
                args + ["--seed_everything", "2", "--model.eta", "0.5"]]  # fmt: skip

    status = tmp_path / "pack.status.json"
    monkeypatch.setenv(STATUS_ENV, str(status))  # as a study sets it for the pack's process
    whole = fit_pack(members(tmp_path / "a"), module_class=LoopPackedQTModule)
    monkeypatch.delenv(STATUS_ENV)
    # the pack kept its progress there, for the study's progress lines: 3 iterations of 10 steps
    st = json.loads(status.read_text())
    assert (st["iteration"], st["iterations"], st["step"], st["steps"]) == (3, 3, 30, 30)
    assert st["rate"] > 0
    with pytest.raises(SIGTERMException):
        fit_pack(members(tmp_path / "b"), module_class=LoopPackedQTModule, callbacks=[StopAt(15)])
    resumed = fit_pack(members(tmp_path / "b"), module_class=LoopPackedQTModule,
                       ckpt_path="last")  # fmt: skip
    for a, b in zip(last_states(whole), last_states(resumed)):
        assert int(b["train_steps"]) == 30
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # each member's best checkpoint is the uninterrupted one's (its best score survived)
    for m_a, m_b in zip(whole.members, resumed.members):
        [best_a] = m_a.ckpt_dir.glob("best-*.ckpt")
        [best_b] = m_b.ckpt_dir.glob("best-*.ckpt")
        assert best_a.name == best_b.name
        a, b = load_checkpoint(best_a)["state_dict"], load_checkpoint(best_b)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in a)
    # each member went on in its own MLflow run, whose evaluations are the uninterrupted ones
    for m_a, m_b in zip(whole.members, resumed.members):
        client = mlflow.MlflowClient(m_b.logger._tracking_uri)
        ca = mlflow.MlflowClient(m_a.logger._tracking_uri)
        hb = {
            h.step: h.value
            for h in client.get_metric_history(m_b.logger.run_id, "eval/return_mean")
        }
        ha = {h.step: h.value for h in ca.get_metric_history(m_a.logger.run_id, "eval/return_mean")}
        assert ha == hb and len(ha) == 3
        assert client.get_run(m_b.logger.run_id).info.status == "FINISHED"
        assert len(client.search_runs([client.get_run(m_b.logger.run_id).info.experiment_id])) == 2

"""QTDataModule: facts linked to the model, errors in one sentence, and the stream of batches a
fit consumes (continuing across epochs, per rank, from the run's seed)."""

from __future__ import annotations

import h5py
import lightning as L
import numpy as np
import pytest
import torch

from qt.data.datamodule import QTDataModule
from qt.data.sampler import SegmentStream
from qt.module import QTModule
from qt.tasks import get_task


def _write(path, state_dim=4, act_dim=2, lengths=(30, 45, 25, 60), seed=0):
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    timeouts = np.zeros(n, bool)
    timeouts[np.cumsum(lengths) - 1] = True
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(n, state_dim)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32)
        f["rewards"] = (rng.random(n) < 0.2).astype(np.float32)
        f["terminals"] = np.zeros(n, bool)
        f["timeouts"] = timeouts
    return path


@pytest.fixture
def maze_file(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    return _write(tmp_path / get_task("maze2d-umaze-v1").dataset_file)


def test_facts_come_from_the_registry_and_the_data(maze_file):
    dm = QTDataModule("maze2d-umaze-v1", K=5, batch_size=4)
    task = get_task("maze2d-umaze-v1")
    assert (dm.state_dim, dm.act_dim, dm.scale, dm.max_ep_len) == (4, 2, 10.0, 1000)
    assert dm.env_targets == list(task.env_targets)
    with h5py.File(maze_file) as f:
        obs = f["observations"][()]
    np.testing.assert_array_equal(dm.state_mean, obs.mean(axis=0))
    # scores are normalised by D4RL's published reference returns (d4rl/infos.py, by hand)
    assert (dm.ref_min_score, dm.ref_max_score) == (23.85, 161.86)


def test_a_datasets_own_reference_returns_do_not_score(tmp_path, monkeypatch):
    """A generated dataset records the reference returns it measured; scores still use
    D4RL's, so that runs on any file of a task share one scale."""
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    path = _write(tmp_path / get_task("maze2d-umaze-v1").dataset_file)
    with h5py.File(path, "a") as f:
        f.attrs["ref_min_score"], f.attrs["ref_max_score"] = 37.69, 173.12
    dm = QTDataModule("maze2d-umaze-v1", K=5, batch_size=4)
    assert len(dm.store) == 4  # the file, its attributes included, was read
    assert (dm.ref_min_score, dm.ref_max_score) == (23.85, 161.86)


def test_bad_inputs_are_named(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="hopper-medium-v2"):  # close matches listed
        QTDataModule("hopper-meduim-v2")
    with pytest.raises(ValueError, match=r"data\.K=0: expected a whole number >= 1"):
        QTDataModule("maze2d-umaze-v1", K=0)
    with pytest.raises(ValueError, match=r"data\.pct_traj=1\.5"):
        QTDataModule("maze2d-umaze-v1", pct_traj=1.5)
    # a hopper-sized file where the maze's is expected
    _write(tmp_path / get_task("maze2d-umaze-v1").dataset_file, state_dim=11, act_dim=3)
    with pytest.raises(
        ValueError, match="states of size 11 and actions of size 3.*expects 4 and 2"
    ):
        QTDataModule("maze2d-umaze-v1").state_mean  # noqa: B018
    _write(tmp_path / get_task("maze2d-umaze-v1").dataset_file)
    with pytest.raises(ValueError, match="full_windows_only with K=30"):
        QTDataModule("maze2d-umaze-v1", K=30, full_windows_only=True).state_mean  # noqa: B018


class _Record(L.Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch)


def _fit(epochs, steps, seed_env, monkeypatch, seed=None):
    monkeypatch.setenv("PL_GLOBAL_SEED", str(seed_env))
    dm = QTDataModule("maze2d-umaze-v1", K=4, batch_size=3, num_steps_per_iter=steps, seed=seed)
    model = QTModule(
        state_dim=4, act_dim=2, K=4, hidden_size=8, n_layer=1, n_head=1, max_iters=epochs
    )
    rec = _Record()
    trainer = L.Trainer(
        max_epochs=epochs, limit_train_batches=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[rec],
    )  # fmt: skip
    trainer.fit(model, dm)
    return dm, rec.batches


def test_a_fit_consumes_the_stream_in_order_across_epochs(maze_file, monkeypatch):
    dm, batches = _fit(epochs=3, steps=4, seed_env=11, monkeypatch=monkeypatch)
    assert dm.seed == 11 and len(batches) == 12  # the run's seed, 3 epochs of 4 batches
    stream = SegmentStream(dm.store, K=4, batch_size=3, max_ep_len=1000, seed=11)
    for i, batch in enumerate(batches):
        expected = stream.batch(i)  # epoch e starts at batch 4e: no batch repeats or is skipped
        assert all(torch.equal(a, b) for a, b in zip(batch, expected)), i
    # an explicit seed wins over the run's
    dm2, batches2 = _fit(epochs=1, steps=2, seed_env=11, monkeypatch=monkeypatch, seed=5)
    assert dm2.seed == 5 and not torch.equal(batches2[0].states, batches[0].states)


def test_state_dict_carries_the_seed_and_refuses_another_task(maze_file):
    dm = QTDataModule("maze2d-umaze-v1", seed=3)
    state = dm.state_dict()
    other = QTDataModule("maze2d-umaze-v1", seed=9)
    other.load_state_dict(state)
    assert other.seed == 3
    hopper = QTDataModule("hopper-medium-v2")
    with pytest.raises(ValueError, match="trained on task 'maze2d-umaze-v1'"):
        hopper.load_state_dict(state)

"""A pack of three tiny fits (two seeds of QT, one with its own eta and learning rate) against
the same three configurations fitted separately by `cli.py fit`: each member's MLflow run has
the params, tags and metric histories of its separate fit, its checkpoints hold the same
parameters, optimiser and schedule states, and `cli.py test` takes its best checkpoint and
scores it as the separate fit's (dropout 0: the loop module takes every member's exact step)."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import torch

from qt import cli
from qt.checkpointing import load_checkpoint
from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5
from qt.pack.fit import fit_pack
from qt.pack.loop import LoopPackedQTModule

ROOT = Path(__file__).resolve().parents[2]
MEMBERS = (["--seed_everything", "1"],
           ["--seed_everything", "2"],
           ["--seed_everything", "1", "--model.eta", "0.5", "--model.learning_rate", "1e-3",
            "--trainer.logger.init_args.run_name", "variant"])  # fmt: skip


def common(data: Path) -> list[str]:
    return ["--config", str(ROOT / "configs" / "tiny.yaml"), "--data.path", str(data),
            "--model.dropout", "0", "--model.embed_dropout", "0",
            "--trainer.max_epochs", "3", "--model.max_iters", "3",
            "--model.lambda_", "2.0"]  # fmt: skip


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    ds = generate("maze2d-umaze-v1", steps=2000, seed=0, ref_episodes=1, max_episode_steps=60)
    return write_d4rl_hdf5(ds, tmp_path_factory.mktemp("pack_data") / "umaze.hdf5")


def runs_of(folder: Path) -> dict[str, object]:
    client = mlflow.MlflowClient(f"sqlite:///{folder / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("qt")
    found = client.search_runs([exp.experiment_id])
    return client, {r.info.run_name: r for r in found}


@pytest.fixture(scope="module")
def fits(data, tmp_path_factory):
    """(pack folder, separate folder): the same three configurations, packed and not."""
    import os

    here = os.getcwd()
    packed, separate = tmp_path_factory.mktemp("packed"), tmp_path_factory.mktemp("separate")
    try:
        os.chdir(packed)  # save_dir "runs" in each: the runs' params are then the same
        fit_pack([common(data) + m for m in MEMBERS], module_class=LoopPackedQTModule)
        os.chdir(separate)
        for m in MEMBERS:
            cli.main(["fit", *common(data), *m])
    finally:
        os.chdir(here)
    return packed, separate


def _history(client, run) -> dict:
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics}  # fmt: skip


def test_each_member_run_is_its_separate_fit_run(fits):
    (pc, packed), (sc, separate) = runs_of(fits[0]), runs_of(fits[1])
    assert (
        sorted(packed)
        == sorted(separate)
        == sorted(["maze2d-umaze-v1-qt-seed1", "maze2d-umaze-v1-qt-seed2", "variant"])
    )
    for name, theirs in separate.items():
        mine = packed[name]
        assert mine.info.status == theirs.info.status == "FINISHED"
        assert mine.data.params == theirs.data.params, name
        ignore = ("mlflow.source.name",)
        assert {k: v for k, v in mine.data.tags.items() if k not in ignore} == {
            k: v for k, v in theirs.data.tags.items() if k not in ignore
        }
        a, b = _history(pc, mine), _history(sc, theirs)
        assert a.keys() == b.keys() and "train/bc_loss" in a and "eval/return_mean" in a
        for key in a:
            assert a[key] == b[key], (name, key)
        # the members really differ (their seeds, their settings)
    losses = {n: _history(pc, r)["train/bc_loss"] for n, r in packed.items()}
    assert len({tuple(v) for v in losses.values()}) == 3
    assert {a.path for a in pc.list_artifacts(packed["variant"].info.run_id)} == {
        a.path for a in sc.list_artifacts(separate["variant"].info.run_id)
    }


def _ckpts(folder: Path, run) -> dict[str, dict]:
    d = folder / "runs" / run.info.experiment_id / run.info.run_id / "checkpoints"
    return {p.name: load_checkpoint(p) for p in d.glob("*.ckpt")}


def _equal(a, b, where: str) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k in ("dirpath", "best_model_path", "kth_best_model_path", "last_model_path"):
                continue
            if k == "best_k_models":
                assert [Path(p).name for p in a[k]] == [Path(p).name for p in b[k]], where
                continue
            _equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for j, (x, y) in enumerate(zip(a, b)):
            _equal(x, y, f"{where}[{j}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def test_each_member_checkpoint_is_its_separate_fit_checkpoint(fits):
    (_, packed), (_, separate) = runs_of(fits[0]), runs_of(fits[1])
    for name in separate:
        mine, theirs = _ckpts(fits[0], packed[name]), _ckpts(fits[1], separate[name])
        assert mine.keys() == theirs.keys() and "last.ckpt" in mine, name
        for file in mine:
            a, b = mine[file], theirs[file]
            for key in ("state_dict", "optimizer_states", "lr_schedulers", "hyper_parameters",
                        "callbacks", "epoch", "global_step", "QTDataModule"):  # fmt: skip
                _equal(a[key], b[key], f"{name}/{file}/{key}")


def test_cli_test_takes_a_member_best_checkpoint(fits, data, capsys):
    import os

    (_, packed), (_, separate) = runs_of(fits[0]), runs_of(fits[1])
    scores = []
    for folder, runs in ((fits[0], packed), (fits[1], separate)):
        run = runs["variant"]
        [best] = (folder / "runs" / run.info.experiment_id / run.info.run_id).glob(
            "checkpoints/best-*.ckpt"
        )
        here = os.getcwd()
        os.chdir(folder)
        try:
            tested = cli.main(["test", *common(data), *MEMBERS[2], "--ckpt_path", str(best),
                               "--trainer.logger.init_args.run_name", "variant-test"])  # fmt: skip
        finally:
            os.chdir(here)
        scores.append(float(tested.trainer.callback_metrics["test/return_mean"]))
    assert scores[0] == scores[1]


def test_the_batched_module_trains_a_pack_as_the_loop_does(data, tmp_path):
    """The same pack through the plumbing with the batched `PackedQTModule` (eager, float32)
    and with the loop: the members' last checkpoints agree to float tolerance."""
    from qt.pack.module import PackedQTModule

    def run(module_class, where: Path, **options):
        args = [*common(data), "--trainer.logger.init_args.save_dir", str(where)]
        fit = fit_pack([args + m for m in MEMBERS[:2]], module_class=module_class,
                       module_options=options or None)  # fmt: skip
        return [load_checkpoint(m.ckpt_dir / "last.ckpt") for m in fit.members]

    loop = run(LoopPackedQTModule, tmp_path / "loop")
    batched = run(PackedQTModule, tmp_path / "batched", compile=False, autocast=False)
    for a, b in zip(loop, batched):
        assert a["state_dict"].keys() == b["state_dict"].keys()
        assert int(b["state_dict"]["train_steps"]) == 30
        for key, value in a["state_dict"].items():
            torch.testing.assert_close(b["state_dict"][key], value, rtol=1e-4, atol=1e-5,
                                       msg=key)  # fmt: skip
        _equal(a["lr_schedulers"], b["lr_schedulers"], "lr_schedulers")

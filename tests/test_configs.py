"""Every config in configs/ goes through the CLI parser, instantiates, and re-runs from
`--print_config`; the per-task configs agree with the registry."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import yaml

from qt import cli as qt_cli
from qt.tasks import get_task

ROOT = Path(__file__).resolve().parents[1]
BASE = qt_cli.BASE_CONFIG  # qt/configs/base.yaml, package data
# every fit config (study files, configs/studies/, are checked by tests/study/test_study.py)
CONFIGS = [BASE, *sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "studies" not in p.parts)]
TASK_CONFIGS = sorted((ROOT / "configs" / "d4rl").glob("*.yaml"))


def _load_generator():
    spec = importlib.util.spec_from_file_location(
        "qt_configs_generate", ROOT / "configs" / "generate.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write_fake_d4rl(path: Path, state_dim: int, act_dim: int, n: int = 120, seed: int = 0) -> None:
    """A tiny D4RL-format file with the task's sizes: 4 trajectories of 30 steps."""
    rng = np.random.default_rng(seed)
    timeouts = np.zeros(n, bool)
    timeouts[29::30] = True
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(n, state_dim)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32)
        f["rewards"] = rng.normal(size=n).astype(np.float32)
        f["terminals"] = np.zeros(n, bool)
        f["timeouts"] = timeouts


def _cli(args: list[str], run: bool = False):
    return qt_cli.main(args, run=run)


@pytest.fixture
def fake_d4rl_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tmp_path


def test_task_configs_are_generated_from_the_registry():
    expected = _load_generator().expected_files()
    assert sorted(expected) == TASK_CONFIGS
    for path, text in expected.items():
        assert path.read_text() == text, f"{path.name} is stale: run python configs/generate.py"


def test_every_published_task_has_a_config():
    # The tasks of docs/algorithm.md §6, written out independently of the registry.
    published = [
        "halfcheetah-medium", "halfcheetah-medium-replay", "halfcheetah-medium-expert",
        "hopper-medium", "hopper-medium-replay", "hopper-medium-expert",
        "walker2d-medium", "walker2d-medium-replay", "walker2d-medium-expert",
        "pen-human", "pen-cloned", "hammer-human", "hammer-cloned", "door-human", "door-cloned",
        "kitchen-complete", "kitchen-partial", "maze2d-open", "maze2d-open-dense",
        "maze2d-umaze", "maze2d-umaze-dense", "maze2d-medium", "maze2d-medium-dense",
        "maze2d-large", "maze2d-large-dense", "antmaze-umaze", "antmaze-umaze-diverse",
        "antmaze-medium-diverse", "antmaze-large-diverse",
    ]  # fmt: skip
    assert sorted(p.stem for p in TASK_CONFIGS) == sorted(published)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_config_instantiates_through_the_cli(path, fake_d4rl_dir):
    cfg = yaml.safe_load(path.read_text()) or {}
    task_name = (cfg.get("data") or {}).get("task")
    if task_name is None:  # base.yaml alone names no task
        task_name = "maze2d-umaze-v1"
    task = get_task(task_name)
    _write_fake_d4rl(fake_d4rl_dir / task.dataset_file, task.state_dim, task.act_dim)
    args = ["--config", str(path), "--data.task", task_name, "--trainer.logger", "false"]
    args += ["--data.path", str(fake_d4rl_dir / task.dataset_file)]  # demo.yaml names a file
    cli = _cli(args)
    model, data = cli.model, cli.datamodule
    assert model.hparams.state_dim == task.state_dim and model.hparams.act_dim == task.act_dim
    assert model.hparams.K == data.K
    assert model.hparams.scale == task.scale
    assert list(model.hparams.env_targets) == list(task.env_targets)
    np.testing.assert_allclose(model.state_mean.numpy(), data.state_mean, rtol=1e-6)
    if path in TASK_CONFIGS:
        p = task.published
        assert model.hparams.eta == p.eta and model.hparams.grad_norm == p.grad_norm
        assert model.hparams.max_iters == p.max_iters and data.K == p.K
        assert cli.trainer.max_epochs == (p.early_epoch + 1 if p.early_stop else p.max_iters)
        assert cli.trainer.limit_train_batches == p.num_steps_per_iter


def test_print_config_reruns_to_the_same_result(fake_d4rl_dir, tmp_path, capsys):
    task = get_task("hopper-medium-v2")
    _write_fake_d4rl(fake_d4rl_dir / task.dataset_file, task.state_dim, task.act_dim)
    config = ROOT / "configs" / "d4rl" / "hopper-medium.yaml"
    with pytest.raises(SystemExit):
        _cli(["fit", "--config", str(config), "--print_config"], run=True)
    printed = capsys.readouterr().out
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    with pytest.raises(SystemExit):
        _cli(["fit", "--config", str(saved), "--print_config"], run=True)
    assert capsys.readouterr().out == printed
    resolved = yaml.safe_load(printed)
    assert resolved["model"]["eta"] == 1.0 and resolved["data"]["full_windows_only"] is True
    # the subcommand read qt/configs/base.yaml first: its callbacks and logger are there
    classes = [c["class_path"] for c in resolved["trainer"]["callbacks"]]
    assert "qt.callbacks.artifacts.MLflowArtifacts" in classes
    assert resolved["targets"]["step_start_ema"] == 1000
    assert resolved["trainer"]["logger"]["class_path"] == "qt.tracking.MLFlowLogger"


def _resolved(path: Path, fake_dir: Path):
    """The CLI's resolved config and instantiated trainer callbacks for one config file."""
    task = get_task("maze2d-umaze-v1")
    _write_fake_d4rl(fake_dir / task.dataset_file, task.state_dim, task.act_dim)
    args = ["--config", str(path), "--trainer.logger", "false", "--data.task", task.name]
    args += ["--data.path", str(fake_dir / task.dataset_file)]
    cli = _cli(args)
    return cli.config.as_dict(), cli.trainer.callbacks


@pytest.mark.parametrize(
    "name, changed",
    [
        ("base", {}),
        # what configs/demo.yaml and configs/tiny.yaml used to state by repeating base.yaml's
        # whole callback list: only these numbers differ from base.yaml's evaluation
        ("demo", {"num_eval_episodes": 5}),
        ("tiny", {"num_eval_episodes": 2, "test_episodes": 2, "max_ep_len": 50}),
    ],
)
def test_configs_state_only_their_evaluation_numbers_and_inherit_the_rest(
    name, changed, fake_d4rl_dir
):
    from qt.callbacks.evaluation import Evaluation
    from qt.callbacks.targets import TargetNetworks

    path = BASE if name == "base" else ROOT / "configs" / f"{name}.yaml"
    if name != "base":  # the file itself repeats no callback
        assert "callbacks" not in (yaml.safe_load(path.read_text())["trainer"] or {})
    config, callbacks = _resolved(path, fake_d4rl_dir)
    base, _ = _resolved(BASE, fake_d4rl_dir)
    # the callback list is base.yaml's, untouched
    assert config["trainer"]["callbacks"] == base["trainer"]["callbacks"]
    classes = [c["class_path"].rsplit(".", 1)[1] for c in config["trainer"]["callbacks"]]
    assert classes == ["EarlyStopping", "ModelCheckpoint", "ModelCheckpoint", "MLflowArtifacts",
                       "Console", "SaveOnSigterm"]  # fmt: skip
    # the evaluation is base.yaml's with the stated numbers changed, typed out here
    published = {"num_eval_episodes": 10, "test_episodes": 10, "eval_every_n_epochs": 1,
                 "num_envs": None, "seed": None, "max_ep_len": None, "task": None,
                 "record_video": False, "video_fps": 30}  # fmt: skip
    assert config["evaluation"] == {**published, **changed}
    # and the trainer gets exactly one Evaluation callback with those numbers
    [evaluation] = [cb for cb in callbacks if isinstance(cb, Evaluation)]
    for key, value in {**published, **changed}.items():
        assert getattr(evaluation, key) == value, key
    # exactly one TargetNetworks callback, with the published schedule
    [targets] = [cb for cb in callbacks if isinstance(cb, TargetNetworks)]
    assert (targets.ema_decay, targets.step_start_ema, targets.update_ema_every, targets.tau) == (
        0.995, 1000, 5, 0.005,
    )  # fmt: skip


def test_evaluation_numbers_are_set_alone_on_the_command_line(fake_d4rl_dir):
    from qt.callbacks.evaluation import Evaluation

    task = get_task("maze2d-umaze-v1")
    _write_fake_d4rl(fake_d4rl_dir / task.dataset_file, task.state_dim, task.act_dim)
    cli = _cli(["--config", str(ROOT / "configs" / "demo.yaml"), "--trainer.logger", "false",
                "--data.path", str(fake_d4rl_dir / task.dataset_file),
                "--evaluation.test_episodes", "7"])  # fmt: skip
    [evaluation] = [cb for cb in cli.trainer.callbacks if isinstance(cb, Evaluation)]
    assert (evaluation.num_eval_episodes, evaluation.test_episodes) == (5, 7)


@pytest.mark.parametrize("given", [None, "high", "medium", "highest"])
def test_float32_matmul_precision_is_set_from_the_config(fake_d4rl_dir, given):
    task = get_task("maze2d-umaze-v1")
    _write_fake_d4rl(fake_d4rl_dir / task.dataset_file, task.state_dim, task.act_dim)
    before = torch.get_float32_matmul_precision()
    args = ["--config", str(ROOT / "configs" / "tiny.yaml"), "--trainer.logger", "false",
            "--data.path", str(fake_d4rl_dir / task.dataset_file)]  # fmt: skip
    # start from a setting that differs from the one expected, so a no-op cannot pass
    expected = given or "highest"
    torch.set_float32_matmul_precision("medium" if expected != "medium" else "highest")
    try:
        _cli(args + (["--float32_matmul_precision", given] if given else []))
        assert torch.get_float32_matmul_precision() == expected
    finally:
        torch.set_float32_matmul_precision(before)


def test_an_unknown_float32_matmul_precision_is_refused(fake_d4rl_dir, capsys):
    with pytest.raises(SystemExit):
        _cli(
            ["--config", str(ROOT / "configs" / "tiny.yaml"), "--float32_matmul_precision", "tf32"]
        )
    err = capsys.readouterr().err
    # the error itself, not the usage text (which names the option whatever went wrong)
    line = "error: --float32_matmul_precision tf32: expected one of 'highest', 'high', 'medium'; "
    assert err.startswith(line) and err.count("\n") == 1  # one line, no usage above it


def test_the_demo_is_the_maze2d_medium_width_64_study_cut_to_two_iterations(fake_d4rl_dir):
    # the README says the demo is seed 0 of configs/studies/maze2d-medium-cpu-w64.yaml stopped
    # after its second iteration: every setting but the number of iterations (and where MLflow
    # files the runs) must be the study's fit config's, the learning-rate schedule included
    import qt.demo

    study_file = yaml.safe_load((ROOT / "configs/studies/maze2d-medium-cpu-w64.yaml").read_text())
    assert study_file["config"] == "configs/cpu/maze2d-medium-w64.yaml"
    demo_path, study_path = ROOT / "configs/demo.yaml", ROOT / study_file["config"]
    tasks = [yaml.safe_load(p.read_text())["data"]["task"] for p in (demo_path, study_path)]
    assert tasks == [qt.demo.TASK, "maze2d-medium-v1"] and qt.demo.TASK == "maze2d-medium-v1"
    demo, _ = _resolved(demo_path, fake_d4rl_dir)
    study, _ = _resolved(study_path, fake_d4rl_dir)
    assert (demo["trainer"]["max_epochs"], study["trainer"]["max_epochs"]) == (2, 3)
    # T_max of the cosine decay is the published 100 iterations in both, not the run's length
    assert demo["model"]["max_iters"] == study["model"]["max_iters"] == 100
    for section in ("model", "data", "evaluation", "targets", "seed_everything"):
        assert demo[section] == study[section], section
    differ = {k for k in demo["trainer"] if demo["trainer"][k] != study["trainer"][k]}
    assert differ == {"max_epochs"}

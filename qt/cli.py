"""qt's command line: `qt fit|validate|test --config configs/...` (also `python cli.py ...`).

qt/configs/base.yaml, shipped with the package, is always read first (trainer, logger,
callbacks); a config holds only what differs from it. Facts of the data (state/action sizes, state mean/std, scale,
max_ep_len, the conditioning targets) are linked from the data module to the model, so no
config repeats them.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Literal

import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qt.callbacks.evaluation import Evaluation
from qt.callbacks.targets import TargetNetworks
from qt.checkpointing import CheckpointError, load_checkpoint
from qt.console import quiet
from qt.data.datamodule import QTDataModule
from qt.errors import UserError, parser_error, report, storage_failure
from qt.module import QTModule
from qt.runtime import keep_freed_memory
from qt.tasks import get_task
from qt.tracking import legacy_identities, resume_checkpoint, run_name, run_tags

# package data, so that it is found wherever qt is installed and from any working directory
BASE_CONFIG = Path(__file__).resolve().parent / "configs" / "base.yaml"
SUBCOMMANDS = ("fit", "validate", "test", "predict")


def _floats(values) -> list[float]:
    return [float(v) for v in values]


def _flatten(tree, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"model.eta": "1.0", ...}; lists and classes stay one value."""
    if isinstance(tree, dict):
        flat: dict[str, str] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: str(tree)}


class MLflowConfig(SaveConfigCallback):
    """The resolved config of a run as MLflow params (`config.<key>`) and as `config.yaml`.

    Params are cut to MLflow's length limit by the logger; the YAML artifact is whole and
    re-runnable (`qt fit --config config.yaml`).
    """

    def save_config(self, trainer, pl_module, stage: str) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)]
        if not loggers:
            return
        text = self.parser.dump(self.config, skip_none=False)
        flat = _flatten(self.config.as_dict())
        for logger in loggers:
            params = {f"config.{k}": v for k, v in flat.items()}
            # A resumed fit (`--ckpt_path last`) logs into its earlier run, whose params MLflow
            # will not change: log what is new, and the resumed config beside the first one.
            logged = logger.experiment.get_run(logger.run_id).data.params
            name = self.config_filename
            if logged:
                params = {k: v for k, v in params.items() if k not in logged}
                name = f"{Path(name).stem}-resumed{Path(name).suffix}"
            if params:
                logger.log_hyperparams(params)
            logger.experiment.log_text(logger.run_id, text, name)


class QTArgumentParser(LightningArgumentParser):
    """Lightning's parser, but a bad argument is one line naming it and a hint to --help,
    not a hundred lines of usage above it."""

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        if not self.exit_on_error:
            return super().error(message, ex)
        parser = getattr(ex, "subcommand_parser", None) or self
        # `python -m qt fit` is the `qt` command; argparse would call it `__main__.py`
        parser_error(parser.prog.replace("__main__.py", "qt"), message)


# the least free space a fit starts with: the store, a few checkpoints and plots
MIN_FREE_BYTES = 64 * 2**20


def _check_store(save_dir: str | Path) -> None:
    """The folder of the MLflow store and checkpoints is writable and not full: one sentence
    before anything is created (MLflow's own error is a traceback under a parser's error)."""
    import shutil
    import tempfile

    folder = Path(save_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".qt-write-check-"):
            pass
    except OSError as err:
        raise UserError(
            f"{folder}/ (trainer.logger.init_args.save_dir) cannot be written "
            f"({err.strerror or err}): expected a folder this user can write runs to; choose "
            "another with --trainer.logger.init_args.save_dir."
        ) from None
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise UserError(
            f"{folder}/ (trainer.logger.init_args.save_dir) has {free / 2**20:.1f} MB free: "
            f"expected at least {MIN_FREE_BYTES // 2**20} MB for the run's store and "
            "checkpoints; free some space or choose another folder."
        )


class QTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The Evaluation callback is always there and set on its own (`evaluation:` in a config,
        # `--evaluation.num_eval_episodes 5`), so a config changes one number, not the list.
        parser.add_lightning_class_args(Evaluation, "evaluation")
        # Likewise the target networks' schedule (`targets:`, `--targets.step_start_ema 100`).
        parser.add_lightning_class_args(TargetNetworks, "targets")
        parser.link_arguments("data.K", "model.K", apply_on="parse")
        # One iteration (epoch) is num_steps_per_iter training steps.
        parser.link_arguments(
            "data.num_steps_per_iter", "trainer.limit_train_batches", apply_on="parse"
        )
        parser.add_argument(
            "--episodes",
            type=int | None,
            default=None,
            help="test/validate: evaluation episodes (sets Evaluation.test_episodes; "
            "10 by default, 100 for final numbers).",
        )
        parser.add_argument(
            "--float32_matmul_precision",
            type=Literal["highest", "high", "medium"],
            default="highest",
            help="torch.set_float32_matmul_precision for the run: 'highest' is full fp32 (the "
            "published runs); 'high' lets a GPU's tensor cores multiply float32 matrices in "
            "TF32, 'medium' in bf16. Set for every run, so an unset option means 'highest'. "
            "Matrix products only; trainer.precision is separate.",
        )
        for name in ("state_dim", "act_dim", "max_ep_len", "scale"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        for name in ("state_mean", "state_std", "env_targets"):
            parser.link_arguments(
                f"data.{name}", f"model.{name}", compute_fn=_floats, apply_on="instantiate"
            )

    def before_instantiate_classes(self) -> None:
        config = self.config.get(self.subcommand, self.config)
        torch.set_float32_matmul_precision(config.get("float32_matmul_precision") or "highest")
        # Name and tag the MLflow run by task, variant and seed (qt.tracking.run_tags); a name
        # or tags the config gives win, except qt's identity tags, which `last` searches by.
        logger = config.get("trainer", {}).get("logger")
        if not (isinstance(logger, dict) or hasattr(logger, "init_args")):
            return
        init_args = logger["init_args"] if isinstance(logger, dict) else logger.init_args
        if not init_args.get("tracking_uri") or str(init_args["tracking_uri"]).startswith(
            "sqlite:"
        ):
            _check_store(init_args.get("save_dir") or "runs")
        model = _as_dict(config.get("model"))
        model["K"] = config["data"]["K"]
        task, seed = config["data"]["task"], config["seed_everything"]
        named = init_args.get("run_name") is not None
        evaluating = self.subcommand in ("test", "validate")
        if not named:  # a test run is named as one: `m2d-umaze/qt/s123/test`
            kind = self.subcommand if evaluating else ""
            init_args["run_name"] = run_name(task, seed, model, kind)
        init_args["tags"] = run_tags(task, seed, model, init_args.get("tags"))
        ckpt = config.get("ckpt_path")
        if evaluating and isinstance(ckpt, str):
            # tags the caller set win: a study files its tests under the study's run
            init_args["tags"] = {**_fit_run_tags(ckpt, init_args), **init_args["tags"]}
        if self.subcommand == "fit" and isinstance(ckpt, str) and _is_run_ref(ckpt):
            earlier = legacy_identities(task, seed, model)
            config["ckpt_path"] = resume_checkpoint(init_args, ckpt, named, earlier)
            _check_checkpoint(config["ckpt_path"], config, self.subcommand)

    def _prepare_subcommand_parser(self, klass, subcommand: str, **kwargs):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("test", "validate"):
            # the Evaluation callback prints qt's results table; Lightning's own is a second
            parser.set_defaults(verbose=False)
        return parser

    def _parse_ckpt_path(self) -> None:
        # Lightning reads the checkpoint's hyperparameters here, with torch.load: check the
        # file first (readable, a qt model of this task), so a bad one stops in one sentence.
        sub = self.config.get("subcommand")
        if sub == "fit":
            _check_limits(self.config[sub])
        if sub:
            ckpt = self.config[sub].get("ckpt_path")
            if isinstance(ckpt, str) and not _is_run_ref(ckpt) and ckpt not in LIGHTNING_CKPT:
                _check_checkpoint(ckpt, self.config[sub], sub)
        super()._parse_ckpt_path()

    def _set_test_episodes(self) -> None:
        episodes = self.config[self.subcommand].get("episodes")
        if episodes is None:
            return
        if episodes < 1:
            raise UserError(f"--episodes {episodes}: expected a whole number >= 1.")
        found = [cb for cb in self.trainer.callbacks if isinstance(cb, Evaluation)]
        if not found:
            raise UserError(
                "--episodes: the config has no qt.callbacks.evaluation.Evaluation callback "
                "in trainer.callbacks to run them."
            )
        for cb in found:
            cb.test_episodes = episodes

    def before_test(self) -> None:
        self._set_test_episodes()

    def before_validate(self) -> None:
        self._set_test_episodes()


def _fit_run_tags(ckpt: str, init_args) -> dict[str, str]:
    """Tags linking a test or validate run to the fit run that wrote its checkpoint: found
    from where fits keep checkpoints (`<save_dir>/<experiment id>/<run id>/checkpoints/`).
    `qt.fit_run` always; MLflow's `mlflow.parentRunId` too when the fit run is in the same
    experiment, so the UI lists the test under its fit."""
    import mlflow

    from qt.tracking import default_tracking_uri, store_lock

    path = Path(ckpt).resolve()
    if path.parent.name != "checkpoints" or len(path.parents) < 4:
        return {}
    run_id, experiment_id = path.parents[1].name, path.parents[2].name
    save_dir = init_args.get("save_dir") or "runs"
    uri = init_args.get("tracking_uri") or default_tracking_uri(save_dir)
    try:
        with store_lock(uri):
            run = mlflow.MlflowClient(uri).get_run(run_id)
            exp = mlflow.MlflowClient(uri).get_experiment_by_name(
                init_args.get("experiment_name") or "qt"
            )
    except Exception:  # not a run of this store: no link, the test runs all the same
        return {}
    if run.info.experiment_id != experiment_id:
        return {}
    tags = {"qt.fit_run": run_id}
    if exp is not None and exp.experiment_id == run.info.experiment_id:
        tags["mlflow.parentRunId"] = run_id
    return tags


def _as_dict(tree) -> dict:
    if tree is None:
        return {}
    return dict(tree.as_dict() if hasattr(tree, "as_dict") else tree)


LIGHTNING_CKPT = ("best", "last", "hpc", "registry")  # names Lightning resolves itself


class NothingToTrain(Exception):
    """A fit asked to resume a checkpoint that has already trained all it was asked to."""


def _trained(ckpt: dict) -> tuple[int, int]:
    """(iterations whose training is done, optimizer steps) of a checkpoint; a checkpoint
    written mid-iteration (SIGTERM) counts only the iterations before it."""
    progress = ckpt.get("loops", {}).get("fit_loop", {}).get("epoch_progress", {})
    done = progress.get("current", {}).get("processed")
    if done is None:  # a checkpoint without loop state: written at an iteration's end
        done = int(ckpt.get("epoch", -1)) + 1
    return int(done), int(ckpt.get("global_step", 0))


def _room_left(path: str, ckpt: dict, config) -> None:
    """Raise NothingToTrain when `ckpt` has trained trainer.max_epochs iterations (or
    trainer.max_steps steps) already: a resume would train nothing and only rewrite its run."""
    trainer = config.get("trainer") or {}
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    done, steps = _trained(ckpt)
    if max_epochs is not None and max_epochs >= 0 and done >= max_epochs:
        limit = f"trainer.max_epochs is {max_epochs}"
    elif max_steps is not None and max_steps > 0 and steps >= max_steps:
        limit = f"trainer.max_steps is {max_steps}"
    else:
        return
    raise NothingToTrain(
        f"Nothing to train: {path} has trained {done} iterations ({steps} optimizer steps) and "
        f"{limit}; the run is left as it is. To train on, raise --trainer.max_epochs."
    )


def _check_limits(config) -> None:
    """Trainer limits that would start a run and train nothing, or that Lightning rejects with
    a traceback: one sentence before anything is created."""
    trainer = config.get("trainer") or {}
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps")
    if max_epochs is not None and max_epochs != -1 and max_epochs < 1:
        raise UserError(
            f"--trainer.max_epochs {max_epochs}: expected a number of iterations >= 1 "
            "(or -1 for no limit); a fit of 0 iterations would leave an empty run."
        )
    if max_steps is not None and max_steps != -1 and max_steps < 1:
        raise UserError(
            f"--trainer.max_steps {max_steps}: expected a number of optimizer steps >= 1, "
            "or -1 for no limit."
        )


def _check_checkpoint(path: str, config, subcommand: str) -> None:
    """Stop with one sentence naming `path` unless it is a readable qt checkpoint whose model
    has the task's state and action sizes (and, to resume a fit, was trained on the task)."""
    ckpt = load_checkpoint(path)  # CheckpointError naming the file when it cannot be read
    hp = ckpt.get("hyper_parameters") or {}
    if "state_dim" not in hp or "act_dim" not in hp or "state_dict" not in ckpt:
        raise CheckpointError(
            f"Checkpoint {path} holds no qt model (no state_dim/act_dim hyperparameters): "
            "expected a checkpoint written by `cli.py fit`."
        )
    task = get_task(config["data"]["task"])
    if (hp["state_dim"], hp["act_dim"]) != (task.state_dim, task.act_dim):
        raise CheckpointError(
            f"Checkpoint {path} is of a model with states of size {hp['state_dim']} and actions "
            f"of size {hp['act_dim']}, but task {task.name!r} (data.task) has {task.state_dim} "
            f"and {task.act_dim}: expected a checkpoint of this task."
        )
    trained_on = (ckpt.get("QTDataModule") or {}).get("task")
    if subcommand == "fit" and trained_on is not None and trained_on != task.name:
        raise CheckpointError(
            f"Checkpoint {path} was trained on task {trained_on!r}, but data.task is "
            f"{task.name!r}: expected a checkpoint of the same task to resume."
        )
    if subcommand == "fit":
        _room_left(path, ckpt, config)


def _is_run_ref(ckpt: str) -> bool:
    return ckpt == "last" or ckpt.startswith("run:")


def main(args: list[str] | None = None, run: bool = True) -> QTCLI:
    """Build the CLI; `run=False` parses and instantiates without running a subcommand."""
    keep_freed_memory()
    quiet()
    return _build(args, run)


def _build(args: list[str] | None, run: bool) -> QTCLI:
    return QTCLI(
        QTModule,
        QTDataModule,
        seed_everything_default=123,
        # base.yaml under every subcommand (with subcommands, the top-level parser knows none
        # of its keys), and at the top level when run=False parses without subcommands
        parser_kwargs={
            "default_config_files": [str(BASE_CONFIG)] if not run else [],
            **{sub: {"default_config_files": [str(BASE_CONFIG)]} for sub in SUBCOMMANDS},
        },
        parser_class=QTArgumentParser,
        save_config_callback=MLflowConfig,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
        args=args,
        run=run,
    )


def run(args: list[str] | None = None) -> int:
    """`qt fit|validate|test ...`: the exit status; a user's bad input is one line, status 2."""
    try:
        main(args)
    except NothingToTrain as done:  # a finished run resumed: said, and left as it is
        print(done, file=sys.stderr)
        return 0
    except SIGTERMException:  # the checkpoint is written (qt.callbacks.sigterm.SaveOnSigterm)
        print("Stopped by SIGTERM; resume with --ckpt_path last.", file=sys.stderr)
        return 143
    except UserError as err:  # QT_TRACEBACK=1 shows where it came from
        return report(err)
    except Exception as err:  # a full or read-only disk mid-fit: one sentence, not MLflow's
        sentence = storage_failure(err)
        if sentence is None:
            raise
        return report(UserError(sentence))
    return 0


def resolved_config(args: list[str]) -> dict:
    """The config `qt SUBCOMMAND ARGS` would run, as a dict: what `--print_config` prints,
    parsed by the parser itself (base.yaml, the configs, the overrides and the links applied;
    nothing instantiated or run). A rejected argument raises SystemExit, the parser's message
    on stderr."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            _build([*args, "--print_config"], run=True)
        except SystemExit as stop:
            if stop.code not in (0, None):
                raise
    return yaml.safe_load(out.getvalue())


if __name__ == "__main__":
    sys.exit(run())

"""qt's command line: `python cli.py fit|validate|test --config configs/...`.

configs/base.yaml is always read first (trainer, logger, callbacks); a task config holds only
what differs from it. Facts of the data (state/action sizes, state mean/std, scale,
max_ep_len, the conditioning targets) are linked from the data module to the model, so no
config repeats them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import MLFlowLogger

from qt.callbacks.evaluation import Evaluation
from qt.data.datamodule import QTDataModule
from qt.module import QTModule
from qt.runtime import keep_freed_memory

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
    re-runnable (`python cli.py fit --config config.yaml`).
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


class QTCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # The Evaluation callback is always there and set on its own (`evaluation:` in a config,
        # `--evaluation.num_eval_episodes 5`), so a config changes one number, not the list.
        parser.add_lightning_class_args(Evaluation, "evaluation")
        parser.link_arguments("data.K", "model.K", apply_on="parse")
        # One iteration (epoch) is num_steps_per_iter training steps.
        parser.link_arguments(
            "data.num_steps_per_iter", "trainer.limit_train_batches", apply_on="parse"
        )
        parser.add_argument(
            "--episodes",
            type=int | None,
            default=None,
            help="cli.py test/validate: evaluation episodes (sets Evaluation.test_episodes; "
            "10 by default, 100 for final numbers).",
        )
        for name in ("state_dim", "act_dim", "max_ep_len", "scale"):
            parser.link_arguments(f"data.{name}", f"model.{name}", apply_on="instantiate")
        for name in ("state_mean", "state_std", "env_targets"):
            parser.link_arguments(
                f"data.{name}", f"model.{name}", compute_fn=_floats, apply_on="instantiate"
            )

    def before_instantiate_classes(self) -> None:
        # Name the MLflow run after task and seed unless the config names it.
        config = self.config.get(self.subcommand, self.config)
        logger = config.get("trainer", {}).get("logger")
        if isinstance(logger, dict) or hasattr(logger, "init_args"):
            init_args = logger["init_args"] if isinstance(logger, dict) else logger.init_args
            if init_args.get("run_name") is None:
                init_args["run_name"] = f"{config['data']['task']}-seed{config['seed_everything']}"
            if self.subcommand == "fit" and config.get("ckpt_path") == "last":
                config["ckpt_path"] = _resume_last(init_args)

    def _set_test_episodes(self) -> None:
        episodes = self.config[self.subcommand].get("episodes")
        if episodes is None:
            return
        if episodes < 1:
            raise SystemExit(f"error: --episodes {episodes}: expected a whole number >= 1.")
        from qt.callbacks.evaluation import Evaluation

        found = [cb for cb in self.trainer.callbacks if isinstance(cb, Evaluation)]
        if not found:
            raise SystemExit(
                "error: --episodes: the config has no qt.callbacks.evaluation.Evaluation callback "
                "in trainer.callbacks to run them."
            )
        for cb in found:
            cb.test_episodes = episodes

    def before_test(self) -> None:
        self._set_test_episodes()

    def before_validate(self) -> None:
        self._set_test_episodes()


def _resume_last(init_args) -> str:
    """`--ckpt_path last` with MLflow: the newest run of this name that left a last.ckpt.

    Its run id goes to the logger, so the resumed fit logs into the same MLflow run and
    ModelCheckpoint keeps writing to the same folder (`<save_dir>/<experiment>/<run>/`).
    """
    import mlflow

    from qt.tracking import default_tracking_uri

    save_dir = Path(init_args.get("save_dir") or "runs")
    uri = init_args.get("tracking_uri") or default_tracking_uri(save_dir)
    name, experiment = init_args["run_name"], init_args.get("experiment_name") or "qt"
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = [] if exp is None else client.search_runs(
        [exp.experiment_id], filter_string=f"tags.mlflow.runName = '{name}'",
        order_by=["attributes.start_time DESC"], max_results=50,
    )  # fmt: skip
    for run in runs:
        last = save_dir / run.info.experiment_id / run.info.run_id / "checkpoints" / "last.ckpt"
        if last.is_file():
            init_args["run_id"] = run.info.run_id
            return str(last)
    raise SystemExit(
        f"error: --ckpt_path last: no run named {name!r} in experiment {experiment!r} of {uri} "
        f"left a last.ckpt under {save_dir}: expected an earlier fit of the same config."
    )


def main(args: list[str] | None = None, run: bool = True) -> QTCLI:
    """Build the CLI; `run=False` parses and instantiates without running a subcommand."""
    keep_freed_memory()
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
        save_config_callback=MLflowConfig,
        save_config_kwargs={"overwrite": True, "save_to_log_dir": False},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from qt.checkpointing import CheckpointError

    try:
        main()
    except SIGTERMException:  # the checkpoint is written (qt.checkpointing.SaveOnSigterm)
        print("Stopped by SIGTERM; resume with --ckpt_path last.", file=sys.stderr)
        sys.exit(143)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)

"""What a fit says on the console: losses and the latest and best evaluation score on the
progress bar, one line per evaluation (written by `Evaluation` through `qt.console.say`), and at
the end the run, its best score and checkpoint, and how to open it in the MLflow UI.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from qt.callbacks.evaluation import Evaluation
from qt.console import say
from qt.ui import run_url

# callback metric -> its name on the progress bar
BAR_METRICS = {
    "train/bc_loss": "bc",
    "train/q_loss": "q",
    "train/critic_loss": "critic",
    "eval/normalized_score": "score",
    "eval/best_normalized_score": "best",
}


def _format(value: float) -> str:
    return f"{value:.4g}"


class Console(L.Callback):
    """The progress bar's metrics, the run's first line and its closing summary (rank 0)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        bar = trainer.progress_bar_callback
        if bar is not None:

            def get_metrics(trainer, pl_module):  # replaces the bar's `v_num`
                metrics = trainer.callback_metrics
                return {
                    short: _format(float(metrics[key]))
                    for key, short in BAR_METRICS.items()
                    if key in metrics
                }

            bar.get_metrics = get_metrics

    @rank_zero_only
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run = self._run(trainer)
        if run is not None:
            say(
                trainer,
                f"run {run['name']}: MLflow run {run['id']} (experiment {run['exp']}, "
                f"{run['uri']})",
            )

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        lines = []
        run = self._run(trainer)
        if run is not None:
            lines.append(
                f"run       {run['name']} (MLflow run {run['id']}, experiment {run['exp']})"
            )
        best, last = None, None
        for cb in trainer.checkpoint_callbacks:
            if getattr(cb, "monitor", None):
                best = cb if cb.best_model_path else best
            else:  # without a monitor, the kept file is the latest one (last.ckpt)
                last = cb.last_model_path or cb.best_model_path or last
        if best is not None and best.best_model_score is not None:
            at = [cb.best_iteration for cb in trainer.callbacks if isinstance(cb, Evaluation)]
            where = f" (iteration {at[0]})" if at and at[0] else ""
            lines.append(
                f"best      {best.monitor} {_format(float(best.best_model_score))}"
                f"{where}: {best.best_model_path}"
            )
        if last:
            resume = f"--ckpt_path run:{run['id']}" if run is not None else "--ckpt_path last"
            lines.append(f"last      {last} (continue with {resume})")
        if run is not None:
            if run["uri"].startswith("http"):
                lines.append(f"open      {run_url(run['uri'], run['exp_id'], run['id'])}")
            else:
                lines.append(
                    f"open      make ui (or mlflow ui --backend-store-uri {run['uri']}), then "
                    f"{run_url(run['uri'], run['exp_id'], run['id'])}"
                )
        if lines:
            say(trainer, "\n".join(lines))

    @staticmethod
    def _run(trainer: L.Trainer) -> dict | None:
        for logger in trainer.loggers:
            if isinstance(logger, MLFlowLogger):
                client = logger.experiment
                info = client.get_run(logger.run_id).info
                exp = client.get_experiment(info.experiment_id)
                return {
                    "id": info.run_id,
                    "name": info.run_name,
                    "exp": exp.name,
                    "exp_id": info.experiment_id,
                    "uri": logger._tracking_uri,
                }
        return None


__all__ = ["BAR_METRICS", "Console"]

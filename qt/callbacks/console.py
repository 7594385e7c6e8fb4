"""What a fit says on the console: losses and the latest and best evaluation score on the
progress bar, one line per evaluation (written by `Evaluation` through `qt.console.say`), and at
the end the run, its best score and checkpoint, and how to open it in the MLflow UI.

When `QT_STATUS_FILE` names a file (the demo and a study set it for each fit they start, whose
console goes to a log), the fit also keeps its progress there, at most every few seconds:
iteration, step, rate, and latest and best score; `qt.console.status_line` reads it.
"""

from __future__ import annotations

import math
import os
import time

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from qt.callbacks.evaluation import Evaluation
from qt.console import STATUS_ENV, say, write_status
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


class StatusFile(L.Callback):
    """The fit's progress in the file `QT_STATUS_FILE` names, at most every few seconds
    (rank 0): iteration, step, rate, latest and best score. A pack's trainer has it too."""

    STATUS_EVERY_S = 2.0

    def __init__(self) -> None:
        self._status_path = os.environ.get(STATUS_ENV) or None
        self._status_t = 0.0
        self._start: tuple[float, int] | None = None  # (time, step) this process began at

    def _write_status(self, trainer: L.Trainer, force: bool = False) -> None:
        now = time.monotonic()
        if self._status_path is None or (not force and now - self._status_t < self.STATUS_EVERY_S):
            return
        self._status_t = now
        if not math.isfinite(trainer.num_training_batches):  # an unbounded iteration
            return
        per_iter = int(trainer.num_training_batches)
        step = int(trainer.fit_loop.epoch_loop.batch_progress.total.completed)
        if self._start is None:
            self._start = (now, step)
        t0, step0 = self._start
        rate = (step - step0) / (now - t0) if now > t0 and step > step0 else None
        score = best = None
        for cb in trainer.callbacks:
            if isinstance(cb, Evaluation) and cb.best_iteration:
                metrics = trainer.callback_metrics
                score = metrics.get("eval/normalized_score")
                best = metrics.get("eval/best_normalized_score")
        try:
            write_status(self._status_path, {
                "iteration": min(trainer.current_epoch + 1, trainer.max_epochs),
                "iterations": trainer.max_epochs, "step": step,
                "steps": per_iter * trainer.max_epochs, "rate": rate,
                "score": None if score is None else float(score),
                "best": None if best is None else float(best),
            })  # fmt: skip
        except OSError:  # progress is a courtesy: never stop a fit for it
            self._status_path = None

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = None
        self._write_status(trainer, force=True)

    @rank_zero_only
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._write_status(trainer)

    @rank_zero_only
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write_status(trainer, force=True)


class Console(StatusFile):
    """The progress bar's metrics, the run's first line and its closing summary (rank 0), and
    the progress in the status file (`StatusFile`)."""

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


__all__ = ["BAR_METRICS", "Console", "StatusFile"]

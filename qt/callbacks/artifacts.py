"""MLflow artifacts of a run: checkpoints, learning-curve plots and the final evaluation table.

At the end of fit the best and last checkpoints (every ModelCheckpoint's) go to
`checkpoints/`, and PNG plots drawn from the run's metric history to `plots/`; at the end of
test, the evaluation table to `evaluation/table.txt`. The resolved config comes from
`cli.py`'s config callback. Nothing happens without an MLflow logger, and only on rank 0.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

# One PNG per group: file name -> the metrics drawn in it (those the run has).
PLOTS: dict[str, tuple[str, ...]] = {
    "losses": ("train/critic_loss", "train/bc_loss", "train/q_loss", "train/actor_loss"),
    "target_q": ("train/target_q_mean",),
    "normalized_score": ("eval/normalized_score", "eval/best_normalized_score"),
    "learning_rates": ("lr/actor", "lr/critic"),
}


def _mlflow_logger(trainer: L.Trainer) -> MLFlowLogger | None:
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            return logger
    return None


def plot_history(history: dict[str, list[tuple[int, float]]], title: str, path: Path) -> None:
    """Draw metric histories ((step, value) pairs) on one set of axes and save a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display here or on a cluster node
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name, points in history.items():
        steps, values = zip(*points)
        ax.plot(steps, values, label=name, marker="o" if len(points) < 30 else None)
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class MLflowArtifacts(L.Callback):
    """At the end of fit: PNG learning curves; at the end of test: the evaluation table."""

    @rank_zero_only
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = _mlflow_logger(trainer)
        if logger is None:
            return
        client, run_id = logger.experiment, logger.run_id
        # Lightning's `log_model` keeps only one ModelCheckpoint's files; log every one's
        files = set()
        for cb in trainer.checkpoint_callbacks:
            for attr in ("best_model_path", "last_model_path"):
                path = getattr(cb, attr, "")
                if path and Path(path).is_file():
                    files.add(Path(path))
        for path in sorted(files):
            client.log_artifact(run_id, str(path), "checkpoints")
        with tempfile.TemporaryDirectory() as tmp:
            for name, keys in PLOTS.items():
                history = {}
                for key in keys:
                    points = sorted(
                        (m.step, m.value) for m in client.get_metric_history(run_id, key)
                    )
                    if points:
                        history[key] = points
                if history:
                    plot_history(history, name.replace("_", " "), Path(tmp) / f"{name}.png")
            client.log_artifacts(run_id, tmp, "plots")

    @rank_zero_only
    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logger = _mlflow_logger(trainer)
        summary = next(
            (cb.last_summary for cb in trainer.callbacks if getattr(cb, "last_summary", None)),
            None,
        )
        if logger is None or summary is None:
            return
        logger.experiment.log_text(logger.run_id, summary.table() + "\n", "evaluation/table.txt")

"""MLflow tracking with a local store by default: no server needed to train.

`MLFLOW_TRACKING_URI`, when the user sets it, wins; otherwise runs go to a SQLite store
`<save_dir>/mlflow.db` with artifacts under `<save_dir>/mlartifacts` (MLflow 3 no longer
accepts a bare folder as a store). `make ui` serves the same store.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger as _MLFlowLogger


def default_tracking_uri(save_dir: str | os.PathLike = "runs") -> str:
    """The tracking URI in force: the user's `MLFLOW_TRACKING_URI`, else the local store."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(save_dir).resolve() / 'mlflow.db'}"


class MLFlowLogger(_MLFlowLogger):
    """Lightning's MLflow logger with qt's defaults (local store, experiment `qt`)."""

    def __init__(
        self,
        experiment_name: str = "qt",
        run_name: str | None = None,
        save_dir: str = "runs",
        tracking_uri: str | None = None,
        tags: dict[str, str] | None = None,
        log_model: bool = False,
        artifact_location: str | None = None,
        run_id: str | None = None,
    ) -> None:
        uri = tracking_uri or default_tracking_uri(save_dir)
        if (
            artifact_location is None
            and uri.startswith("sqlite:///")
            and not os.environ.get("MLFLOW_TRACKING_URI")
        ):
            Path(save_dir).mkdir(parents=True, exist_ok=True)
            artifact_location = (Path(save_dir).resolve() / "mlartifacts").as_uri()
        super().__init__(
            experiment_name=experiment_name,
            run_name=run_name,
            tracking_uri=uri,
            tags=tags,
            log_model=log_model,
            artifact_location=artifact_location,
            run_id=run_id,
        )
        self._qt_save_dir = save_dir

    @property
    def save_dir(self) -> str | None:
        return self._qt_save_dir

    @property
    def experiment(self):
        # mlflow.set_tracking_uri, which Lightning's logger calls, also exports the URI as
        # MLFLOW_TRACKING_URI; put the variable back, so that a later logger in this process
        # (or a child process) honours only what the user set.
        before = os.environ.get("MLFLOW_TRACKING_URI")
        try:
            return super().experiment
        finally:
            if before is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = before

"""MLflow's UI and qt's runs: the one place that knows how to make MLflow 3 show them.

MLflow 3.17's UI opens an experiment in its GenAI (traces) view unless the experiment is tagged
as model training (`EXPERIMENT_KIND_TAG`, set by `qt.tracking.open_experiment`) or the address
asks for the model-training view (`?workflowType=machine_learning`, `VIEW`), and its experiment
list drops that query when followed. So qt's addresses carry it (`run_url`, the fit's closing
summary), and `python -m qt.ui DB PORT` (`make ui`) prints each experiment's own address,
reading the store with sqlite3 only (fast, no MLflow import).
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

VIEW = "workflowType=machine_learning"
EXPERIMENT_KIND_TAG = ("mlflow.experimentKind", "custom_model_development")
LOCAL_UI = "http://127.0.0.1:5000"  # where `make ui` serves a local store


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str:
    """A run's page in the model-training view: on the tracking server itself when the runs
    are on one, else on the UI `make ui` serves."""
    base = tracking_uri if tracking_uri.startswith("http") else LOCAL_UI
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}?{VIEW}"


def experiment_urls(db: str | Path, base: str) -> list[str]:
    """`<name>: <base>/#/experiments/<id>?workflowType=machine_learning` per active experiment."""
    if not Path(db).is_file():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            rows = con.execute(
                "SELECT experiment_id, name FROM experiments WHERE lifecycle_stage = 'active' "
                "ORDER BY experiment_id"
            ).fetchall()
    except sqlite3.Error:
        return []
    return [f"{name}: {base}/#/experiments/{eid}?{VIEW}" for eid, name in rows if name != "Default"]


def main(argv: list[str]) -> int:
    db, port = argv[0], argv[1] if len(argv) > 1 else "5000"
    base = f"http://127.0.0.1:{port}"
    urls = experiment_urls(db, base)
    print("MLflow UI (model-training view; Ctrl-C stops it):")
    for line in urls or [f"{base}/#/experiments?{VIEW}"]:
        print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

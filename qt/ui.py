"""`python -m qt.ui DB PORT`: the MLflow UI addresses of a local store's experiments (`make ui`).

MLflow 3.17's UI opens an experiment in its GenAI (traces) view unless the address asks for
the model-training view (`?workflowType=machine_learning`), and its experiment list drops that
when followed; so `make ui` prints each experiment's own address. Reads the store with
sqlite3 only (fast, no MLflow import).
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

VIEW = "workflowType=machine_learning"


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

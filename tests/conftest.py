"""Every test starts with an empty data root of its own (QT_DATA_DIR), so datasets in the
developer's ./data are never read by accident. Under pytest-xdist each worker takes its share
of the cores for torch, and passes it on to the processes it starts (OMP_NUM_THREADS), so
that the workers do not oversubscribe the cores; an OMP_NUM_THREADS set by the user wins."""

import os

import pytest
import torch

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1 and "OMP_NUM_THREADS" not in os.environ:
    _threads = max(1, len(os.sched_getaffinity(0)) // _WORKERS)
    torch.set_num_threads(_threads)
    os.environ["OMP_NUM_THREADS"] = str(_threads)


@pytest.fixture(autouse=True)
def _own_data_root(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QT_DATA_DIR", str(tmp_path_factory.mktemp("qt-data")))

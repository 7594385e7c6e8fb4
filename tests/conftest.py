"""Every test starts with an empty data root of its own (QT_DATA_DIR), so datasets in the
developer's ./data are never read by accident. Under pytest-xdist each worker takes its share
of the cores for torch, so that the workers do not oversubscribe them."""

import os

import pytest
import torch

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _threads = max(1, (os.cpu_count() or 1) // _WORKERS)
    torch.set_num_threads(_threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))


@pytest.fixture(autouse=True)
def _own_data_root(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QT_DATA_DIR", str(tmp_path_factory.mktemp("qt-data")))

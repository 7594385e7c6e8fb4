"""Every test starts with an empty data root of its own (QT_DATA_DIR), so datasets in the
developer's ./data are never read by accident."""

import pytest


@pytest.fixture(autouse=True)
def _own_data_root(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("QT_DATA_DIR", str(tmp_path_factory.mktemp("qt-data")))

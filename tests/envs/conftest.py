"""Fixtures for the environment tests."""

from __future__ import annotations

import warnings

import pytest


@pytest.fixture(autouse=True)
def _quiet_env_warnings():
    # gymnasium's -v4 deprecation notes and gymnasium-robotics' Adroit notice are expected here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield

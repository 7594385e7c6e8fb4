"""Loading a qt-generated Minari dataset from a store folder, as a test needs it."""

from __future__ import annotations

import os

import minari


def load(root, name: str):
    """`minari.load_dataset("qt/<name>")` with MINARI_DATASETS_PATH pointing at `root`, restored after."""
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        return minari.load_dataset(f"qt/{name}")
    finally:
        if old is None:
            del os.environ["MINARI_DATASETS_PATH"]
        else:
            os.environ["MINARI_DATASETS_PATH"] = old

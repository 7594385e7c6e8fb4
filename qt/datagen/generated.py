"""The hand-off between a dataset generator and the writers (Minari, D4RL hdf5)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


def arrays_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 over the D4RL arrays as they are written (name, dtype, shape and bytes of each,
    in key order): two generations agree on it exactly when they made the same dataset."""
    h = hashlib.sha256()
    for key in D4RL_KEYS:
        value = np.ascontiguousarray(as_written(key, arrays[key]))
        h.update(f"{key}|{value.dtype.str}|{value.shape}|".encode())
        h.update(value.tobytes())
    return h.hexdigest()


def as_written(key: str, value) -> np.ndarray:
    """An array as the writers store it: flags as bool, float64 as float32."""
    value = np.asarray(value)
    if key in ("terminals", "timeouts"):
        return value.astype(bool)
    if value.dtype == np.float64:
        return value.astype(np.float32)
    return value


@dataclass
class GeneratedDataset:
    """A dataset made here by the D4RL protocol, as flat D4RL-format arrays.

    arrays: `observations` (N, S) float32, `actions` (N, A) float32, `rewards` (N,) float32,
    `terminals` (N,) bool, `timeouts` (N,) bool: exactly the keys of a D4RL hdf5 file.
    env_id: the qt task name of the evaluation environment (e.g. "maze2d-umaze-v1").
    ref_min_score / ref_max_score: the D4RL-style reference returns (random policy,
    expert or controller) measured on that evaluation environment.
    """

    name: str
    arrays: dict[str, np.ndarray]
    env_id: str
    ref_min_score: float
    ref_max_score: float
    algorithm_name: str
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        missing = [k for k in D4RL_KEYS if k not in self.arrays]
        if missing:
            raise ValueError(
                f"GeneratedDataset {self.name!r} lacks arrays {missing}: expected {list(D4RL_KEYS)}."
            )
        n = len(self.arrays["rewards"])
        bad = {k: len(v) for k, v in self.arrays.items() if len(v) != n}
        if bad:
            raise ValueError(
                f"GeneratedDataset {self.name!r}: arrays {bad} differ in length from rewards ({n})."
            )

"""Task registry: the one place where facts about a D4RL task live.

Each entry is keyed by its D4RL dataset name (`hopper-medium-v2`). STUB: the full registry
(every dataset of the paper's families, D4RL reference scores, published hyperparameters)
is being filled in; the dataclass fields and functions below are the contract.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Published:
    """The authors' per-task hyperparameters (QT_SPEC §6)."""

    eta: float
    grad_norm: float
    max_iters: int
    K: int = 20
    early_stop: bool = True
    early_epoch: int = 100
    num_steps_per_iter: int = 1000
    batch_size: int = 256
    lr_decay: bool = True
    k_rewards: bool = True
    use_discount: bool = True
    reward_tune: str | None = None  # "cql_antmaze" or None
    full_windows_only: bool = False


@dataclass(frozen=True)
class Task:
    name: str  # D4RL dataset name, e.g. "hopper-medium-v2"
    family: str  # "hopper", "halfcheetah", "walker2d", "pen", "hammer", "door", "relocate", "kitchen", "maze2d", "antmaze"
    dataset_file: str  # D4RL hdf5 file name, e.g. "hopper_medium-v2.hdf5"
    state_dim: int
    act_dim: int
    max_ep_len: int
    env_targets: tuple[float, ...]
    scale: float
    ref_min_score: float
    ref_max_score: float
    published: Published | None = field(default=None)

    def normalized_score(self, ret: float) -> float:
        """D4RL normalised score x100."""
        return 100.0 * (ret - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)


TASKS: dict[str, Task] = {}


def _add(task: Task) -> None:
    TASKS[task.name] = task


_add(Task("hopper-medium-v2", "hopper", "hopper_medium-v2.hdf5", 11, 3, 1000, (3600.0, 1800.0), 1000.0,
          -20.272305, 3234.3, Published(eta=1.0, grad_norm=9, max_iters=500, full_windows_only=True)))
_add(Task("maze2d-umaze-v1", "maze2d", "maze2d-umaze-sparse-v1.hdf5", 4, 2, 1000,
          (300.0, 200.0, 150.0, 100.0, 50.0, 20.0), 10.0, 23.85, 161.86,
          Published(eta=5.0, grad_norm=20, max_iters=100, early_epoch=50)))


def get_task(name: str) -> Task:
    """Look a task up by its D4RL name; an unknown name lists close matches."""
    try:
        return TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(name, TASKS, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise ValueError(f"Unknown task {name!r}: expected a D4RL dataset name such as 'hopper-medium-v2'.{hint}") from None

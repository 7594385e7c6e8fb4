"""Task registry: the one place where facts about a D4RL task live.

Each entry is keyed by its D4RL dataset name (`hopper-medium-v2`) and holds the D4RL hdf5 file
name, state and action sizes, the acting settings of docs/algorithm.md §6 (`env_targets`, `scale`,
`max_ep_len`), D4RL's reference scores exactly as `d4rl/infos.py` publishes them, and the
authors' hyperparameters (`published`) for the datasets the paper trained on. Environment
factories live in `qt.envs`, which dispatches on `Task.family`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from qt.errors import UserError


@dataclass(frozen=True)
class Published:
    """The authors' per-task hyperparameters (docs/algorithm.md §6)."""

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
    """Everything the project needs to know about one D4RL dataset and its environment."""

    name: str  # D4RL dataset name, e.g. "hopper-medium-v2"
    family: str  # one of FAMILIES
    dataset_file: str  # D4RL hdf5 file name, e.g. "hopper_medium-v2.hdf5"
    state_dim: int
    act_dim: int
    max_ep_len: int
    env_targets: tuple[float, ...]
    scale: float
    ref_min_score: float
    ref_max_score: float
    published: Published | None = field(default=None)

    @property
    def dense(self) -> bool:
        """Whether the reward falls with the distance to the goal (Maze2D's `-dense-` datasets)
        rather than being 1 at the goal and 0 elsewhere."""
        return "-dense-" in self.name

    def normalized_score(self, ret: float) -> float:
        """D4RL normalised score x100: `100 * (ret - ref_min) / (ref_max - ref_min)`."""
        return 100.0 * (ret - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)


# Acting settings per family (docs/algorithm.md §6): env_targets in raw return units, scale, sizes.
_FAMILY_FACTS: dict[str, dict] = {
    "hopper": dict(state_dim=11, act_dim=3, env_targets=(3600.0, 1800.0), scale=1000.0),
    "halfcheetah": dict(
        state_dim=17, act_dim=6, env_targets=(12000.0, 9000.0, 6000.0), scale=1000.0
    ),
    "walker2d": dict(state_dim=17, act_dim=6, env_targets=(5000.0, 4000.0, 2500.0), scale=1000.0),
    "pen": dict(state_dim=45, act_dim=24, env_targets=(12000.0, 6000.0), scale=1000.0),
    "hammer": dict(state_dim=46, act_dim=26, env_targets=(12000.0, 6000.0, 3000.0), scale=1000.0),
    "door": dict(state_dim=39, act_dim=28, env_targets=(2000.0, 1000.0, 500.0), scale=100.0),
    "relocate": dict(state_dim=39, act_dim=30, env_targets=(3000.0, 1000.0), scale=1000.0),
    "kitchen": dict(state_dim=60, act_dim=9, env_targets=(500.0, 250.0), scale=100.0),
    "maze2d": dict(
        state_dim=4, act_dim=2, env_targets=(300.0, 200.0, 150.0, 100.0, 50.0, 20.0), scale=10.0
    ),
    "antmaze": dict(
        state_dim=29, act_dim=8, env_targets=(1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3), scale=1.0
    ),
}
FAMILIES: tuple[str, ...] = tuple(_FAMILY_FACTS)
MAX_EP_LEN = 1000  # docs/algorithm.md §6: the acting horizon is 1000 for every family

# D4RL's reference scores (d4rl/infos.py REF_MIN_SCORE / REF_MAX_SCORE), copied digit for digit.
# Locomotion -v2 and Adroit -v1 reuse their family's -v0 values there, so one pair per family.
_FAMILY_REF: dict[str, tuple[float, float]] = {
    "hopper": (-20.272305, 3234.3),
    "halfcheetah": (-280.178953, 12135.0),
    "walker2d": (1.629008, 4592.3),
    "pen": (96.262799, 3076.8331017826877),
    "hammer": (-274.856578, 12794.134825156867),
    "door": (-56.512833, 2880.5693087298737),
    "relocate": (-6.425911, 4233.877797728884),
    "kitchen": (0.0, 4.0),
    "antmaze": (0.0, 1.0),
}
_MAZE2D_REF: dict[str, tuple[float, float]] = {
    "maze2d-open-v0": (0.01, 20.66),
    "maze2d-umaze-v1": (23.85, 161.86),
    "maze2d-medium-v1": (13.13, 277.39),
    "maze2d-large-v1": (6.7, 273.99),
    "maze2d-open-dense-v0": (11.17817, 27.166538620695782),
    "maze2d-umaze-dense-v1": (68.537689, 193.66285642381482),
    "maze2d-medium-dense-v1": (44.264742, 297.4552547777125),
    "maze2d-large-dense-v1": (30.569041, 303.4857382709002),
}

# The last path component of each dataset's URL in d4rl/infos.py DATASET_URLS.
_KITCHEN_FILES = {
    "kitchen-complete-v0": "mini_kitchen_microwave_kettle_light_slider-v0.hdf5",
    "kitchen-partial-v0": "kitchen_microwave_kettle_light_slider-v0.hdf5",
    "kitchen-mixed-v0": "kitchen_microwave_kettle_bottomburner_light-v0.hdf5",
}
_ANTMAZE_FILE_STEMS = {  # D4RL's maze names: umaze "u-maze", medium "big-maze", large "hardest-maze"
    "umaze": "Ant_maze_u-maze_noisy_multistart_False_multigoal_False_sparse",
    "umaze-diverse": "Ant_maze_u-maze_noisy_multistart_True_multigoal_True_sparse",
    "medium-play": "Ant_maze_big-maze_noisy_multistart_True_multigoal_False_sparse",
    "medium-diverse": "Ant_maze_big-maze_noisy_multistart_True_multigoal_True_sparse",
    "large-play": "Ant_maze_hardest-maze_noisy_multistart_True_multigoal_False_sparse",
    "large-diverse": "Ant_maze_hardest-maze_noisy_multistart_True_multigoal_True_sparse",
}


def _published() -> dict[str, Published]:
    """docs/algorithm.md §6: the authors' per-task settings, keyed by the dataset name they trained on."""
    maze = dict(grad_norm=9, early_epoch=50)
    table = {
        "halfcheetah-medium-v2": Published(eta=5.0, grad_norm=15, max_iters=500, K=5),
        "halfcheetah-medium-replay-v2": Published(eta=5.0, grad_norm=15, max_iters=500, K=5),
        "halfcheetah-medium-expert-v2": Published(
            eta=0.4, grad_norm=15, max_iters=10, early_stop=False, num_steps_per_iter=10000
        ),
        # Hopper's windows are always full in the reference sampler (docs/algorithm.md §1).
        "hopper-medium-v2": Published(eta=1.0, grad_norm=9, max_iters=500, full_windows_only=True),
        "hopper-medium-replay-v2": Published(
            eta=3.0, grad_norm=9, max_iters=500, full_windows_only=True
        ),
        "hopper-medium-expert-v2": Published(
            eta=1.0, grad_norm=9, max_iters=500, full_windows_only=True
        ),
        "walker2d-medium-v2": Published(eta=2.0, grad_norm=5, max_iters=500),
        "walker2d-medium-replay-v2": Published(eta=2.0, grad_norm=5, max_iters=500),
        "walker2d-medium-expert-v2": Published(eta=2.0, grad_norm=5, max_iters=500),
        "pen-human-v1": Published(eta=0.1, grad_norm=9, max_iters=500),
        "pen-cloned-v1": Published(eta=0.1, grad_norm=9, max_iters=500),
        "hammer-human-v1": Published(eta=0.1, grad_norm=5, max_iters=500, early_epoch=60),
        "hammer-cloned-v1": Published(eta=0.01, grad_norm=9, max_iters=500, early_epoch=30),
        "door-human-v1": Published(eta=0.005, grad_norm=9, max_iters=500, early_epoch=60),
        "door-cloned-v1": Published(eta=0.001, grad_norm=9, max_iters=500, early_epoch=60),
        "kitchen-complete-v0": Published(eta=0.001, grad_norm=9, max_iters=500, early_epoch=100),
        "kitchen-partial-v0": Published(eta=0.01, grad_norm=9, max_iters=500, early_epoch=50),
        "maze2d-open-v0": Published(eta=0.01, max_iters=500, **maze),
        "maze2d-open-dense-v0": Published(eta=0.01, max_iters=500, **maze),
        "maze2d-umaze-v1": Published(eta=5.0, grad_norm=20, max_iters=100, early_epoch=50),
        "maze2d-umaze-dense-v1": Published(eta=3.0, grad_norm=5, max_iters=500, early_epoch=50),
        "maze2d-medium-v1": Published(eta=5.0, max_iters=100, **maze),
        "maze2d-medium-dense-v1": Published(eta=5.0, max_iters=100, **maze),
        "maze2d-large-v1": Published(eta=4.0, max_iters=500, **maze),
        "maze2d-large-dense-v1": Published(eta=4.0, max_iters=500, **maze),
        "antmaze-umaze-v0": Published(eta=0.05, max_iters=500, **maze),
        "antmaze-umaze-diverse-v0": Published(eta=0.01, max_iters=500, **maze),
        "antmaze-medium-diverse-v0": Published(
            eta=0.01, grad_norm=9, max_iters=100, early_epoch=80
        ),
        "antmaze-large-diverse-v0": Published(
            eta=0.005, grad_norm=9, max_iters=100, early_epoch=80, reward_tune="cql_antmaze"
        ),
    }
    return table


def _build() -> dict[str, Task]:
    """Every D4RL dataset of the paper's families, keyed by its D4RL name."""
    published = _published()
    entries: list[
        tuple[str, str, str, tuple[float, float]]
    ] = []  # (name, family, file, (min, max))

    for family in ("hopper", "halfcheetah", "walker2d"):
        for dset in ("random", "medium", "medium-replay", "medium-expert", "expert"):
            file = f"{family}_{dset.replace('-', '_')}-v2.hdf5"
            entries.append((f"{family}-{dset}-v2", family, file, _FAMILY_REF[family]))
    for family in ("pen", "hammer", "door", "relocate"):
        for dset in ("human", "cloned", "expert"):
            name = f"{family}-{dset}-v1"
            entries.append((name, family, f"{name}.hdf5", _FAMILY_REF[family]))
    for name, file in _KITCHEN_FILES.items():
        entries.append((name, "kitchen", file, _FAMILY_REF["kitchen"]))
    for maze in ("open", "umaze", "medium", "large"):
        version = "v0" if maze == "open" else "v1"  # D4RL never re-released the open maze
        suffix = "" if maze == "open" else "-v1"
        for reward in ("sparse", "dense"):
            name = f"maze2d-{maze}{'-dense' if reward == 'dense' else ''}-{version}"
            entries.append(
                (name, "maze2d", f"maze2d-{maze}-{reward}{suffix}.hdf5", _MAZE2D_REF[name])
            )
    for version, tail in (("v0", ""), ("v2", "_fixed")):
        for dset, stem in _ANTMAZE_FILE_STEMS.items():
            entries.append(
                (
                    f"antmaze-{dset}-{version}",
                    "antmaze",
                    f"{stem}{tail}.hdf5",
                    _FAMILY_REF["antmaze"],
                )
            )

    tasks: dict[str, Task] = {}
    for name, family, file, (ref_min, ref_max) in entries:
        facts = _FAMILY_FACTS[family]
        tasks[name] = Task(
            name=name,
            family=family,
            dataset_file=file,
            state_dim=facts["state_dim"],
            act_dim=facts["act_dim"],
            max_ep_len=MAX_EP_LEN,
            env_targets=facts["env_targets"],
            scale=facts["scale"],
            ref_min_score=ref_min,
            ref_max_score=ref_max,
            published=published.get(name),
        )
    unknown = set(published) - set(tasks)
    assert not unknown, f"published settings for unregistered tasks: {sorted(unknown)}"
    return tasks


TASKS: dict[str, Task] = _build()


def get_task(name: str) -> Task:
    """Look a task up by its D4RL name; an unknown name lists close matches."""
    try:
        return TASKS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), TASKS, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UserError(
            f"Unknown task {name!r}: expected a D4RL dataset name such as 'hopper-medium-v2'.{hint}"
        ) from None


def family_of(name: str) -> str:
    """The family (`hopper`, `maze2d`, ...) of a registered task name."""
    return get_task(name).family


def tasks_of_family(family: str) -> list[Task]:
    """All registered tasks of one family, in registry order."""
    if family not in _FAMILY_FACTS:
        raise UserError(f"Unknown task family {family!r}: expected one of {', '.join(FAMILIES)}.")
    return [task for task in TASKS.values() if task.family == family]


def published_tasks() -> list[Task]:
    """The tasks the paper trained on (those with published hyperparameters)."""
    return [task for task in TASKS.values() if task.published is not None]

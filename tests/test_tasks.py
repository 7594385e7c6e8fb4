"""The task registry against docs/algorithm.md §6 and D4RL's infos.py, written out independently here."""

from __future__ import annotations

import pytest

from qt.tasks import FAMILIES, TASKS, Published, family_of, get_task, tasks_of_family

# docs/algorithm.md §6 published table, typed out row by row: name -> (eta, grad_norm, max_iters, extra).
_PUBLISHED = {
    "halfcheetah-medium-v2": (5.0, 15, 500, {"K": 5}),
    "halfcheetah-medium-replay-v2": (5.0, 15, 500, {"K": 5}),
    "halfcheetah-medium-expert-v2": (
        0.4,
        15,
        10,
        {"num_steps_per_iter": 10000, "early_stop": False},
    ),
    "hopper-medium-v2": (1.0, 9, 500, {"full_windows_only": True}),
    "hopper-medium-replay-v2": (3.0, 9, 500, {"full_windows_only": True}),
    "hopper-medium-expert-v2": (1.0, 9, 500, {"full_windows_only": True}),
    "walker2d-medium-v2": (2.0, 5, 500, {}),
    "walker2d-medium-replay-v2": (2.0, 5, 500, {}),
    "walker2d-medium-expert-v2": (2.0, 5, 500, {}),
    "pen-human-v1": (0.1, 9, 500, {}),
    "pen-cloned-v1": (0.1, 9, 500, {}),
    "hammer-human-v1": (0.1, 5, 500, {"early_epoch": 60}),
    "hammer-cloned-v1": (0.01, 9, 500, {"early_epoch": 30}),
    "door-human-v1": (0.005, 9, 500, {"early_epoch": 60}),
    "door-cloned-v1": (0.001, 9, 500, {"early_epoch": 60}),
    "kitchen-complete-v0": (0.001, 9, 500, {"early_epoch": 100}),
    "kitchen-partial-v0": (0.01, 9, 500, {"early_epoch": 50}),
    "maze2d-open-v0": (0.01, 9, 500, {"early_epoch": 50}),
    "maze2d-open-dense-v0": (0.01, 9, 500, {"early_epoch": 50}),
    "maze2d-umaze-v1": (5.0, 20, 100, {"early_epoch": 50}),
    "maze2d-umaze-dense-v1": (3.0, 5, 500, {"early_epoch": 50}),
    "maze2d-medium-v1": (5.0, 9, 100, {"early_epoch": 50}),
    "maze2d-medium-dense-v1": (5.0, 9, 100, {"early_epoch": 50}),
    "maze2d-large-v1": (4.0, 9, 500, {"early_epoch": 50}),
    "maze2d-large-dense-v1": (4.0, 9, 500, {"early_epoch": 50}),
    "antmaze-umaze-v0": (0.05, 9, 500, {"early_epoch": 50}),
    "antmaze-umaze-diverse-v0": (0.01, 9, 500, {"early_epoch": 50}),
    "antmaze-medium-diverse-v0": (0.01, 9, 100, {"early_epoch": 80}),
    "antmaze-large-diverse-v0": (0.005, 9, 100, {"early_epoch": 80, "reward_tune": "cql_antmaze"}),
}
# What every published config shares unless its row says otherwise.
_COMMON = dict(
    K=20, early_stop=True, early_epoch=100, num_steps_per_iter=1000, batch_size=256,
    lr_decay=True, k_rewards=True, use_discount=True, reward_tune=None, full_windows_only=False,
)  # fmt: skip


@pytest.mark.parametrize("name", sorted(_PUBLISHED))
def test_published_hyperparameters(name: str) -> None:
    eta, grad_norm, max_iters, extra = _PUBLISHED[name]
    pub = get_task(name).published
    assert isinstance(pub, Published)
    expected = {**_COMMON, **extra, "eta": eta, "grad_norm": grad_norm, "max_iters": max_iters}
    for key, value in expected.items():
        assert getattr(pub, key) == value, (name, key)


def test_only_the_papers_datasets_are_published() -> None:
    published = {name for name, task in TASKS.items() if task.published is not None}
    assert published == set(_PUBLISHED)


def test_registry_covers_every_d4rl_dataset_of_the_families() -> None:
    expected = set()
    for env in ("hopper", "halfcheetah", "walker2d"):
        for d in ("random", "medium", "medium-replay", "medium-expert", "expert"):
            expected.add(f"{env}-{d}-v2")
    for env in ("pen", "hammer", "door", "relocate"):
        for d in ("human", "cloned", "expert"):
            expected.add(f"{env}-{d}-v1")
    expected |= {"kitchen-complete-v0", "kitchen-partial-v0", "kitchen-mixed-v0"}
    expected |= {"maze2d-open-v0", "maze2d-open-dense-v0"}
    for maze in ("umaze", "medium", "large"):
        expected |= {f"maze2d-{maze}-v1", f"maze2d-{maze}-dense-v1"}
    for v in ("v0", "v2"):
        for d in (
            "umaze",
            "umaze-diverse",
            "medium-play",
            "medium-diverse",
            "large-play",
            "large-diverse",
        ):
            expected.add(f"antmaze-{d}-{v}")
    assert set(TASKS) == expected
    assert all(task.name == name for name, task in TASKS.items())


# Copied by hand from d4rl/infos.py (REF_MIN_SCORE, REF_MAX_SCORE, DATASET_URLS' file names).
_D4RL = {
    "hopper-medium-v2": (-20.272305, 3234.3, "hopper_medium-v2.hdf5"),
    "halfcheetah-medium-replay-v2": (-280.178953, 12135.0, "halfcheetah_medium_replay-v2.hdf5"),
    "walker2d-medium-expert-v2": (1.629008, 4592.3, "walker2d_medium_expert-v2.hdf5"),
    "pen-human-v1": (96.262799, 3076.8331017826877, "pen-human-v1.hdf5"),
    "hammer-cloned-v1": (-274.856578, 12794.134825156867, "hammer-cloned-v1.hdf5"),
    "door-expert-v1": (-56.512833, 2880.5693087298737, "door-expert-v1.hdf5"),
    "relocate-human-v1": (-6.425911, 4233.877797728884, "relocate-human-v1.hdf5"),
    "kitchen-complete-v0": (0.0, 4.0, "mini_kitchen_microwave_kettle_light_slider-v0.hdf5"),
    "kitchen-mixed-v0": (0.0, 4.0, "kitchen_microwave_kettle_bottomburner_light-v0.hdf5"),
    "maze2d-open-v0": (0.01, 20.66, "maze2d-open-sparse.hdf5"),
    "maze2d-umaze-v1": (23.85, 161.86, "maze2d-umaze-sparse-v1.hdf5"),
    "maze2d-large-dense-v1": (30.569041, 303.4857382709002, "maze2d-large-dense-v1.hdf5"),
    "maze2d-open-dense-v0": (11.17817, 27.166538620695782, "maze2d-open-dense.hdf5"),
    "antmaze-large-diverse-v0": (
        0.0, 1.0, "Ant_maze_hardest-maze_noisy_multistart_True_multigoal_True_sparse.hdf5"
    ),
    "antmaze-medium-play-v2": (
        0.0, 1.0, "Ant_maze_big-maze_noisy_multistart_True_multigoal_False_sparse_fixed.hdf5"
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(_D4RL))
def test_reference_scores_and_files_match_d4rl(name: str) -> None:
    ref_min, ref_max, file = _D4RL[name]
    task = get_task(name)
    assert task.ref_min_score == ref_min  # exact: the numbers are copied, not recomputed
    assert task.ref_max_score == ref_max
    assert task.dataset_file == file


# docs/algorithm.md §6 family table plus D4RL's state/action sizes, typed out independently.
_FAMILY = {
    "hopper": ((3600, 1800), 1000, 11, 3),
    "halfcheetah": ((12000, 9000, 6000), 1000, 17, 6),
    "walker2d": ((5000, 4000, 2500), 1000, 17, 6),
    "pen": ((12000, 6000), 1000, 45, 24),
    "hammer": ((12000, 6000, 3000), 1000, 46, 26),
    "door": ((2000, 1000, 500), 100, 39, 28),
    "relocate": ((3000, 1000), 1000, 39, 30),
    "kitchen": ((500, 250), 100, 60, 9),
    "maze2d": ((300, 200, 150, 100, 50, 20), 10, 4, 2),
    "antmaze": ((1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.3), 1, 29, 8),
}


def test_family_settings() -> None:
    assert set(FAMILIES) == set(_FAMILY)
    for task in TASKS.values():
        targets, scale, s_dim, a_dim = _FAMILY[task.family]
        assert task.env_targets == tuple(float(t) for t in targets), task.name
        assert task.scale == scale and task.max_ep_len == 1000, task.name
        assert (task.state_dim, task.act_dim) == (s_dim, a_dim), task.name
        assert task.name.startswith(task.family + "-")


def test_normalized_score_known_values() -> None:
    hopper = get_task("hopper-medium-v2")
    # hand calculation: 100 * (1607.01 - (-20.272305)) / (3234.3 + 20.272305) = 50.0
    ret = -20.272305 + 0.5 * (3234.3 + 20.272305)
    assert hopper.normalized_score(ret) == pytest.approx(50.0, abs=1e-9)
    assert hopper.normalized_score(-20.272305) == pytest.approx(0.0, abs=1e-12)
    assert hopper.normalized_score(3234.3) == pytest.approx(100.0, abs=1e-9)
    umaze = get_task("maze2d-umaze-v1")
    assert umaze.normalized_score(100.0) == pytest.approx(100 * (100 - 23.85) / (161.86 - 23.85))
    assert get_task("antmaze-umaze-v0").normalized_score(0.7) == pytest.approx(70.0)
    assert get_task("kitchen-partial-v0").normalized_score(3.0) == pytest.approx(75.0)


def test_unknown_names_list_close_matches() -> None:
    with pytest.raises(ValueError, match="hopper-medium-v2") as info:
        get_task("hoper-medium-v2")
    assert "Unknown task 'hoper-medium-v2'" in str(info.value)
    with pytest.raises(ValueError, match="antmaze-umaze-v0"):
        get_task("antmaze-umaze-v1")
    with pytest.raises(ValueError, match="Unknown task") as info:
        get_task("zzzz")
    assert "Did you mean" not in str(info.value)


def test_family_helpers() -> None:
    assert family_of("pen-cloned-v1") == "pen"
    assert [t.name for t in tasks_of_family("kitchen")] == [
        "kitchen-complete-v0", "kitchen-partial-v0", "kitchen-mixed-v0"
    ]  # fmt: skip
    assert len(tasks_of_family("antmaze")) == 12
    with pytest.raises(ValueError, match="Unknown task family 'ant'"):
        tasks_of_family("ant")

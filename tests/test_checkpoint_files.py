"""Where a fit's checkpoints are and which one is its best (qt.checkpointing), the one rule the
study's jobs and the demo use."""

from __future__ import annotations

import os
from pathlib import Path

from qt.checkpointing import LAST, best_checkpoint, checkpoint_dir


def test_the_checkpoints_of_a_run_sit_under_its_experiment_and_run_ids(tmp_path):
    folder = checkpoint_dir(tmp_path / "runs", "3", "abc123")
    assert folder == tmp_path / "runs" / "3" / "abc123" / "checkpoints"
    assert LAST == "last.ckpt"


def test_the_best_checkpoint_is_the_newest_best_file_not_the_last_by_name(tmp_path):
    assert best_checkpoint(tmp_path) is None
    # by name, "best-epoch=9" sorts after "best-epoch=10"; the newer file is the later best
    for i, name in enumerate(["best-epoch=9.ckpt", "best-epoch=10.ckpt"]):
        (tmp_path / name).write_bytes(b"")
        os.utime(tmp_path / name, (1_000_000 + i, 1_000_000 + i))
    (tmp_path / LAST).write_bytes(b"")
    os.utime(tmp_path / LAST, (2_000_000, 2_000_000))  # newer, but not a best
    assert best_checkpoint(tmp_path) == tmp_path / "best-epoch=10.ckpt"
    assert best_checkpoint(str(tmp_path)) == Path(tmp_path) / "best-epoch=10.ckpt"

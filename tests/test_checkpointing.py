"""Checkpoints carry checksums of their contents and hold only finite weights: a real tiny
fit's checkpoint with one byte changed inside an Adam moment is refused in one sentence (by
the loader and by `cli.py fit --ckpt_path`), and no checkpoint with a NaN is written or read."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import pytest
import torch

from qt import cli
from qt.checkpointing import (
    CHECKSUMS_KEY,
    AtomicCheckpointIO,
    CheckpointError,
    checksums,
    load_checkpoint,
)
from qt.datagen.maze2d import generate
from qt.datagen.writers import write_d4rl_hdf5

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A one-iteration tiny fit: its folder, data file and last.ckpt."""
    root = tmp_path_factory.mktemp("ckpt")
    ds = generate("maze2d-umaze-v1", steps=1500, seed=0, ref_episodes=1, max_episode_steps=60)
    data = write_d4rl_hdf5(ds, root / "maze2d-umaze-sparse-v1.hdf5")
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.chdir(root)
        cli.main(["fit", "--config", TINY, "--data.path", str(data), "--trainer.max_epochs", "1"])
    [last] = root.glob("runs/*/*/checkpoints/last.ckpt")
    return root, data, last


def _sha256_of_tensor(t: torch.Tensor) -> str:
    """The hash of one tensor written out independently of qt.checkpointing's walk."""
    h = hashlib.sha256()
    h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_a_real_checkpoint_carries_checksums_of_what_it_holds(fitted):
    _, _, last = fitted
    raw = torch.load(last, weights_only=True)
    stored = raw.pop(CHECKSUMS_KEY)
    assert set(stored) == set(raw) and {"state_dict", "optimizer_states"} <= set(stored)
    assert stored == checksums(raw)  # recomputed from the loaded values
    # a bare tensor entry hashes to its dtype, shape and bytes, as written out here
    assert checksums({"w": raw["state_dict"]["actor.embed_timestep.weight"]})["w"] == (
        _sha256_of_tensor(raw["state_dict"]["actor.embed_timestep.weight"])
    )
    assert CHECKSUMS_KEY not in load_checkpoint(last)  # the loader hands back the plain dict


def _flip_a_byte_in_exp_avg(src: Path, dst: Path) -> None:
    """Copy `src` to `dst` with one byte changed in the middle of the largest Adam exp_avg."""
    ckpt = torch.load(src, weights_only=True)
    moments = [s["exp_avg"] for opt in ckpt["optimizer_states"] for s in opt["state"].values()]
    biggest = max(moments, key=lambda t: t.numel())
    needle = biggest.contiguous().numpy().tobytes()
    data = bytearray(src.read_bytes())
    at = data.find(needle)
    assert at >= 0 and data.find(needle, at + 1) < 0, "the tensor's bytes are not stored once"
    data[at + len(needle) // 2] ^= 0x40  # an exponent bit of one float: still finite
    dst.write_bytes(bytes(data))
    # torch itself reads the changed file without a word (its zip reader skips the CRCs)
    changed = torch.load(dst, weights_only=True)
    assert changed.keys() == ckpt.keys()


def test_a_byte_changed_in_an_adam_moment_is_refused_in_one_sentence(fitted, tmp_path, capsys):
    root, data, last = fitted
    bad = tmp_path / "flipped.ckpt"
    _flip_a_byte_in_exp_avg(last, bad)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert str(err.value) == (
        f"Checkpoint {bad} is corrupt: its optimizer_states differs from the checksum written "
        "with it; resume from an earlier checkpoint."
    )
    # through the command line, resuming from it: one line, status 2, nothing trained
    with pytest.MonkeyPatch.context() as mp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.chdir(root)
        status = cli.run(["fit", "--config", TINY, "--data.path", str(data),
                          "--trainer.max_epochs", "2", "--ckpt_path", str(bad)])  # fmt: skip
    assert status == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1] == f"error: {err.value}"
    assert not any("Traceback" in line for line in lines)


def test_no_checkpoint_with_a_nan_is_written(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    good = {"state_dict": {"w": torch.ones(3)}, "optimizer_states": [], "epoch": 0}
    io.save_checkpoint(good, path)
    diverged = {"state_dict": {"w": torch.tensor([1.0, float("nan"), 2.0])}, "epoch": 1}
    with pytest.raises(CheckpointError, match=r"Not writing checkpoint .*last\.ckpt: state_dict\.w "
                       "holds a NaN or infinity"):  # fmt: skip
        io.save_checkpoint(diverged, path)
    assert torch.equal(load_checkpoint(path)["state_dict"]["w"], torch.ones(3))  # kept whole
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    # a callback's best score not yet set is -inf, and is not the weights: written
    io.save_checkpoint(
        {**good, "callbacks": {"ES": {"best_score": torch.tensor(-torch.inf)}}}, path
    )
    assert load_checkpoint(path)["callbacks"]["ES"]["best_score"] == -torch.inf


def test_no_checkpoint_with_a_nan_is_read(tmp_path, fitted):
    _, _, last = fitted
    ckpt = torch.load(last, weights_only=True)
    ckpt.pop(CHECKSUMS_KEY)
    state = next(iter(ckpt["optimizer_states"][0]["state"].values()))
    state["exp_avg_sq"].view(-1)[0] = float("inf")
    ckpt[CHECKSUMS_KEY] = checksums(ckpt)  # consistent checksums: the value itself is refused
    torch.save(ckpt, tmp_path / "inf.ckpt")
    with pytest.raises(CheckpointError, match=r"inf\.ckpt holds a NaN or infinity in "
                       r"optimizer_states\.0\.state\.\d+\.exp_avg_sq"):  # fmt: skip
        load_checkpoint(tmp_path / "inf.ckpt")
    # a file written without checksums (plain torch.save) is checked for NaNs all the same
    torch.save({"state_dict": {"w": torch.tensor([float("nan")])}}, tmp_path / "nan.ckpt")
    with pytest.raises(
        CheckpointError, match=r"nan\.ckpt holds a NaN or infinity in state_dict\.w"
    ):
        load_checkpoint(tmp_path / "nan.ckpt")

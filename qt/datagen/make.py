"""`python -m qt.datagen NAME`: generate a dataset by the D4RL protocol and write it.

Owns the command line that dispatches a qt task name to its generator (maze2d-* here,
hopper/halfcheetah/walker2d-* in `qt.datagen.locomotion`) and writes the result as a
Minari dataset and as a D4RL-format hdf5 file, atomically, under qt's data root
(`$QT_DATA_DIR`, else ./data: `minari/qt/<name>` and `d4rl/<D4RL file name>`), where the
readers look by default. A dataset is one thing in two copies: each copy records the request
that made it (`request`: steps and seed in its qt metadata), both are written together, and a
run again with the same request has nothing to do (a copy missing beside a matching one is
written). A request whose size or seed differs from what is on disk, or two copies on disk that
disagree with each other, stop with one sentence saying so; --force replaces both copies.
Options the parser does not know (e.g. `--sac-steps 300000`) are passed to the
locomotion generator as keyword arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import h5py
import numpy as np
from tqdm import tqdm

from qt.data.paths import minari_dir
from qt.datagen import maze2d
from qt.datagen.generated import GeneratedDataset, arrays_digest
from qt.datagen.maze2d import D4RL_STEPS, parse_name
from qt.datagen.writers import episode_bounds, write_dataset
from qt.errors import ArgumentParser, UserError, report
from qt.tasks import get_task

LOCOMOTION = ("hopper", "halfcheetah", "walker2d")
LOCOMOTION_HELP = """locomotion options (hopper/halfcheetah/walker2d-*, see qt.datagen.locomotion):
  --sac-steps N          medium SAC run's budget of env steps (default 1000000)
  --target-return R      medium run stops at this evaluation return (default ref_max / 3)
  --expert-sac-steps N   expert SAC run's budget (default 1000000)
  --eval-every N, --eval-episodes N, --learning-starts N, --checkpoint-every N,
  --n-envs N, --deterministic, --max-episode-steps N, --progress 0
A stopped run resumes from its checkpoint under --work-dir when run again."""


def default_minari_root() -> Path:
    """The Minari root of qt's data root: `$QT_DATA_DIR/minari`, else ./data/minari."""
    return minari_dir()


def _hdf5_file_name(name: str) -> str:
    """The D4RL file name of a task (registry first, else `<name>.hdf5`)."""
    try:
        return get_task(name).dataset_file
    except ValueError:
        pass
    if name.startswith("maze2d-"):  # D4RL's naming: maze2d-umaze-sparse-v1.hdf5
        maze, dense = parse_name(name)
        return f"maze2d-{maze}-{'dense' if dense else 'sparse'}-{name.rsplit('-', 1)[1]}.hdf5"
    return f"{name}.hdf5"


def _parse_extra(extra: list[str]) -> dict[str, object]:
    """`--sac-steps 300000 --flag` -> {"sac_steps": 300000, "flag": True}."""
    out: dict[str, object] = {}
    i = 0
    while i < len(extra):
        key = extra[i]
        if not key.startswith("--") or len(key) < 3:
            raise ValueError(f"Unexpected argument {key!r}: expected --option [value].")
        value: object = True
        if i + 1 < len(extra) and not extra[i + 1].startswith("--"):
            raw = extra[i + 1]
            for cast in (int, float):
                try:
                    value = cast(raw)
                    break
                except ValueError:
                    value = raw
            i += 1
        out[key[2:].replace("-", "_")] = value
        i += 1
    return out


class _Progress:
    """A tqdm bar over generation steps (steps, rate, time left)."""

    def __init__(self, total: int | None, name: str):
        self.bar = tqdm(total=total, desc=name, unit="step", unit_scale=True, dynamic_ncols=True)
        self.done = 0

    def __call__(self, done: int) -> None:
        self.bar.update(done - self.done)
        self.done = done
        if self.bar.total is not None and done >= self.bar.total:
            self.bar.close()  # done: what follows is said on lines of its own

    def close(self) -> None:
        self.bar.close()


def _total_steps(name: str, steps: int | None) -> int | None:
    if steps is not None or not name.startswith("maze2d-"):
        return steps
    try:
        return D4RL_STEPS[parse_name(name)[0]]
    except ValueError:
        return None


# the locomotion generator's default dataset size (qt.datagen.locomotion.generate)
LOCOMOTION_STEPS = 1_000_000


def requested(name: str, steps: int | None, seed: int) -> dict[str, int | None]:
    """What a request asks for: its dataset size (the family's default filled in) and seed."""
    if steps is None:
        steps = _total_steps(name, None) if name.startswith("maze2d-") else LOCOMOTION_STEPS
    return {"steps": steps, "seed": seed}


def _recorded(meta: dict) -> dict[str, int | None]:
    """The request a copy on disk was made by: its `request` record, else (a copy written
    before requests were recorded) the generator's own metadata where it says."""
    if isinstance(meta.get("request"), dict):
        return {"steps": meta["request"].get("steps"), "seed": meta["request"].get("seed")}
    return {"steps": meta.get("steps"), "seed": meta.get("seed")}


def on_disk(minari_path: Path, hdf5_path: Path) -> dict[Path, dict[str, int | None]]:
    """The request recorded by each copy of a dataset that exists, by path."""
    found: dict[Path, dict[str, int | None]] = {}
    meta_file = minari_path / "data" / "metadata.json"
    if minari_path.exists():
        try:
            meta = json.loads(meta_file.read_text())
            found[minari_path] = _recorded(json.loads(meta.get("qt_metadata", "{}")))
        except (OSError, ValueError):
            found[minari_path] = {"steps": None, "seed": None}
    if hdf5_path.exists():
        try:
            with h5py.File(hdf5_path, "r") as f:
                found[hdf5_path] = _recorded(json.loads(f.attrs.get("qt_metadata", "{}")))
        except (OSError, ValueError):
            found[hdf5_path] = {"steps": None, "seed": None}
    return found


def _describe(request: dict[str, int | None]) -> str:
    steps = "an unrecorded number of" if request["steps"] is None else f"{request['steps']:,}"
    seed = "an unrecorded seed" if request["seed"] is None else f"seed {request['seed']}"
    return f"{steps} steps from {seed}"


def _differs(a: dict[str, int | None], b: dict[str, int | None]) -> bool:
    """True when two requests disagree on anything both of them record."""
    return any(a[k] is not None and b[k] is not None and a[k] != b[k] for k in ("steps", "seed"))


def check_request(name: str, want: dict, there: dict[Path, dict]) -> None:
    """Raise UserError when the copies on disk disagree with each other or with `want`."""
    copies = list(there.items())
    if len(copies) == 2 and _differs(copies[0][1], copies[1][1]):
        (pa, ra), (pb, rb) = copies
        raise UserError(
            f"{name}: its two copies on disk disagree ({pa} holds {_describe(ra)}, {pb} holds "
            f"{_describe(rb)}): pass --force to write both afresh from this request "
            f"({_describe(want)})."
        )
    for path, request in copies:
        if _differs(request, want):
            raise UserError(
                f"{name}: the dataset on disk ({path}) holds {_describe(request)}, but this "
                f"request is for {_describe(want)}: pass --force to replace it, or ask for "
                "what is there."
            )


def generate(
    name: str,
    *,
    steps: int | None,
    seed: int,
    work_dir: Path,
    extra: dict,
    progress: _Progress | None = None,
) -> GeneratedDataset:
    """Dispatch NAME to its family's generator (the locomotion one draws its own bars)."""
    family = name.split("-", 1)[0]
    if family == "maze2d":
        make, kwargs = maze2d.generate, {"progress": progress}
    elif family in LOCOMOTION:
        try:
            from qt.datagen import locomotion  # imported only when used
        except ImportError as err:
            raise ValueError(
                f"Dataset {name!r} needs qt.datagen.locomotion, which could not be imported ({err})."
            ) from err
        make, kwargs = locomotion.generate, {"work_dir": work_dir}
    else:
        raise ValueError(
            f"Dataset name {name!r}: expected a maze2d-* or {'/'.join(LOCOMOTION)}-* qt task name."
        )
    try:
        return make(name, steps=steps, seed=seed, **kwargs, **extra)
    except TypeError as err:  # an extra option the generator does not take
        if "unexpected keyword argument" in str(err):
            raise ValueError(f"Option not accepted by the {family} generator: {err}.") from err
        raise


def summary(ds: GeneratedDataset, seconds: float) -> str:
    """A few lines: steps, episodes, mean episode return, reference scores, time."""
    a = ds.arrays
    bounds = episode_bounds(a["terminals"], a["timeouts"])
    returns = np.add.reduceat(np.asarray(a["rewards"], np.float64), [s for s, _ in bounds])
    lengths = np.array([e - s for s, e in bounds])
    refs = f"ref scores     measured: min {ds.ref_min_score:.2f}, max {ds.ref_max_score:.2f}"
    behaviour = ""
    try:  # a name the generator accepts need not be a registered task (maze2d-umaze-v0)
        task = get_task(ds.name)
        refs += f"; scores use D4RL's {task.ref_min_score:.2f} / {task.ref_max_score:.2f}"
        score = (
            100 * (returns.mean() - task.ref_min_score) / (task.ref_max_score - task.ref_min_score)
        )
        behaviour = f" (normalised {score:.1f})"
    except ValueError:
        pass
    return "\n".join(
        [
            f"dataset        {ds.name} (evaluation env {ds.env_id})",
            f"steps          {len(a['rewards'])}"
            + (f" (seed {ds.metadata['request']['seed']})" if "request" in ds.metadata else ""),
            f"episodes       {len(bounds)} (length mean {lengths.mean():.1f}, max {lengths.max()})",
            f"return         mean {returns.mean():.3f}, std {returns.std():.3f}, "
            f"min {returns.min():.3f}, max {returns.max():.3f}{behaviour}",
            f"reward         mean per step {np.mean(a['rewards']):.4f}",
            refs,
            f"arrays sha256  {arrays_digest(a)}",
            f"time           {seconds:.1f} s",
        ]
    )


def _say(message: str) -> None:
    """A status line on stderr, below any progress bar."""
    tqdm.write(message, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = ArgumentParser(
        prog="python -m qt.datagen",
        description=__doc__.split("\n")[0],
        epilog=LOCOMOTION_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", help="qt task name, e.g. maze2d-umaze-v1 or hopper-medium-v2")
    parser.add_argument("--steps", type=int, default=None, help="dataset size (default: D4RL's)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="Minari root (default: $QT_DATA_DIR/minari, else ./data/minari)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--d4rl-hdf5",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also write a D4RL-format hdf5 file (default: yes; what data.source d4rl-hdf5 reads)",
    )
    parser.add_argument(
        "--hdf5-out",
        type=Path,
        default=None,
        help="hdf5 path (default: <out>/../d4rl/<dataset_file>)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="locomotion: SAC checkpoints (default: <out>/../work/<family>)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing dataset")
    args, unknown = parser.parse_known_args(argv)
    try:
        extra = _parse_extra(unknown)
        family = args.name.split("-", 1)[0]
        if family == "maze2d":
            parse_name(args.name)
        elif family not in LOCOMOTION:
            raise UserError(
                f"Dataset name {args.name!r}: expected a maze2d-* or {'/'.join(LOCOMOTION)}-* qt task name."
            )
        root = (args.out or default_minari_root()).resolve()
        hdf5_path = args.hdf5_out or root.resolve().parent / "d4rl" / _hdf5_file_name(args.name)
        # one work dir per family: medium, medium-replay and medium-expert share a SAC run
        work_dir = args.work_dir or root.resolve().parent / "work" / args.name.split("-", 1)[0]
    except (ValueError, UserError) as err:
        return report(err)
    minari_path = root / "qt" / args.name
    want = requested(args.name, args.steps, args.seed)
    there = on_disk(minari_path, hdf5_path)
    if not args.force:
        try:
            check_request(args.name, want, there)
        except UserError as err:
            return report(err)
    # what is there already is kept (unless --force): decided before minutes of generation
    want_minari = args.force or not minari_path.exists()
    want_hdf5 = args.d4rl_hdf5 and (args.force or not hdf5_path.exists())
    stale_hdf5 = args.force and not args.d4rl_hdf5 and hdf5_path in there
    if not (want_minari or want_hdf5):
        there = [str(minari_path)] + ([str(hdf5_path)] if args.d4rl_hdf5 else [])
        print(
            f"{args.name}: already there ({', '.join(there)}); nothing to do (--force replaces it)."
        )
        return 0
    t0 = time.perf_counter()
    # the locomotion generator draws its own bars (SAC training, then rollouts)
    progress = (
        _Progress(_total_steps(args.name, args.steps), args.name) if family == "maze2d" else None
    )
    if family == "maze2d":
        extra.setdefault("say", _say)
    try:
        ds = generate(
            args.name,
            steps=args.steps,
            seed=args.seed,
            work_dir=work_dir,
            extra=extra,
            progress=progress,
        )
    except (ValueError, FileNotFoundError, UserError) as err:
        return report(err)
    finally:
        if progress is not None:
            progress.close()
    ds.metadata["request"] = want  # each copy says what made it
    if want_minari:
        _say(f"writing Minari dataset qt/{ds.name} under {root} ...")
    if want_hdf5:
        _say(f"writing D4RL hdf5 {hdf5_path} ...")
    path, written = write_dataset(
        ds,
        root if want_minari else None,
        hdf5_path if want_hdf5 else None,
        force=args.force or minari_path.exists() or hdf5_path.exists(),
    )
    if stale_hdf5:  # --force --no-d4rl-hdf5: no older copy is left to disagree
        hdf5_path.unlink(missing_ok=True)
        print(f"removed {hdf5_path} (an older copy; --no-d4rl-hdf5 writes none)")
    if path is not None:
        print(f"wrote Minari dataset qt/{ds.name} to {path}")
    if written is not None:
        print(f"wrote D4RL hdf5 to {written}")
    print(summary(ds, time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One study job in its own process: `qt fit` (or its resumption), then `qt test` of the fit's
best checkpoint. `python -m qt.study.job SPEC_JSON`; the study runner starts it.

Both commands are `qt.cli.main(argv)`, what `qt fit|test ...` runs, in one process so
that a job pays Python's and Lightning's start-up once. The threads setting reaches torch here
and OMP/MKL through the environment the runner gives the process.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from pathlib import Path

from qt.checkpointing import best_checkpoint, checkpoint_dir


def _die_with_parent(parent: int) -> None:
    """SIGTERM when the study process dies (even by SIGKILL): the fit saves last.ckpt and stops."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent and os.getppid() != parent:  # the parent died before prctl
        sys.exit(143)


def _threads(spec: dict) -> None:
    import torch

    torch.set_num_threads(spec["threads"])
    print(f"[job] threads: torch {torch.get_num_threads()}, OMP_NUM_THREADS "
          f"{os.environ.get('OMP_NUM_THREADS')}, MKL_NUM_THREADS {os.environ.get('MKL_NUM_THREADS')}",
          flush=True)  # fmt: skip


_LOGGER = "--trainer.logger.init_args."


def _common(spec: dict) -> list[str]:
    return [f"{_LOGGER}experiment_name", spec["experiment"], f"{_LOGGER}save_dir", spec["save_dir"]]


def fit_argv(spec: dict) -> list[str]:
    """The arguments of `qt fit` for a job (without the subcommand)."""
    tags = {**spec["tags"], "qt.study.kind": "fit"}
    return [*spec["fit_args"], "--seed_everything", str(spec["seed"]), *_common(spec),
            f"{_LOGGER}run_name", spec["run_name"], f"{_LOGGER}tags", json.dumps(tags)]  # fmt: skip


def test_fit(spec: dict, fit_run: str) -> None:
    """`qt test` of the best checkpoint of fit run `fit_run`, in the job's test run."""
    from qt import cli

    best = best_checkpoint(checkpoint_dir(spec["save_dir"], spec["experiment_id"], fit_run))
    if best is None:
        raise SystemExit(f"error: fit run {fit_run} left no best-*.ckpt under {spec['save_dir']}.")
    tags = {**spec["tags"], "qt.study.kind": "test", "qt.study.fit_run": fit_run}
    argv = ["test", *spec["fit_args"], "--seed_everything", str(spec["seed"]), *_common(spec),
            f"{_LOGGER}run_name", spec["run_name"] + "-test", f"{_LOGGER}tags", json.dumps(tags),
            "--ckpt_path", str(best), "--episodes", str(spec["test_episodes"])]  # fmt: skip
    cli.main(argv)


def run(spec: dict) -> int:
    # qt.cli (torch, Lightning: seconds) is imported once the process would die with its
    # parent (_die_with_parent), so that a study killed meanwhile leaves no orphan fit
    if "pack" in spec:
        return run_pack(spec)
    from qt import cli

    _threads(spec)
    fit_run = spec.get("fit_run_id")
    if not spec.get("fit_finished"):
        argv = ["fit", *fit_argv(spec)]
        if spec.get("resume"):
            argv += ["--ckpt_path", f"run:{fit_run}"]  # qt.cli checks it is this configuration
            print(f"[job] resuming fit run {fit_run} from {spec['resume']}", flush=True)
        fit = cli.main(argv)
        fit_run = fit.trainer.logger.run_id
    test_fit(spec, fit_run)
    return 0


def run_pack(spec: dict) -> int:
    """Several jobs' fits as one pack (`qt.pack.fit`), then each member's test. A member
    whose test cannot run (no best checkpoint) fails alone; the study sees it in MLflow."""
    from qt.pack.fit import fit_pack

    _threads(spec)
    members = spec["pack"]
    pack_dir = Path(spec["pack_dir"])
    pack_dir.mkdir(parents=True, exist_ok=True)
    (pack_dir / "pack.json").write_text(
        json.dumps({"keys": [m["tags"]["qt.study.key"] for m in members]}, indent=1)
    )
    resume = "last" if spec.get("resume") else None
    names = ", ".join(m["run_name"] for m in members)
    print(f"[job] {'resuming' if resume else 'fitting'} a pack of {len(members)}: {names}",
          flush=True)  # fmt: skip
    fit = fit_pack([fit_argv(m) for m in members], pack_dir=pack_dir, ckpt_path=resume,
                   module_options=spec.get("module_options"))  # fmt: skip
    failed = 0
    for m, member in zip(members, fit.members):
        try:
            test_fit(m, member.logger.run_id)
        except SystemExit as err:
            print(f"[job] {m['run_name']}: {err}", flush=True)
            failed += 1
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    sys.argv = sys.argv[:1]  # cli.main gets its arguments explicitly
    _die_with_parent(spec.get("parent_pid", 0))
    from lightning.pytorch.utilities.exceptions import SIGTERMException  # after, as qt.cli

    try:
        return run(spec)
    except SIGTERMException:
        print("Stopped by SIGTERM; the study resumes this fit from last.ckpt.", file=sys.stderr)
        return 143


if __name__ == "__main__":
    sys.exit(main())

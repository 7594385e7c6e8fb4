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

from qt.checkpointing import best_checkpoint, checkpoint_dir


def _die_with_parent(parent: int) -> None:
    """SIGTERM when the study process dies (even by SIGKILL): the fit saves last.ckpt and stops."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent and os.getppid() != parent:  # the parent died before prctl
        sys.exit(143)


def run(spec: dict) -> int:
    # qt.cli (torch, Lightning: seconds) is imported once the process would die with its
    # parent (_die_with_parent), so that a study killed meanwhile leaves no orphan fit
    import torch

    from qt import cli

    torch.set_num_threads(spec["threads"])
    print(
        f"[job] threads: torch {torch.get_num_threads()}, OMP_NUM_THREADS "
        f"{os.environ.get('OMP_NUM_THREADS')}, MKL_NUM_THREADS {os.environ.get('MKL_NUM_THREADS')}",
        flush=True,
    )

    logger = "--trainer.logger.init_args."
    common = [f"{logger}experiment_name", spec["experiment"], f"{logger}save_dir", spec["save_dir"]]
    tags = dict(spec["tags"])
    fit_run = spec.get("fit_run_id")
    if not spec.get("fit_finished"):
        argv = [
            "fit",
            *spec["fit_args"],
            "--seed_everything",
            str(spec["seed"]),
            *common,
            f"{logger}run_name",
            spec["run_name"],
            f"{logger}tags",
            json.dumps({**tags, "qt.study.kind": "fit"}),
        ]
        if spec.get("resume"):
            argv += ["--ckpt_path", f"run:{fit_run}"]  # qt.cli checks it is this configuration
            print(f"[job] resuming fit run {fit_run} from {spec['resume']}", flush=True)
        fit = cli.main(argv)
        fit_run = fit.trainer.logger.run_id
    experiment_id = spec["experiment_id"]
    best = best_checkpoint(checkpoint_dir(spec["save_dir"], experiment_id, fit_run))
    if best is None:
        raise SystemExit(f"error: fit run {fit_run} left no best-*.ckpt under {spec['save_dir']}.")
    argv = [
        "test",
        *spec["fit_args"],
        "--seed_everything",
        str(spec["seed"]),
        *common,
        f"{logger}run_name",
        spec["run_name"] + "-test",
        f"{logger}tags",
        json.dumps({**tags, "qt.study.kind": "test", "qt.study.fit_run": fit_run}),
        "--ckpt_path",
        str(best),
        "--episodes",
        str(spec["test_episodes"]),
    ]
    cli.main(argv)
    return 0


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

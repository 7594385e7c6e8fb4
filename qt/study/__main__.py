"""`python -m qt.study run STUDY.yaml | report NAME` (see qt.study)."""

from __future__ import annotations

import argparse
import os
import sys

from qt.console import quiet
from qt.errors import ArgumentParser
from qt.study.merge import merge as merge_study
from qt.study.report import report
from qt.study.runner import run as run_study
from qt.study.spec import load_study
from qt.study.store import study_from_store


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m qt.study",
        description="Run a study of tasks x variants x seeds and report it with rliable.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run or resume a study file (finished runs are skipped)")
    run.add_argument("study", help="a study file, e.g. configs/studies/maze2d-umaze-cpu.yaml")
    run.add_argument("--backend", choices=("local", "ray"), default="local")
    run.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: $RAY_ADDRESS, else a local instance)",
    )
    run.add_argument("--workers", type=int, default=None, help="override the file's workers")
    run.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="run only these of the file's seeds (the rest on other machines; then `merge`)",
    )
    run.add_argument(
        "--pack",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train jobs that differ only in seed and scalar settings together as packs "
        "(default: where a GPU is; on a CPU a pack is no faster than separate fits, "
        "docs/speed.md); --no-pack: every job in its own process",
    )
    run.add_argument(
        "--pack-size",
        type=int,
        default=None,
        help="at most this many fits in a pack (default: from memory, at most 16)",
    )
    run.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the packs' training step (default: on a GPU only; see docs/speed.md)",
    )
    run.add_argument(
        "--check", action="store_true", help="validate the study file with cli.py's parser and stop"
    )
    rep = sub.add_parser("report", help="write the report of a study from MLflow")
    rep.add_argument("name", help="the study's name")
    rep.add_argument("--save-dir", default="runs", help="the study's save_dir (default: runs)")
    rep.add_argument("--results", default=None, help="default: the study file's (results)")
    merge = sub.add_parser(
        "merge",
        help="copy a study's finished runs from another machine's MLflow store into this one",
    )
    merge.add_argument("name", help="the study's name (it must have run here, on any seeds)")
    merge.add_argument("source", help="the other store: its mlflow.db file, or a tracking URI")
    merge.add_argument("--save-dir", default="runs", help="this study's save_dir (default: runs)")
    args = parser.parse_args(argv)
    quiet()  # no MLflow set-up lines when the study opens the store
    os.environ.setdefault("MPLBACKEND", "Agg")
    if args.command == "run":
        study = load_study(args.study)
        if args.workers is not None:
            if args.workers < 1:
                raise SystemExit(f"error: --workers {args.workers}: expected a whole number >= 1.")
            study.workers = args.workers
        if args.seeds is not None:
            study.select_seeds(args.seeds)
        if args.check:
            here = "" if study.selected is None else f", {len(study.jobs_here())} of them here"
            print(f"[study] {study.name}: {len(study.jobs())} runs{here}; the study file is valid.")
            return 0
        if args.pack_size is not None and args.pack_size < 1:
            raise SystemExit(f"error: --pack-size {args.pack_size}: expected a whole number >= 1.")
        return run_study(study, args.backend, args.address, pack=args.pack,
                         pack_limit=args.pack_size, compile=args.compile)  # fmt: skip
    if args.command == "merge":
        n = merge_study(args.name, args.source, args.save_dir)
        print(
            f"[study] {args.name}: copied {n['copied']} jobs from {args.source} "
            f"({n['here']} were done here already, {n['absent']} are done on neither"
            f"{_other(n['other'])}); "
            f"`python -m qt.study report {args.name}` reports them.",
            flush=True,
        )
        return 0
    study = study_from_store(args.name, args.save_dir, args.results)
    result, path = report(study)
    print(result.markdown(), flush=True)
    print(f"[study] report: {path}/", flush=True)
    return 0


def _other(n: int) -> str:
    return (
        f"; {n} finished fits there are of another version of the study file, left there"
        if n
        else ""
    )


if __name__ == "__main__":
    sys.exit(main())

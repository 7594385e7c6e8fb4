"""`python -m qt.pack fit --seeds 0 1 2 [--ckpt_path last] -- FIT ARGS...`: the seeds of one
`qt fit` configuration trained as one pack (each seed its own MLflow run and checkpoints).

`--member "ARGS"` (repeatable) gives members their own settings instead, e.g.
`--member "--seed_everything 0" --member "--seed_everything 0 --model.eta 0"`.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    shared: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, shared = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="python -m qt.pack", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="train a pack; the arguments after -- are `qt fit`'s")
    fit.add_argument("--seeds", type=int, nargs="+", default=None, help="one member per seed")
    fit.add_argument("--member", action="append", default=None,
                     help="one member's own `qt fit` arguments (repeatable)")  # fmt: skip
    fit.add_argument("--ckpt_path", choices=("last",), default=None,
                     help="resume the pack from its last.ckpt")  # fmt: skip
    fit.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                     help="compile the training step (default: on a GPU only)")  # fmt: skip
    args = parser.parse_args(argv)
    if bool(args.seeds) == bool(args.member):
        parser.error("give the members with either --seeds or --member.")
    own = ([["--seed_everything", str(s)] for s in args.seeds] if args.seeds
           else [shlex.split(m) for m in args.member])  # fmt: skip
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from qt.errors import UserError, report
    from qt.pack.fit import fit_pack

    try:
        done = fit_pack([shared + m for m in own], ckpt_path=args.ckpt_path,
                        module_options=None if args.compile is None else {"compile": args.compile})  # fmt: skip
    except SIGTERMException:
        print("Stopped by SIGTERM; resume with --ckpt_path last.", file=sys.stderr)
        return 143
    except UserError as err:
        return report(err)
    print(f"pack {done.pack_dir}: runs {', '.join(done.run_ids)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`python -m bench [NAME ...] [--option ...]`: run the benchmarks (all by default), each printing
its own table; options after the names go to each benchmark.

Each benchmark is a module `bench/<name>.py` with a `main()`; every figure is set against
something the same run measures: a baseline it runs side by side (the sampler's per-sample
loop, acting one episode at a time) or this machine's peak matmul rate at the same shapes.
"""

import importlib
import pkgutil
import sys
from pathlib import Path


def main() -> None:
    here = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))
    args = sys.argv[1:]
    split = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    wanted, options = args[:split] or names, args[split:]  # options go to each benchmark
    for name in wanted:
        if name not in names:
            raise SystemExit(f"Unknown benchmark {name!r}: expected one of {', '.join(names)}.")
        print(f"=== bench/{name}.py", flush=True)
        main = importlib.import_module(f"bench.{name}").main
        main(options) if options else main()


if __name__ == "__main__":
    main()

"""`python -m bench [NAME ...]`: run the benchmarks (all by default), each printing its own table.

Each benchmark is a module `bench/<name>.py` with a `main()`; figures are ratios measured
side by side in one run.
"""

import importlib
import pkgutil
import sys
from pathlib import Path


def main() -> None:
    here = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if not m.name.startswith("_"))
    wanted = sys.argv[1:] or names
    for name in wanted:
        if name not in names:
            raise SystemExit(f"Unknown benchmark {name!r}: expected one of {', '.join(names)}.")
        print(f"=== bench/{name}.py", flush=True)
        importlib.import_module(f"bench.{name}").main()


if __name__ == "__main__":
    main()

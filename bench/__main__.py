"""`python -m bench [NAME ...] [--option ...]`: run the benchmarks (all by default), each printing
its own table; options after the names go to each benchmark (`python -m bench NAME --help`
lists a benchmark's options, `python -m bench --help` the benchmarks).

Each benchmark is a module `bench/<name>.py` with a `main(argv)`; every figure is set against
something the same run measures: a baseline it runs side by side (the sampler's per-sample
loop, acting one episode at a time) or this machine's peak matmul rate at the same shapes.
"""

import ast
import importlib
import pkgutil
import sys
from pathlib import Path

HERE = Path(__file__).parent


def benchmarks() -> dict[str, str]:
    """name -> the first line of its module docstring (read without importing torch)."""
    names = sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if not m.name.startswith("_"))
    docs = {}
    for name in names:
        doc = " ".join(
            (ast.get_docstring(ast.parse((HERE / f"{name}.py").read_text())) or "").split()
        )
        first = doc.split(". ")[0]
        docs[name] = first if len(first) <= 80 else first[:77].rsplit(" ", 1)[0] + " ..."
    return docs


def usage() -> str:
    lines = [__doc__.split("\n\n")[0], "", "benchmarks:"]
    lines += [f"  {name:<12}{what}" for name, what in benchmarks().items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    names = list(benchmarks())
    split = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    wanted, options = args[:split], args[split:]  # options go to each benchmark
    if not wanted and {"-h", "--help"} & set(options):
        print(usage())
        return
    for name in wanted or names:
        if name not in names:
            raise SystemExit(f"Unknown benchmark {name!r}: expected one of {', '.join(names)}.")
        print(f"=== bench/{name}.py", flush=True)
        importlib.import_module(f"bench.{name}").main(options)


if __name__ == "__main__":
    main()

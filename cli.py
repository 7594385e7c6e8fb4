"""`python cli.py fit|validate|test ...`: the same as the `qt` command (qt/cli.py)."""

import sys

from qt.cli import run

if __name__ == "__main__":
    sys.exit(run())

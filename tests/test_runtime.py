"""keep_freed_memory: large freed blocks are reused instead of being faulted in afresh."""

from __future__ import annotations

import subprocess
import sys

import pytest

from qt.runtime import keep_freed_memory

SCRIPT = """
import resource, sys
from qt.runtime import keep_freed_memory
took = keep_freed_memory()
import numpy as np
for _ in range(3):
    np.ones(8 * 2**20)  # 64 MiB, touched, then freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    np.ones(8 * 2**20)
print(took, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(env_value: str) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env={"QT_KEEP_FREED_MEMORY": env_value, "PATH": ""},
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_freed_blocks_are_reused_without_page_faults():
    took, tuned = _faults("1")
    off, plain = _faults("0")
    assert (took, off) == ("True", "False")
    # every freshly mapped 64 MiB block faults its pages in (fewer faults with transparent huge
    # pages, but hundreds per block); reused heap memory is already resident
    assert plain >= 20 * 100
    assert tuned < plain / 20


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("QT_KEEP_FREED_MEMORY", "0")
    assert keep_freed_memory() is False

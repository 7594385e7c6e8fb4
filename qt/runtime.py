"""Process-wide settings for fast CPU training.

`keep_freed_memory()`: glibc's malloc hands every large block (the activations of a training
step are tens of MB each) straight back to the system when it is freed and maps fresh pages for
the next one, so each step pays a page fault per 4 KiB it touches: here about a tenth of a
published-size step on the CPU goes to that (measured: 2.45 s -> 2.22 s per actor step, page
faults 1.47M -> 0.57M). Asking malloc to keep freed memory in its heap removes that cost; the
price is that the process's resident size stays at its peak. `cli.py` calls it; set
QT_KEEP_FREED_MEMORY=0 to leave malloc alone. It does nothing off glibc.

`start_module(...)`: how qt starts a process of its own (a study's job, the demo's fits): `python
-m MODULE ...` with this interpreter, a set number of threads and its output in a log file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import subprocess
import sys
from pathlib import Path

import torch

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse; True when it took effect."""
    if os.environ.get("QT_KEEP_FREED_MEMORY", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1  # large blocks from the heap, not fresh mappings
    ok &= mallopt(_M_TRIM_THRESHOLD, 2**30) == 1  # never shrink the heap below 1 GiB of slack
    return bool(ok)


# ----------------------------------------------------------------------------- accelerators
def cpu_has_amx(flags: str | None = None) -> bool:
    """Whether this CPU has AMX for bf16 (the `amx_bf16` flag of /proc/cpuinfo).

    bf16 autocast pays on the CPU only with AMX (measured: 1.36x at d=128 with AMX; slower at
    width 64, and slower without AMX, where bf16 matmuls are emulated or run at fp32 speed).
    `flags` stands in for /proc/cpuinfo's text in tests.
    """
    if flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = f.read()
        except OSError:
            return False
    return "amx_bf16" in flags.split()


def autocast_dtype(device_type: str, amx: bool | None = None) -> torch.dtype | None:
    """The autocast dtype a packed step uses on `device_type`: bf16 on CUDA and on a CPU with
    AMX, else None (float32 throughout). `amx` overrides the detection (tests)."""
    if device_type == "cuda":
        return torch.bfloat16
    if device_type == "cpu" and (cpu_has_amx() if amx is None else amx):
        return torch.bfloat16
    return None


def compile_mode(device_type: str) -> str | None:
    """torch.compile's mode for a packed step: CUDA graphs on a GPU ("reduce-overhead": a
    published-size step is bound by ~500 kernel launches), inductor's default on the CPU."""
    return "reduce-overhead" if device_type == "cuda" else None


def compile_by_default(device_type: str) -> bool:
    """Whether a packed step is compiled when nobody says: on CUDA, yes (launch-bound); on the
    CPU, no. Measured on a 2-core EPYC (docs/speed.md): the compiled CPU step was no faster
    than the eager one, and compiling it took 5-12 minutes, longer than a short fit."""
    return device_type == "cuda"


def enable_tf32(device_type: str) -> bool:
    """TF32 matmuls on CUDA (float32 matmuls outside autocast); nothing elsewhere. True when set."""
    if device_type != "cuda":
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True


def start_module(
    args: list[str],
    log: str | os.PathLike,
    threads: int,
    cwd: str | os.PathLike | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen:
    """Start `python -m ARGS` (this interpreter), its stdout and stderr appended to `log`.

    torch, OpenMP, MKL and OpenBLAS get `threads` threads each (side-by-side processes must
    not each take every core); output is unbuffered, so the log is current; matplotlib draws
    off-screen; `extra_env` adds variables of its own (a fit's QT_STATUS_FILE).
    """
    n = str(threads)
    env = dict(
        os.environ,
        OMP_NUM_THREADS=n,
        MKL_NUM_THREADS=n,
        OPENBLAS_NUM_THREADS=n,
        PYTHONUNBUFFERED="1",
        MPLBACKEND="Agg",
        **(extra_env or {}),
    )
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as handle:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", *args], cwd=cwd, env=env, stdout=handle, stderr=subprocess.STDOUT
        )

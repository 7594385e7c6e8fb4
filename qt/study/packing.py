"""Which of a study's jobs train together as one pack (`qt.pack`), and with how many threads.

Jobs are compatible when their fits differ only in the seed and the scalar settings a pack
member may have of its own (`qt.pack.loop.MEMBER_SETTINGS`): the same task, the same
architecture, data and schedule. Compatible jobs still to fit are cut, in the runner's order,
into packs of at most `pack_size(...)` members, as even as possible; fits of another recipe
than QT's (`model.train_critic: false`, AdamW, a warm-up: the Decision Transformer) run alone. A pack is named by its
members' job keys (`<save_dir>/<experiment id>/packs/<id>/`); an interrupted pack whose
last.ckpt is there is formed again with the same members and resumed from it. Jobs that only
need their test, and interrupted fits that ran alone, run alone as before.

Threads: the machine's cores are divided among the processes that run at once
(cores // concurrent processes, at least 1), so that fits never oversubscribe the cores.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from qt.pack.loop import MEMBER_SETTINGS, QT_RECIPE

_MEMBER_FLAGS = {f"--model.{k}" for k in MEMBER_SETTINGS}


@dataclass
class Unit:
    """One process of the study: one job (`indices` of one) or a pack of several."""

    indices: list[int]  # into the runner's todo list
    pack_dir: str | None = None  # a pack's folder; None: a job alone
    resume: bool = False  # a pack that continues from its last.ckpt
    spec: dict = field(default_factory=dict)

    @property
    def is_pack(self) -> bool:
        return self.pack_dir is not None


def compatibility(fit_args: tuple[str, ...]) -> tuple[str, ...]:
    """A job's fit arguments without the member settings: equal for jobs that can pack."""
    args, out, i = list(fit_args), [], 0
    while i < len(args):
        if args[i] in _MEMBER_FLAGS and i + 1 < len(args):
            i += 2
            continue
        out.append(args[i])
        i += 1
    return tuple(out)


def pack_name(keys: list[str]) -> str:
    return hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]


def pack_by_default() -> bool:
    """Whether a study packs when nobody says: where a GPU is (ten fits as one step fill it),
    not on a CPU. Measured on a 2-core EPYC (docs/speed.md): a pack of five maze2d-medium fits
    ran at 0.45 steps/s (2.3 fit-steps/s on its core) where separate one-thread fits ran at
    2.7-3.7 steps/s each; batched matmuls run no nearer a core's peak than one fit's, so
    packing saves nothing there while its dropout and copies cost."""
    import torch

    return torch.cuda.is_available()


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def threads_for(concurrent: int) -> int:
    """Threads of each process when `concurrent` processes share the machine's cores."""
    return max(1, cores() // max(1, concurrent))


def available_memory() -> int:
    """Bytes of memory available now (MemAvailable); a large number where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40


def member_bytes(config) -> int:
    """A generous estimate of one member's training memory: parameters, their Adam moments,
    gradients and target copies (x6), and the step's activations (x4 for the backward)."""
    m, d = config.model, config.data
    h, layers, c = m.hidden_size, m.n_layer, m.critic_hidden_size or m.hidden_size
    params = 12 * layers * h * h + 2 * 3 * c * c
    tokens = d.batch_size * 3 * d.K
    activations = tokens * h * layers * 32 + d.batch_size * m.n_head * (3 * d.K) ** 2 * layers
    return 4 * (6 * params + 4 * activations)


def pack_size(config, limit: int | None = None, memory: int | None = None) -> int:
    """The most members a pack of this configuration takes: half the available memory over a
    member's estimate, at most `limit` (16 by default: beyond it a step is already large)."""
    budget = (available_memory() if memory is None else memory) // 2
    return max(1, min(limit or 16, budget // max(1, member_bytes(config))))


def plan(todo: list, specs: list[dict], pack: bool, limit: int | None, config_of) -> list[Unit]:
    """The study's processes: packs of compatible jobs to fit, the other jobs alone.

    todo: the runner's job states, in its order; specs: their job specs (`runner._spec`);
    config_of(job): the parsed fit config of a job (for the pack size).
    """
    alone = [i for i, s in enumerate(specs) if not pack or s.get("fit_finished")]
    units: list[Unit] = []
    fresh: dict[tuple, list[int]] = {}
    # interrupted packs first: the same members again, from the pack's last.ckpt
    taken: set[int] = set()
    if pack:
        by_key = {todo[i].job.key: i for i, s in enumerate(specs) if not s.get("fit_finished")}
        exp_dirs = {Path(s["save_dir"]) / s["experiment_id"] for s in specs}
        for exp_dir in exp_dirs:
            for info in sorted((exp_dir / "packs").glob("*/pack.json")):
                keys = json.loads(info.read_text())["keys"]
                if not (info.parent / "last.ckpt").is_file():
                    continue
                if all(k in by_key and "resume" in specs[by_key[k]] for k in keys):
                    idx = [by_key[k] for k in keys]
                    taken.update(idx)
                    units.append(Unit(idx, str(info.parent), resume=True))
    for i, s in enumerate(specs):
        if i in taken or i in alone:
            continue
        if "resume" in s:  # a fit that ran alone resumes alone
            alone.append(i)
            continue
        job = todo[i].job
        fresh.setdefault((job.task, compatibility(job.fit_args)), []).append(i)
    for indices in fresh.values():
        config = config_of(todo[indices[0]].job)
        if any(getattr(config.model, k, ok) != ok for k, ok in QT_RECIPE.items()):
            alone.extend(indices)  # the Decision Transformer's recipe: not a packed step
            continue
        size = pack_size(config, limit)
        n = math.ceil(len(indices) / size)
        cut = [len(indices) * k // n for k in range(n + 1)]  # n packs, as even as possible
        for a, b in zip(cut, cut[1:]):
            members = indices[a:b]
            if len(members) == 1:
                alone.append(members[0])
                continue
            keys = [todo[j].job.key for j in members]
            s = specs[members[0]]
            where = Path(s["save_dir"]) / s["experiment_id"] / "packs" / pack_name(keys)
            units.append(Unit(members, str(where)))
    units += [Unit([i]) for i in sorted(alone)]
    return sorted(units, key=lambda u: min(u.indices))


__all__ = ["Unit", "compatibility", "pack_by_default", "pack_size", "plan", "threads_for"]

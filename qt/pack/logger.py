"""One logger for a pack that writes to N MLflow runs, one per member.

The pack's callbacks log member i's metrics under the prefix `m<i>/` (`qt.pack.callbacks`);
Lightning's logger connector gathers them as it does a fit's (every `log_every_n_steps`, and at
the end of an iteration) and this logger sends each to its member's run without the prefix, with
the `epoch` Lightning adds, at the step Lightning gives: the step a separate fit logs it at.
"""

from __future__ import annotations

import re

from lightning.pytorch.loggers.logger import Logger, rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only

_MEMBER = re.compile(r"^m(\d+)/(.+)$")


class FanOutLogger(Logger):
    """Routes `m<i>/<name>` to member i's logger as `<name>`; other keys go with them."""

    def __init__(self, loggers: list) -> None:
        super().__init__()
        self.loggers = loggers

    @property
    def name(self) -> str:
        return "pack"

    @property
    def version(self) -> str:
        return "+".join(str(lg.run_id) for lg in self.loggers)

    @property
    def save_dir(self) -> str | None:
        return self.loggers[0].save_dir

    @property
    @rank_zero_experiment
    def experiment(self) -> list:
        return [lg.experiment for lg in self.loggers]

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        per_member: dict[int, dict[str, float]] = {}
        shared: dict[str, float] = {}
        for key, value in metrics.items():
            match = _MEMBER.match(key)
            if match:
                per_member.setdefault(int(match.group(1)), {})[match.group(2)] = value
            else:
                shared[key] = value  # `epoch`: a member's run gets it with its own metrics
        for i, values in per_member.items():
            self.loggers[i].log_metrics({**values, **shared}, step)

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        """The pack's own hyperparameters are not a member's: each member's run gets its
        fit's (`qt.pack.callbacks.PackedMembers`)."""

    @rank_zero_only
    def finalize(self, status: str) -> None:
        for lg in self.loggers:
            lg.finalize(status)

    def save(self) -> None:
        for lg in self.loggers:
            lg.save()


__all__ = ["FanOutLogger"]

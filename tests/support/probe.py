"""A callback for subprocess tests: records what each rank saw and ended with."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch


def _cpu(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class Probe(L.Callback):
    """Saves to $QT_PROBE_DIR/rank<r>.pt: the module's state at the start of training, every
    batch this rank trained on, and the module's state at the end."""

    def __init__(self) -> None:
        self.record: dict = {"batches": []}

    def on_train_start(self, trainer, pl_module) -> None:
        self.record["start"] = _cpu(pl_module)
        self.record["hparams"] = dict(pl_module.hparams)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.record["batches"].append(tuple(t.detach().cpu().clone() for t in batch))

    def on_train_end(self, trainer, pl_module) -> None:
        self.record["end"] = _cpu(pl_module)
        self.record["world_size"] = trainer.world_size
        out = Path(os.environ["QT_PROBE_DIR"]) / f"rank{trainer.global_rank}.pt"
        torch.save(self.record, out)


class MetricsProbe(L.Callback):
    """Saves to $QT_PROBE_DIR/metrics.pt the metrics the loop held at the end of every epoch
    (after the evaluation callback logged its own) and the train metrics of every batch."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []
        self.steps: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        values = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")
        }
        self.steps.append(values)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append({k: float(v) for k, v in trainer.callback_metrics.items()})

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"epochs": self.epochs, "steps": self.steps},
                   Path(os.environ["QT_PROBE_DIR"]) / "metrics.pt")  # fmt: skip


class StepProbe(L.Callback):
    """Touches $QT_PROBE_DIR/stepped when the first training batch starts (and writes it at
    once, so a run that fails later still shows that it trained)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        (Path(os.environ["QT_PROBE_DIR"]) / "stepped").touch()

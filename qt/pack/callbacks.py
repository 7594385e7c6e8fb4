"""The callbacks of a pack: each member's targets, metrics, evaluation, early stop and checkpoints.

A member is made of the objects its separate fit would have (built by `cli.py`'s own parser,
`qt.pack.fit`): its logger, data module, `Evaluation`, `EarlyStopping` and `ModelCheckpoint`s.
The pack's callbacks drive them with the member's module (`member_module(i)`) so that, seen
from outside, the member is that fit: its train metrics reach its MLflow run at the steps the
fit logs them, its evaluation uses its own episodes, its best score, patience and checkpoint
files are its own, and its checkpoints are ordinary qt checkpoints (`cli.py test` takes them).

Order at the end of an iteration is Lightning's: `PackedMembers` (evaluation) before the
module's `on_train_epoch_end` (schedules, eta2), `PackedCheckpoints` (a `Checkpoint`, so
Lightning runs it after the module) last: what a fit's EarlyStopping and ModelCheckpoint see.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from lightning.pytorch.callbacks import Checkpoint, EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

from qt.callbacks.evaluation import Evaluation
from qt.callbacks.targets import TargetNetworks
from qt.console import say


@dataclass
class Member:
    """Member i of a pack: the objects of its separate fit, and where it stands."""

    index: int
    seed: int
    logger: object  # qt.tracking.MLFlowLogger
    datamodule: object  # QTDataModule
    callbacks: list  # its fit's callbacks (Evaluation, EarlyStopping, ModelCheckpoint, ...)
    hparams: dict  # its module's hyperparameters, as its fit logs them
    stopped: str = ""  # "" while it trains; "early stop" or "nonfinite" once it stopped
    score: float | None = None  # its latest evaluation score (what its callbacks monitor)
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"member {self.index} (seed {self.seed})"

    def of(self, kind: type) -> list:
        return [cb for cb in self.callbacks if isinstance(cb, kind)]

    @property
    def evaluation(self) -> Evaluation | None:
        found = self.of(Evaluation)
        return found[0] if found else None

    @property
    def ckpt_dir(self) -> Path:
        lg = self.logger
        return Path(lg.save_dir) / str(lg.experiment_id) / str(lg.run_id) / "checkpoints"

    def trainer_view(self, trainer: L.Trainer) -> SimpleNamespace:
        """What the member's own callbacks read of a trainer, as its separate fit's would be."""
        return SimpleNamespace(
            current_epoch=trainer.current_epoch, max_epochs=trainer.max_epochs, global_rank=0,
            world_size=1, datamodule=self.datamodule, loggers=[self.logger], logger=self.logger,
            progress_bar_callback=None, callbacks=self.callbacks,
            checkpoint_callbacks=self.of(ModelCheckpoint), is_global_zero=True,
            callback_metrics={},
        )  # fmt: skip


def log_epoch_end(trainer: L.Trainer, m: Member, metrics: dict[str, float]) -> None:
    """Member m's end-of-iteration metrics, written to its run now, before any checkpoint of
    the iteration (a pack killed after its last.ckpt has logged them), at the step and in the
    float32 a fit's Lightning logs them at (the iteration's last step index)."""
    step = trainer.fit_loop.epoch_loop._batches_that_stepped - 1
    values = {k: float(torch.tensor(v, dtype=torch.float32)) for k, v in metrics.items()}
    m.logger.log_metrics(values, step=step)


def prefix(i: int) -> str:
    """The metric prefix that routes a metric to member i's run (`qt.pack.logger`)."""
    return f"m{i}/"


class PackedMembers(L.Callback):
    """Each member's run (params, config, train metrics), evaluation and closing artifacts."""

    def __init__(self, members: list[Member]) -> None:
        self.members = members

    def setup(self, trainer, pl_module, stage: str) -> None:
        for m in self.members:  # a task whose environment cannot be made stops before a step
            if m.evaluation is not None:
                m.evaluation.setup(m.trainer_view(trainer), pl_module, stage)

    def on_fit_start(self, trainer, pl_module) -> None:
        for m in self.members:
            view = m.trainer_view(trainer)
            new = not m.logger.experiment.get_run(m.logger.run_id).data.params
            for cb in m.callbacks:  # first, as in a fit (its setup)
                if hasattr(cb, "save_config"):  # cli.py's MLflowConfig: the resolved config
                    cb.save_config(view, None, "fit")
            if new:  # Lightning logs the module's hyperparameters when the run is new
                m.logger.log_hyperparams(m.hparams)
            m.ckpt_dir.mkdir(parents=True, exist_ok=True)
            for cb in m.of(ModelCheckpoint):
                cb.dirpath = str(m.ckpt_dir)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        log_now = trainer._logger_connector.should_update_logs
        for m in self.members:
            metrics = pl_module.last_metrics[m.index]
            if not metrics or m.stopped:
                continue
            if float(metrics.get("train/nonfinite", 0.0)):
                self._nonfinite(trainer, m)
            elif log_now:  # what a fit logs every log_every_n_steps (only then written)
                pl_module.log_dict(
                    {prefix(m.index) + k: v for k, v in metrics.items() if k != "train/nonfinite"},
                    on_step=True, on_epoch=False,
                )  # fmt: skip
        if all(m.stopped for m in self.members):
            trainer.should_stop = True

    def _nonfinite(self, trainer, m: Member) -> None:
        """The module made the member inactive: its run says so; the others go on."""
        m.stopped = "nonfinite"
        step = trainer.fit_loop.epoch_loop._batches_that_stepped
        m.logger.log_metrics({"train/nonfinite": 1.0}, step=step)
        m.logger.experiment.set_tag(m.logger.run_id, "qt.pack.stopped", "nonfinite")
        say(trainer, f"{m.label}: a loss or gradient norm is not finite at step {step + 1}; "
                     "it stops there, the other members go on")  # fmt: skip

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        for m in self.members:
            if m.stopped or m.evaluation is None:
                continue
            module = pl_module.member_module(m.index)
            metrics = m.evaluation.evaluate_iteration(
                m.trainer_view(trainer), module, trainer.current_epoch, label=f"{m.label}: "
            )
            if metrics is not None:
                m.score = metrics["eval/normalized_score"]
                log_epoch_end(trainer, m, metrics)

    def on_fit_end(self, trainer, pl_module) -> None:
        for m in self.members:
            view = m.trainer_view(trainer)
            for cb in m.callbacks:  # MLflowArtifacts, Console: the fit's closing work
                if type(cb).__name__ in ("MLflowArtifacts", "Console"):
                    cb.on_fit_end(view, None)

    def state_dict(self) -> dict:
        return {
            "members": [
                {"seed": m.seed, "run_id": m.logger.run_id, "stopped": m.stopped,
                 "score": m.score, "callbacks": _states(m.callbacks)}
                for m in self.members
            ]
        }  # fmt: skip

    def load_state_dict(self, state_dict: dict) -> None:
        for m, saved in zip(self.members, state_dict["members"]):
            m.stopped, m.score = saved["stopped"], saved["score"]
            for cb in m.of(ModelCheckpoint):  # in its folder, or it forgets its best score
                cb.dirpath = str(m.ckpt_dir)
            for cb in m.callbacks:
                if cb.state_key in saved["callbacks"]:
                    cb.load_state_dict(saved["callbacks"][cb.state_key])


def _states(callbacks: list) -> dict:
    out = {}
    for cb in callbacks:
        state = cb.state_dict()
        if state:
            out[cb.state_key] = state
    return out


class PackedCheckpoints(Checkpoint):
    """Each member's early stopping and checkpoints, and the pack's own last.ckpt.

    Per member, as its fit's callbacks would: its EarlyStopping looks at its latest score,
    its monitored ModelCheckpoint keeps `best-epoch=N.ckpt` of its best score, its other one
    writes `last.ckpt` every iteration, in `<save_dir>/<experiment id>/<run id>/checkpoints/`
    (the study and `cli.py` look there). A member that stops is made inactive after its last
    checkpoint. The pack's last.ckpt (`pack_last`) holds the whole pack, so that
    `--ckpt_path last` resumes it where it was; every file is written atomically.
    """

    def __init__(self, members: list[Member], pack_last: Path) -> None:
        self.members = members
        self.pack_last = Path(pack_last)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        for m in self.members:
            if m.stopped:
                continue
            log_epoch_end(trainer, m, {"train/eta2": pl_module.member_eta2(m.index),
                                       "epoch": trainer.current_epoch})  # fmt: skip
            stop = self._early_stop(trainer, m)
            self._save_member(trainer, pl_module, m)
            if stop:
                m.stopped = "early stop"
                pl_module.set_member_active(m.index, False)
                say(trainer, f"{m.label}: early stop after iteration {trainer.current_epoch + 1}")
        if all(m.stopped for m in self.members):
            trainer.should_stop = True
        trainer.save_checkpoint(self.pack_last, weights_only=False)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        for m in self.members:  # each member's last.ckpt, as SaveOnSigterm writes a fit's
            if not m.stopped:
                self._save_last(trainer, pl_module, m)
        trainer.save_checkpoint(self.pack_last, weights_only=False)
        say(trainer, f"SIGTERM: saved {self.pack_last} and the members' last.ckpt; "
                     "resume with --ckpt_path last")  # fmt: skip

    # ------------------------------------------------------------------ per member
    @staticmethod
    def _early_stop(trainer, m: Member) -> bool:
        stop = False
        if m.score is None:  # strict: false; nothing evaluated yet
            return False
        current = torch.tensor(m.score, dtype=torch.float32)  # as Lightning holds a logged float
        for es in m.of(EarlyStopping):
            should, reason = es._evaluate_stopping_criteria(current)
            if should:
                es.stopped_epoch = trainer.current_epoch
                es.stopping_reason_message = reason
                stop = True
        return stop

    def _save_member(self, trainer, pl_module, m: Member) -> None:
        epoch = trainer.current_epoch
        for cb in m.of(ModelCheckpoint):
            if cb.monitor is None:
                continue
            if m.score is None:
                continue
            current = torch.tensor(m.score, dtype=torch.float32)
            best = cb.best_model_score
            better = (
                best is None
                or (current > best if cb.mode == "max" else current < best)
                or (math.isnan(float(best)) and not math.isnan(m.score))
            )
            if not better:  # Lightning's keeps its current_score from its last save
                continue
            path = cb.format_checkpoint_name({"epoch": epoch, "step": 0, cb.monitor: current})
            old = cb.best_model_path
            cb.current_score, cb.best_model_score, cb.best_model_path = current, current, path
            cb.best_k_models = {path: current}
            cb.kth_best_model_path, cb.kth_value = path, current
            self._write(trainer, pl_module, m, Path(path))
            if old and old != path:
                Path(old).unlink(missing_ok=True)
        self._save_last(trainer, pl_module, m)

    def _save_last(self, trainer, pl_module, m: Member) -> None:
        for cb in m.of(ModelCheckpoint):
            if cb.monitor is not None:
                continue
            path = cb.format_checkpoint_name({"epoch": trainer.current_epoch, "step": 0})
            cb.best_model_path = path  # an unmonitored ModelCheckpoint keeps its latest file
            self._write(trainer, pl_module, m, Path(path))
            return

    def _write(self, trainer, pl_module, m: Member, path: Path) -> None:
        ckpt = member_checkpoint(trainer, pl_module, m)
        trainer.strategy.checkpoint_io.save_checkpoint(ckpt, path)

    # the pack's own state is in PackedMembers; this one has none
    def state_dict(self) -> dict:
        return {}


def member_checkpoint(trainer: L.Trainer, pl_module, m: Member) -> dict:
    """Member m's checkpoint, in the form its separate fit's ModelCheckpoint writes."""
    module = pl_module.member_module(m.index)
    steps = int(module.train_steps)
    loops = trainer._checkpoint_connector._get_loops_state_dict()
    fit_loop = loops.get("fit_loop", {})
    optim = fit_loop.get("epoch_loop.manual_optimization.optim_step_progress")
    if optim is not None:  # a fit counts two optimizer steps a batch (critic, actor)
        optim["total"]["ready"] = optim["total"]["completed"] = 2 * steps
    targets = {}
    for cb in m.of(TargetNetworks):  # the count of its schedule follows from the steps done
        every, start = cb.update_ema_every, cb.step_start_ema
        updates = sum(1 for n in range(start + 1, steps) if n % every == 0)
        cb.steps_done, cb.ema_updates = steps, updates
        targets[cb.state_key] = cb.state_dict()
    ckpt = {
        "epoch": trainer.current_epoch,
        "global_step": 2 * steps,
        "pytorch-lightning_version": L.__version__,
        "state_dict": module.state_dict(),
        "loops": loops,
        "callbacks": {**_states(m.callbacks), **targets},
        "optimizer_states": pl_module.member_optimizer_states(m.index),
        "lr_schedulers": pl_module.member_scheduler_states(m.index),
        "hparams_name": "kwargs",
        "hyper_parameters": dict(m.hparams),  # its fit's, with LightningCLI's _instantiator
        type(m.datamodule).__qualname__: m.datamodule.state_dict(),
    }
    return ckpt


__all__ = ["Member", "PackedCheckpoints", "PackedMembers", "prefix"]

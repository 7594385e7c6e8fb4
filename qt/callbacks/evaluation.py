"""Evaluation in the environment: the one place where the model and the environments meet.

Every `eval_every_n_epochs` iterations (and once in `cli.py test`) the callback runs
`num_eval_episodes` seeded episodes with Q-guided acting (docs/algorithm.md §4, §5). Under DDP the
episodes are divided between ranks (episode i runs on rank i % world_size, exactly once) and
their returns and lengths are gathered with torchmetrics before anything is logged.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.aggregation import CatMetric

from qt.acting.episodes import run_episodes
from qt.acting.policy import QTPolicy
from qt.console import noted_phase, say
from qt.envs import make_env
from qt.errors import UserError
from qt.tasks import get_task

# Episode seeds of run seed s start at s * SEED_STRIDE: apart by more than any fit's episodes
# (100_000 per iteration), so two run seeds never share a start state.
SEED_STRIDE = 2**32


def run_seed(pl_module: L.LightningModule) -> int:
    """The fit's seed: the one its module took at the start of the fit (kept in checkpoints, so
    `cli.py test` of a checkpoint reads the fit's), else this process's (`seed_everything`)."""
    seed = int(getattr(pl_module, "rng_seed", -1))
    return seed if seed >= 0 else torch.initial_seed() % 2**32


@dataclass
class EvalSummary:
    """Statistics of one set of evaluation episodes."""

    returns: np.ndarray
    lengths: np.ndarray
    ref_min_score: float
    ref_max_score: float

    def normalized(self, ret: float) -> float:
        return 100.0 * (ret - self.ref_min_score) / (self.ref_max_score - self.ref_min_score)

    def metrics(self, prefix: str) -> dict[str, float]:
        r, n = self.returns, self.lengths
        return {
            f"{prefix}/return_mean": float(r.mean()),
            f"{prefix}/return_std": float(r.std()),
            f"{prefix}/length_mean": float(n.mean()),
            f"{prefix}/length_std": float(n.std()),
            f"{prefix}/normalized_score": self.normalized(float(r.mean())),
        }

    def table(self) -> str:
        """A plain-text table: mean, std, min, max of return, normalised score and length."""
        scores = np.array([self.normalized(float(x)) for x in self.returns])
        rows = [("return", self.returns), ("normalized score", scores), ("length", self.lengths)]
        lines = [
            f"{'':<18}{'mean':>10}{'std':>10}{'min':>10}{'max':>10}   ({len(self.returns)} episodes)"
        ]
        for name, v in rows:
            v = np.asarray(v, dtype=np.float64)
            lines.append(
                f"{name:<18}{v.mean():>10.2f}{v.std():>10.2f}{v.min():>10.2f}{v.max():>10.2f}"
            )
        return "\n".join(lines)


def record_episode(policy, task: str, seed: int, path: Path, fps: int = 30) -> int:
    """Play episode `seed` in a rendering environment and write its frames as an MP4."""
    import imageio.v2 as imageio  # optional: pip install 'qt[video]'

    envs: list = []
    frames: list = []

    def env_fn():
        env = make_env(task, render_mode="rgb_array")
        envs.append(env)
        return env

    def grab(t: int, rows) -> None:
        frames.append(envs[0].render())

    run_episodes(policy, env_fn, [seed], num_envs=1, on_step=grab)
    imageio.mimsave(path, frames, fps=fps, macro_block_size=1)
    return len(frames)


class Evaluation(L.Callback):
    """Runs evaluation episodes at the end of training iterations and in `test`.

    Args:
        num_eval_episodes: episodes per evaluation during training (docs/algorithm.md §5: 10).
        test_episodes: episodes in `cli.py test` (10 by default; 100 for final numbers).
        eval_every_n_epochs: evaluate after every n-th iteration.
        num_envs: environments stepped at once per rank (default: all of the rank's episodes).
        seed: the base of the episode seeds; episode i of the evaluation after iteration e uses
            seed `base + 100_000 * e + i`, and of a test `base + i`. None (the default): the
            base follows the fit's seed s, `base = s * 2**32`, so each seed of a study plays its
            own start states and every variant of one seed the same ones (docs/acting.md). A
            number keeps one fixed set whatever the seed (0: what every fit played before).
        max_ep_len: cap on episode length (default: the model's `max_ep_len`).
        task: the environment's task name (default: the data module's `task`).
        record_video: after each evaluation, replay its first episode (same seed, so the
            same actions) in a rendering environment and log it as `videos/<stage>.mp4` to
            MLflow (rank 0). Needs offscreen MuJoCo (`MUJOCO_GL=egl` or `osmesa`, set here
            to egl when unset) and `pip install 'qt[video]'`; where either is missing it
            says so once and goes on without videos.
        video_fps: frames per second of the videos.
    """

    def __init__(
        self,
        num_eval_episodes: int = 10,
        test_episodes: int = 10,
        eval_every_n_epochs: int = 1,
        num_envs: int | None = None,
        seed: int | None = None,
        max_ep_len: int | None = None,
        task: str | None = None,
        record_video: bool = False,
        video_fps: int = 30,
    ) -> None:
        for name, v in (
            ("num_eval_episodes", num_eval_episodes),
            ("test_episodes", test_episodes),
            ("eval_every_n_epochs", eval_every_n_epochs),
        ):
            if v < 1:
                raise UserError(f"Evaluation.{name}={v}: expected a whole number >= 1.")
        self.num_eval_episodes = num_eval_episodes
        self.test_episodes = test_episodes
        self.eval_every_n_epochs = eval_every_n_epochs
        self.num_envs = num_envs
        self.seed = seed
        self.max_ep_len = max_ep_len
        self.task = task
        self.record_video, self.video_fps = record_video, video_fps
        if record_video:
            os.environ.setdefault("MUJOCO_GL", "egl")  # read when mujoco is first imported
        self.best: dict[str, float] = {}
        self.best_iteration = 0
        self.last_summary: EvalSummary | None = None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Build (and close) one environment of the task before any training step, so that a
        task whose environment cannot be made here stops now, not after an iteration."""
        env = make_env(self._task_name(trainer))
        env.close()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = self.evaluate_iteration(trainer, pl_module, trainer.current_epoch)
        if metrics is not None:
            pl_module.log_dict(metrics, on_epoch=True, sync_dist=False, rank_zero_only=False)

    def evaluate_iteration(
        self, trainer: L.Trainer, pl_module: L.LightningModule, epoch: int, label: str = ""
    ) -> dict[str, float] | None:
        """The evaluation after iteration `epoch` (None when it has none): the episodes, the
        best so far, the console line. A packed fit calls it for each member, with the member's
        module and `label` naming the member in the lines it prints."""
        if (epoch + 1) % self.eval_every_n_epochs:
            return None
        base = self.episode_base(pl_module)
        seeds = [base + 100_000 * epoch + i for i in range(self.num_eval_episodes)]
        of = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        say(trainer, f"{label}iteration {epoch + 1}{of}: evaluating {len(seeds)} episodes ...")
        start = time.perf_counter()
        with noted_phase(f"{label}evaluating {len(seeds)} episodes", trainer.global_rank == 0):
            summary = self.evaluate(trainer, pl_module, seeds)
        self._video(trainer, pl_module, seeds[0], f"epoch{epoch:04d}")
        metrics = summary.metrics("eval")
        if metrics["eval/normalized_score"] > self.best.get(
            "eval/best_normalized_score", -math.inf
        ):
            self.best_iteration = epoch + 1
        for key in ("eval/return_mean", "eval/normalized_score"):
            best_key = key.replace("eval/", "eval/best_")
            self.best[best_key] = max(self.best.get(best_key, -math.inf), metrics[key])
        metrics.update(self.best)
        say(
            trainer,
            f"{label}iteration {epoch + 1}{of}: normalized score "
            f"{metrics['eval/normalized_score']:.2f} "
            f"(best {self.best['eval/best_normalized_score']:.2f}, iteration "
            f"{self.best_iteration}), return {metrics['eval/return_mean']:.2f} "
            f"± {metrics['eval/return_std']:.2f}, length {metrics['eval/length_mean']:.0f}; "
            f"{len(seeds)} episodes in {time.perf_counter() - start:.1f} s",
        )
        return metrics

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._final(trainer, pl_module, "test")

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # `cli.py validate` runs the test protocol and logs under eval/; a fit evaluates at the
        # end of its iterations instead (on_train_epoch_end).
        if trainer.state.fn == "validate":
            self._final(trainer, pl_module, "eval")

    def _final(self, trainer: L.Trainer, pl_module: L.LightningModule, prefix: str) -> None:
        """`test_episodes` episodes seeded seed, seed + 1, ...; logged and printed as a table."""
        base = self.episode_base(pl_module)
        seeds = [base + i for i in range(self.test_episodes)]
        what = "testing" if prefix == "test" else "validating"
        with noted_phase(f"{what} {len(seeds)} episodes", trainer.global_rank == 0):
            summary = self.evaluate(trainer, pl_module, seeds)
        self._video(trainer, pl_module, seeds[0], prefix)
        pl_module.log_dict(summary.metrics(prefix), sync_dist=False)
        if trainer.global_rank == 0:  # the table is what `cli.py test` prints
            print(f"Evaluation of {self._task_name(trainer)}:\n{summary.table()}", flush=True)

    def episode_base(self, pl_module: L.LightningModule) -> int:
        """The first episode seed: `seed` when set, else the fit's seed times SEED_STRIDE."""
        if self.seed is not None:
            return self.seed
        return SEED_STRIDE * run_seed(pl_module)

    # ------------------------------------------------------------------ the work
    def evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, seeds: list[int]
    ) -> EvalSummary:
        """Run this rank's share of the episodes and gather every rank's results."""
        task_name = self._task_name(trainer)
        ref_min, ref_max = self._ref_scores(task_name)
        mine = seeds[trainer.global_rank :: trainer.world_size]
        was_training = pl_module.actor.training
        pl_module.actor.eval()
        policy = self._policy(trainer, pl_module)
        returns, lengths = CatMetric(), CatMetric()
        returns, lengths = returns.to(pl_module.device), lengths.to(pl_module.device)
        if mine:
            stats = run_episodes(policy, partial(make_env, task_name), mine, num_envs=self.num_envs)
            returns.update(torch.as_tensor(stats.returns, dtype=torch.float64))
            lengths.update(torch.as_tensor(stats.lengths, dtype=torch.float64))
        pl_module.actor.train(was_training)
        summary = EvalSummary(
            returns=returns.compute().cpu().numpy().reshape(-1),
            lengths=lengths.compute().cpu().numpy().reshape(-1),
            ref_min_score=ref_min,
            ref_max_score=ref_max,
        )
        self.last_summary = summary
        return summary

    def _policy(self, trainer: L.Trainer, pl_module: L.LightningModule) -> QTPolicy:
        return QTPolicy.from_module(
            pl_module, self._task_name(trainer), self.max_ep_len, device=pl_module.device
        )

    def _video(self, trainer: L.Trainer, pl_module: L.LightningModule, seed: int, name: str):
        """Replay episode `seed` with rendering and log it as an MP4 (rank 0, MLflow)."""
        if not self.record_video or trainer.global_rank != 0:
            return
        logger = next((lg for lg in trainer.loggers if hasattr(lg, "run_id")), None)
        if logger is None:
            return
        was_training = pl_module.actor.training
        pl_module.actor.eval()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{name}.mp4"
                record_episode(
                    self._policy(trainer, pl_module),
                    self._task_name(trainer),
                    seed,
                    path,
                    fps=self.video_fps,
                )
                logger.experiment.log_artifact(logger.run_id, str(path), "videos")
        except Exception as err:  # no offscreen GL, no imageio/ffmpeg, ...
            self.record_video = False
            rank_zero_warn(
                f"Rollout videos are off: recording failed ({type(err).__name__}: {err}). They "
                "need offscreen MuJoCo (MUJOCO_GL=egl or osmesa with the system's EGL or OSMesa "
                "libraries) and `pip install 'qt[video]'`."
            )
        finally:
            pl_module.actor.train(was_training)

    def _task_name(self, trainer: L.Trainer) -> str:
        if self.task is not None:
            return self.task
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "task"):
            raise UserError("Evaluation needs a task: set Evaluation.task or use QTDataModule.")
        return dm.task

    @staticmethod
    def _ref_scores(task_name: str) -> tuple[float, float]:
        """D4RL's published reference returns of the task (whatever dataset it trained on)."""
        task = get_task(task_name)
        return task.ref_min_score, task.ref_max_score

    def state_dict(self) -> dict:
        return {"best": dict(self.best), "best_iteration": self.best_iteration}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = dict(state_dict.get("best", {}))
        self.best_iteration = int(state_dict.get("best_iteration", 0))

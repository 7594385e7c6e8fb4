"""A study's report: per task and variant, and across tasks, the three D4RL-normalised scores
of `qt.study.store` (best, last, test) with 95% stratified-bootstrap intervals computed by
`rliable` (Agarwal et al., NeurIPS 2021); results/<name>/ holds it as Markdown, JSON and plots.

Everything here comes from the MLflow store (metric histories, params, tags), never from files
a crash could have left half-written.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from rliable import library as rly
from rliable import metrics

from qt.study.spec import Job, Study, StudyError
from qt.study.store import Result, client_for, job_states, parent_run, read_result

SCORES = {"best": "best eval during fit", "last": "last eval", "test": "test (best ckpt)"}
AGGREGATES = ("IQM", "mean")
SEED = 0  # every bootstrap starts from this seed: the same runs give the same report
# Variant names whose meaning changed: before the Decision Transformer as published existed
# (docs/baselines.md), studies called QT's trainer with eta 0 and no Q in acting `dt`; a store's
# `dt` of that kind is reported under its present name.
LEGACY_VARIANTS = {"dt": "qt-no-q"}


# ---------------------------------------------------------------------------- statistics
def interval(scores: np.ndarray, func, reps: int) -> tuple[np.ndarray, np.ndarray]:
    """rliable's point estimate and 95% stratified-bootstrap interval of `func(scores)`.

    rliable's StratifiedBootstrap draws its indices from numpy's global generator, so it is
    seeded here (and its state put back): the same scores always give the same interval.
    """
    state = np.random.get_state()  # noqa: NPY002 (rliable draws from the global generator)
    np.random.seed(SEED)  # noqa: NPY002
    try:
        point, bounds = rly.get_interval_estimates({"x": scores}, func, reps=reps)
    finally:
        np.random.set_state(state)  # noqa: NPY002
    return np.asarray(point["x"], dtype=float), np.asarray(bounds["x"], dtype=float)


def _cell_mean(x: np.ndarray) -> np.ndarray:
    return np.array([metrics.aggregate_mean(x)])


def _iqm_and_mean(x: np.ndarray) -> np.ndarray:
    return np.array([metrics.aggregate_iqm(x), metrics.aggregate_mean(x)])


def _curve_mean(x: np.ndarray) -> np.ndarray:
    return x[:, 0, :].mean(axis=0)


@dataclass
class Report:
    study: Study
    results: list[Result]
    missing: list[Job]
    renamed: dict = field(default_factory=dict)  # a study's variant name -> the name reported
    cells: dict = field(default_factory=dict)  # (task, variant, score) -> {mean, lo, hi, values}
    aggregates: dict = field(default_factory=dict)  # (variant, score, stat) -> {value, lo, hi}
    curves: dict = field(default_factory=dict)  # (task, variant) -> (steps, mean, lo, hi)

    def compute(self) -> Report:
        reps = self.study.bootstrap_reps
        by_cell: dict[tuple[str, str], list[Result]] = {}
        for r in self.results:
            by_cell.setdefault((r.job.task, r.job.variant), []).append(r)
        for (task, variant), rs in by_cell.items():
            rs.sort(key=lambda r: r.job.seed)
            for score in SCORES:
                values = np.array([[getattr(r, score)] for r in rs])  # seeds x 1 task
                point, bounds = interval(values, _cell_mean, reps)
                self.cells[task, variant, score] = {
                    "mean": float(point[0]),
                    "lo": float(bounds[0, 0]),
                    "hi": float(bounds[1, 0]),
                    "values": values[:, 0].tolist(),
                }
            n = min(len(r.curve) for r in rs)
            if n:
                curves = np.stack([r.curve[:n] for r in rs])[:, None, :]  # seeds x 1 x points
                point, bounds = interval(curves, _curve_mean, reps)
                # point i is each seed's i-th evaluation, placed at the seeds' mean step: the
                # same step for whole iterations; where max_time cut fits short at different
                # iterations, a partial iteration can share a point with a whole one
                x = np.mean([r.steps[:n] for r in rs], axis=0)
                self.curves[task, variant] = (x, point, bounds[0], bounds[1])
        if self.missing:
            return self  # aggregates need every (task, variant, seed)
        tasks, seeds = list(self.study.tasks), self.study.seeds
        for variant in self.study.variants:
            for score in SCORES:
                values = np.array(
                    [
                        [self.cells[t, variant, score]["values"][i] for t in tasks]
                        for i in range(len(seeds))
                    ]
                )
                point, bounds = interval(values, _iqm_and_mean, reps)
                for k, stat in enumerate(AGGREGATES):
                    self.aggregates[variant, score, stat] = {
                        "value": float(point[k]),
                        "lo": float(bounds[0, k]),
                        "hi": float(bounds[1, k]),
                    }
        return self

    # ------------------------------------------------------------------------ outputs
    def budget(self) -> list[str]:
        lines = {}
        for variant in self.study.variants:
            mine = [r for r in self.results if r.job.variant == variant]
            if not mine:
                continue
            p = mine[0].params
            steps = int(p["config.trainer.max_epochs"]) * int(p["config.data.num_steps_per_iter"])
            timed = p.get("config.trainer.max_time", "None") != "None"
            text = (
                f"{'at most ' if timed else ''}{steps:,} training steps "
                f"({p['config.trainer.max_epochs']} iterations x "
                f"{p['config.data.num_steps_per_iter']}), batch {p['config.data.batch_size']}, "
                f"width {p['config.model.hidden_size']}, {p['config.model.n_layer']} layers, "
                f"{p['config.model.n_head']} heads, context K {p['config.data.K']}"
            )
            if timed:  # where the fits stopped, as far as their last evaluations tell
                reached = [int(r.steps[-1]) for r in mine]
                limit = f"trainer.max_time {p['config.trainer.max_time']}"
                if max(reached) < steps:
                    text += (
                        f"; {limit}, last evaluated at {min(reached):,} to {max(reached):,} steps"
                    )
                else:
                    text += f"; {limit} not reached"
            lines.setdefault(text, []).append(variant)
        if len(lines) == 1:
            return [f"Budget: {next(iter(lines))}."]
        return [f"Budget of {', '.join(vs)}: {text}." for text, vs in lines.items()]

    def markdown(self) -> str:
        s = self.study
        done = len(self.results)
        total = done + len(self.missing)
        out = [f"# Study {s.name}", ""]
        out += self.budget()
        out += [
            f"Seeds: {', '.join(map(str, s.seeds))}; test: {s.test_episodes} episodes of each "
            f"fit's best checkpoint; {s.workers} workers x {s.threads_per_worker} threads.",
        ]
        if self.results:
            span = (
                max(r.end_ms for r in self.results) - min(r.start_ms for r in self.results)
            ) / 1000
            busy = sum(r.seconds for r in self.results)
            out.append(
                f"Wall time: {span / 60:.1f} min from the first fit's start to the last test's end; {busy / 60:.1f} min of fits and tests in all."
            )
        for old, new in self.renamed.items():
            out.append(
                f"Variant {old!r} of the study file is reported as {new!r}: QT's trainer "
                "with eta 0 and no Q in acting, the name's meaning before the Decision "
                "Transformer as published joined the studies (docs/baselines.md)."
            )
        if self.missing:
            out.append(
                f"Incomplete: {done} of {total} runs finished; missing: "
                + ", ".join(j.label for j in self.missing)
                + "."
            )
        out += [
            "",
            f"D4RL-normalised scores: mean [95% stratified-bootstrap interval] over seeds "
            f"(rliable, {s.bootstrap_reps:,} resamples).",
            "",
            "| task | variant | seeds | " + " | ".join(SCORES.values()) + " |",
            "|---|---|---|" + "---|" * len(SCORES),
        ]
        for task in s.tasks:
            for variant in s.variants:
                if (task, variant, "best") not in self.cells:
                    continue
                n = len(self.cells[task, variant, "best"]["values"])
                row = [_fmt(self.cells[task, variant, k], "mean") for k in SCORES]
                out.append(f"| {task} | {variant} | {n} | " + " | ".join(row) + " |")
        if self.aggregates:
            out += [
                "",
                f"Across {len(s.tasks)} task{'s' if len(s.tasks) > 1 else ''}: IQM and mean "
                f"over (seed, task) scores [95% stratified-bootstrap interval].",
                "",
                "| variant | statistic | " + " | ".join(SCORES.values()) + " |",
                "|---|---|" + "---|" * len(SCORES),
            ]
            for variant in s.variants:
                for stat in AGGREGATES:
                    row = [_fmt(self.aggregates[variant, k, stat], "value") for k in SCORES]
                    out.append(f"| {variant} | {stat} | " + " | ".join(row) + " |")
        return "\n".join(out) + "\n"

    def to_json(self) -> dict:
        return {
            "study": self.study.name,
            "cells": [
                {"task": t, "variant": v, "score": k, **c} for (t, v, k), c in self.cells.items()
            ],
            "aggregates": [
                {"variant": v, "score": k, "statistic": st, **a}
                for (v, k, st), a in self.aggregates.items()
            ],
            "missing": [j.label for j in self.missing],
        }

    def plot_curves(self, path: Path) -> None:
        tasks = list(self.study.tasks)
        fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.4), squeeze=False)
        for ax, task in zip(axes[0], tasks):
            for variant in self.study.variants:
                if (task, variant) not in self.curves:
                    continue
                x, mean, lo, hi = self.curves[task, variant]
                # a marker and a dash pattern of its own, so a curve that lies on another's
                # (two variants that score the same) still shows through it
                i = list(self.study.variants).index(variant)
                (line,) = ax.plot(
                    x, mean, marker=MARKERS[i % len(MARKERS)], ms=4 + 1.5 * (i % 3),
                    ls=DASHES[i % len(DASHES)], mfc="none" if i % 2 else None, label=variant,
                )  # fmt: skip
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2)
            ax.set_title(task)
            ax.set_xlabel("training steps")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("normalised score (eval)")
        axes[0][-1].legend(title="mean, 95% CI")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def plot_intervals(self, path: Path) -> None:
        """One panel per (score, statistic): the point estimate and its interval per variant."""
        variants = list(self.study.variants)
        fig, axes = plt.subplots(
            len(SCORES),
            len(AGGREGATES),
            squeeze=False,
            figsize=(8, 0.6 + len(SCORES) * (0.5 + 0.35 * len(variants))),
        )
        for row, k in zip(axes, SCORES):
            for ax, stat in zip(row, AGGREGATES):
                for i, variant in enumerate(variants):
                    a = self.aggregates.get((variant, k, stat))
                    if a is None:
                        continue
                    ax.barh(
                        i, a["hi"] - a["lo"], left=a["lo"], height=0.6, color=f"C{i}", alpha=0.6
                    )
                    ax.vlines(a["value"], i - 0.3, i + 0.3, color="k", lw=1.5)
                    ax.plot(a["value"], i, marker=MARKERS[i % len(MARKERS)], color="k", ms=4)
                ax.set_yticks(range(len(variants)), variants)
                ax.set_ylim(-0.6, len(variants) - 0.4)
                _readable_x(ax)
                ax.set_title(f"{stat}: {SCORES[k]}", fontsize=9)
                ax.grid(axis="x", alpha=0.3)
        fig.supxlabel(
            "normalised score: point estimate and 95% stratified-bootstrap interval", fontsize=9
        )
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


MARKERS = ("o", "s", "^", "D", "v", "P")
DASHES = ("-", "--", ":", "-.")
MIN_SPAN = 10.0  # normalised-score points: the narrowest x range a panel shows


def _readable_x(ax) -> None:
    """At most five x ticks with whole-number labels, over a range at least MIN_SPAN wide: a
    panel whose intervals are all one value (every seed scored the same) would otherwise get
    ticks a quarter point apart whose labels run into each other."""
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator

    lo, hi = ax.get_xlim()
    if hi - lo < MIN_SPAN:
        mid = (lo + hi) / 2
        ax.set_xlim(mid - MIN_SPAN / 2, mid + MIN_SPAN / 2)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=4, steps=[1, 2, 2.5, 5, 10]))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))


def _fmt(d: dict, key: str) -> str:
    return f"{d[key]:.1f} [{d['lo']:.1f}, {d['hi']:.1f}]"


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- entry points
def build(study: Study, client, experiment_id: str) -> Report:
    states = job_states(client, experiment_id, study)
    results = [read_result(client, st) for st in states if st.done]
    missing = [st.job for st in states if not st.done]
    renamed = legacy_renames(study, results)
    if renamed:
        study, results, missing = _rename(study, results, missing, renamed)
    return Report(study, results, missing, renamed=renamed).compute()


def _qt_without_q(eta, train_critic) -> bool:
    return float(eta) == 0.0 and str(train_critic) == "True"


def legacy_renames(study: Study, results: list[Result]) -> dict[str, str]:
    """{old: new} for each variant named as in LEGACY_VARIANTS whose fits are QT's trainer with
    eta 0 (their params; the study's overrides when none has finished), unless the study also
    has a variant of the new name."""
    renames = {}
    for old, new in LEGACY_VARIANTS.items():
        if old not in study.variants or new in study.variants:
            continue
        mine = [r.params for r in results if r.job.variant == old]
        over = study.variants[old]
        if mine:
            ablation = all(
                _qt_without_q(
                    p.get("config.model.eta", 1), p.get("config.model.train_critic", True)
                )
                for p in mine
            )
        else:
            ablation = _qt_without_q(over.get("model.eta", 1), over.get("model.train_critic", True))
        if ablation:
            renames[old] = new
    return renames


def _rename(study: Study, results: list[Result], missing: list[Job], names: dict[str, str]):
    """The study, results and missing jobs with variants renamed (order and job keys kept)."""
    keys = [j.key for j in study.jobs()]
    variants = {names.get(v, v): over for v, over in study.variants.items()}
    study = dataclasses.replace(study, variants=variants, keys=keys)

    def job(j: Job) -> Job:
        return dataclasses.replace(j, variant=names.get(j.variant, j.variant))

    results = [dataclasses.replace(r, job=job(r.job)) for r in results]
    return study, results, [job(j) for j in missing]


def write(report: Report, client, parent_run_id: str | None) -> Path:
    """results/<name>/: report.md, scores.json, learning_curves.png, intervals.png; the same
    files as artifacts (`report/`) of the study's parent run."""
    matplotlib.use("Agg")
    out = Path(report.study.results) / report.study.name
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "report.md", report.markdown())
    _write(out / "scores.json", json.dumps(report.to_json(), indent=1) + "\n")
    files = [out / "report.md", out / "scores.json"]
    if report.curves:
        report.plot_curves(out / "learning_curves.png")
        files.append(out / "learning_curves.png")
    if report.aggregates:
        report.plot_intervals(out / "intervals.png")
        files.append(out / "intervals.png")
    if parent_run_id is not None:
        for f in files:
            client.log_artifact(parent_run_id, str(f), "report")
    return out


def report(study: Study) -> tuple[Report, Path]:
    client, _ = client_for(study)
    exp = client.get_experiment_by_name(study.experiment)
    if exp is None:
        raise StudyError(f"no MLflow experiment {study.experiment!r}: run the study first.")
    parent = parent_run(client, exp.experiment_id, study.name)
    rep = build(study, client, exp.experiment_id)
    out = write(rep, client, parent.info.run_id if parent else None)
    return rep, out

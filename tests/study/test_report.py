"""The study report's reading of fits stopped by `trainer.max_time` mid-iteration: the steps
of each evaluation from the MLflow histories, and the budget line, against values written out
here, without running a fit."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np

from qt.study import report as rep
from qt.study import store
from qt.study.spec import load_study

ROOT = Path(__file__).resolve().parents[2]


def _fit_run(client, experiment_id: str, evals: list[tuple[int, int, float]], per_iter: int):
    """A fit run as Lightning logs it: per evaluation (MLflow step, epoch, mean return), and a
    normalised score on another scale, which the report must not read."""
    run = client.create_run(experiment_id)
    rid = run.info.run_id
    client.log_param(rid, "config.data.num_steps_per_iter", per_iter)
    for step, epoch, ret in evals:
        client.log_metric(rid, "eval/return_mean", ret, step=step)
        client.log_metric(rid, "eval/normalized_score", 100 * (ret - 37.69) / 135.43, step=step)
        client.log_metric(rid, "epoch", epoch, step=step)
    client.set_terminated(rid)
    return client.get_run(rid)


def test_an_iteration_cut_short_is_placed_at_the_steps_it_trained(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    # three whole iterations of 1000 steps, then a fourth stopped after 741 of its steps;
    # returns chosen on D4RL's maze2d-umaze scale (23.85 / 161.86): 0, 50 and 100 by hand
    evals = [(999, 0, 0.0), (1999, 1, 23.85), (2999, 2, 92.855), (3740, 3, 161.86)]
    steps, scores = store.eval_history(
        client, _fit_run(client, exp, evals, 1000), "maze2d-umaze-v1"
    )
    np.testing.assert_array_equal(steps, [1000, 2000, 3000, 3741])
    np.testing.assert_allclose(scores, [-2385 / 138.01, 0.0, 50.0, 100.0], rtol=0, atol=1e-9)
    # whole iterations only: the steps are (epoch + 1) x num_steps_per_iter
    run = _fit_run(client, exp, [(9, 0, 1.0), (19, 1, 2.0)], 10)
    steps, _ = store.eval_history(client, run, "maze2d-umaze-v1")
    np.testing.assert_array_equal(steps, [10, 20])


def _result(job, steps: list[int], max_time: str) -> store.Result:
    params = {
        "config.trainer.max_epochs": "51", "config.data.num_steps_per_iter": "1000",
        "config.data.batch_size": "256", "config.model.hidden_size": "256",
        "config.model.n_layer": "4", "config.model.n_head": "4", "config.data.K": "20",
        "config.trainer.max_time": max_time,
    }  # fmt: skip
    x = np.array(steps, dtype=float)
    return store.Result(job=job, best=0.0, last=0.0, test=0.0, steps=x, curve=np.zeros(len(x)),
                      params=params, seconds=1.0, start_ms=0, end_ms=1)  # fmt: skip


def test_the_budget_says_where_max_time_stopped_each_variant():
    study = load_study(ROOT / "configs" / "studies" / "maze2d-umaze-gpu.yaml", check=False)
    jobs = study.jobs()
    ends = {("qt", 0): 3741, ("qt", 1): 3656, ("qt-no-q", 0): 3836, ("qt-no-q", 1): 3871}
    results = [
        _result(j, [1000, 2000, 3000, ends[j.variant, j.seed]], "00:00:07:00")
        for j in jobs
        if j.seed in (0, 1)
    ]
    lines = rep.Report(study, results, missing=[]).budget()
    shape = "(51 iterations x 1000), batch 256, width 256, 4 layers, 4 heads, context K 20"
    assert lines == [
        f"Budget of qt: at most 51,000 training steps {shape}; trainer.max_time 00:00:07:00, "
        "last evaluated at 3,656 to 3,741 steps.",
        f"Budget of qt-no-q: at most 51,000 training steps {shape}; trainer.max_time 00:00:07:00, "
        "last evaluated at 3,836 to 3,871 steps.",
    ]
    # a time limit the fits never reached
    results = [_result(j, [25_000, 51_000], "01:00:00:00") for j in jobs if j.seed == 0]
    assert rep.Report(study, results, missing=[]).budget() == [
        f"Budget: at most 51,000 training steps {shape}; trainer.max_time 01:00:00:00 not reached."
    ]
    # without max_time, the configured budget alone, one line for both variants
    results = [_result(j, [1000, 2000, 3000], "None") for j in jobs if j.seed == 0]
    assert rep.Report(study, results, missing=[]).budget() == [
        f"Budget: 51,000 training steps {shape}."
    ]


def _store_study(tmp_path, variants: str, train_critic: dict[str, bool]):
    """A study's finished fits and tests in an MLflow store, as the runner leaves them."""
    text = f"name: s\nbootstrap_reps: 100\ntasks: [maze2d-umaze-v1]\nseeds: [0, 1]\nvariants:\n{variants}"
    study = load_study(tmp_path / "s.yaml", check=False, text=text)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("study-s", artifact_location=(tmp_path / "a").as_uri())
    for job in study.jobs():
        eta = "0.0" if job.variant != "qt" else "5.0"
        params = {"config.model.eta": eta, "config.trainer.max_epochs": "3",
                  "config.data.num_steps_per_iter": "1000", "config.data.batch_size": "64",
                  "config.model.hidden_size": "64", "config.model.n_layer": "2",
                  "config.model.n_head": "2", "config.data.K": "20"}  # fmt: skip
        if job.variant in train_critic:  # runs made before the option existed have no param
            params["config.model.train_critic"] = str(train_critic[job.variant])
        tags = {"study": "s", "qt.study.key": job.key}
        fit = client.create_run(exp, tags=tags | {"qt.study.kind": "fit"})
        for k, v in params.items():
            client.log_param(fit.info.run_id, k, v)
        client.log_metric(fit.info.run_id, "eval/return_mean", 50.0 + job.seed, step=999)
        client.set_terminated(fit.info.run_id)
        test = client.create_run(exp, tags=tags | {"qt.study.kind": "test",
                                                   "qt.study.fit_run": fit.info.run_id})  # fmt: skip
        client.log_metric(test.info.run_id, "test/return_mean", 40.0)
        client.set_terminated(test.info.run_id)
    return study, client, exp


def test_a_stores_dt_of_qts_trainer_is_reported_as_qt_no_q(tmp_path):
    old = "  qt: {}\n  dt: {model.eta: 0, model.rtg_no_q: true, model.infer_no_q: true}\n"
    study, client, exp = _store_study(tmp_path, old, train_critic={})
    report = rep.build(study, client, exp)
    assert list(report.study.variants) == ["qt", "qt-no-q"] and not report.missing
    assert sorted({r.job.variant for r in report.results}) == ["qt", "qt-no-q"]
    assert ("maze2d-umaze-v1", "qt-no-q", "best") in report.cells
    assert "Variant 'dt' of the study file is reported as 'qt-no-q'" in report.markdown()
    assert "| maze2d-umaze-v1 | qt-no-q | 2 |" in report.markdown()
    assert [j.key for j in report.study.jobs()] == [j.key for j in study.jobs()]


def test_the_published_dt_beside_qt_no_q_keeps_its_name(tmp_path):
    three = (
        "  qt: {}\n  dt: {model.eta: 0, model.train_critic: false}\n"
        "  qt-no-q: {model.eta: 0, model.rtg_no_q: true, model.infer_no_q: true}\n"
    )
    study, client, exp = _store_study(tmp_path / "a", three, train_critic={"dt": False})
    report = rep.build(study, client, exp)
    assert list(report.study.variants) == ["qt", "dt", "qt-no-q"] and not report.renamed
    # a `dt` alone whose fits trained no critic is the published DT: not renamed either
    alone = "  qt: {}\n  dt: {model.eta: 0, model.train_critic: false}\n"
    study, client, exp = _store_study(tmp_path / "b", alone, train_critic={"dt": False})
    assert rep.legacy_renames(study, rep.build(study, client, exp).results) == {}


def test_plots_stay_readable_when_every_seed_scores_the_same(tmp_path, monkeypatch):
    """intervals.png: a few x tick labels well apart when every interval is one value or all
    lie within a point; learning_curves.png: two variants with the same curve drawn so both show."""
    study = load_study(ROOT / "configs" / "studies" / "maze2d-umaze-gpu.yaml", check=False)
    study.bootstrap_reps = 200  # every value is the same: any number of draws gives it
    results = [
        store.Result(job=j, best=-17.28 + 0.3 * j.seed * (j.variant == "qt"), last=-17.28, test=-17.28, steps=np.array([1e3, 2e3]),
                     curve=np.full(2, -17.28), params={}, seconds=1.0, start_ms=0, end_ms=1)
        for j in study.jobs()
    ]  # fmt: skip
    report = rep.Report(study, results, missing=[]).compute()
    figures = []
    monkeypatch.setattr(rep.plt, "close", lambda fig: figures.append(fig))
    report.plot_intervals(tmp_path / "intervals.png")
    report.plot_curves(tmp_path / "curves.png")
    intervals, curves = figures
    renderer = intervals.canvas.get_renderer()
    for ax in intervals.axes:
        labels = [t for t in ax.get_xticklabels() if t.get_text() and t.get_visible()]
        lo, hi = ax.get_xlim()
        labels = [t for t in labels if lo <= t.get_position()[0] <= hi]
        assert 2 <= len(labels) <= 5, [t.get_text() for t in labels]  # matplotlib's: 6 or 7
        boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
        for left, right in zip(boxes, boxes[1:]):
            assert right.x0 - left.x1 >= 10, [t.get_text() for t in labels]  # 10 px apart
    [ax] = curves.axes
    lines = [ln for ln in ax.get_lines() if ln.get_label() in study.variants]
    assert len(lines) == 2 and np.array_equal(lines[0].get_ydata(), lines[1].get_ydata())
    styles = {(ln.get_linestyle(), ln.get_marker()) for ln in lines}
    assert len({s[0] for s in styles}) == 2 and len({s[1] for s in styles}) == 2

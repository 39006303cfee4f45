"""Reports on a hand-built study: the trials table (CSV), the Pareto plot (HTML, PNG), the console summary."""

import math
import re

import optuna
import pandas as pd
import pytest
from plotly.io.json import to_json_plotly

from ranksearch.inspect.report import pareto_figure, summary, trials_table, write_report

DIST = optuna.distributions.FloatDistribution(1 / 32, 1, step=1 / 32)
MODULES = ["block1", "block2", "block3", "block4", "block5"]
BASELINE = {"val_accuracy": 0.90, "test_accuracy": 0.89, "macs": 1000, "params": 200}
# (ranks as k of k/32, val accuracy, MACs, params); the baseline has 1000 MACs, so MACs ratio = MACs / 1000.
TRIALS = [
    ([2, 2, 1, 1, 1], 0.86, 80, 20),  # 0: Pareto
    ([3, 2, 2, 1, 1], 0.88, 100, 24),  # 1: Pareto; exactly 10 % of the MACs: best at <= 10 %
    ([3, 3, 2, 2, 1], 0.87, 120, 30),  # 2: dominated by 1
    ([6, 5, 4, 2, 2], 0.895, 240, 50),  # 3: Pareto; best at <= 25 %
    ([7, 6, 4, 3, 2], 0.85, 300, 60),  # 4: dominated by 3
    ([16, 12, 8, 6, 4], 0.91, 600, 120),  # 5: Pareto; better than the baseline, above 25 %
]
FAILED_RANKS = [1, 1, 1, 1, 32]
PARETO = {0, 1, 3, 5}
BASELINE_LATENCY_MS = 2.0
# Each trial's latency for the studies that measure it: ratios 0.09, 0.25, 0.20, 0.60, 0.75, 0.90 of the baseline's.
LATENCY_MS = [0.18, 0.5, 0.4, 1.2, 1.5, 1.8]
# accuracy, MACs, latency: 2 (dominated by 1 on accuracy and MACs) is Pareto by its latency; 4 is dominated by 3.
PARETO_3D = {0, 1, 2, 3, 5}
PARETO_LATENCY = {0, 1, 2, 3, 5}  # accuracy, latency: 4 is dominated by 3
LATENCY_DEVICE = {"device": "cpu", "cpu": "x86_64", "threads": 2, "gpu": None, "batch": 1}


def _params(ranks: list[int]) -> dict[str, float]:
    return {f"rank_{m}": k / 32 for m, k in zip(MODULES, ranks, strict=True)}


def _attrs(ranks: list[int], accuracy: float, macs: int, params: int) -> dict:
    """A 0.2.0 trial's user attrs: val accuracy and MACs are its values only."""
    return {
        "ranks": "/".join(map(str, ranks)) + " /32", "params": params,
        "macs_ratio": macs / 1000, "params_ratio": params / 200,
        "device": "cpu", "device_name": "x86_64", "eval_dtype": "fp32", "torch_version": "2.14.1",
        "conv_ranks": {f"features.{i}": 4 * k for i, k in enumerate(ranks)}, "kept_convs": ["features.0"],
        "decompose_s": 0.5, "finetune_s": 4.0, "eval_s": 1.0, "count_s": 0.1, "seed": 7,
    }  # fmt: skip


def _old_attrs(ranks: list[int], accuracy: float, macs: int, params: int) -> dict:
    """A 0.1.0 trial's user attrs, which repeated its values."""
    return {"val_accuracy": accuracy, "macs": macs, **_attrs(ranks, accuracy, macs, params)}


def _latency_attrs(ranks: list[int], accuracy: float, macs: int, params: int, latency_ms: float) -> dict:
    """A 0.4.0 trial's user attrs when latency was measured: every cost (MACs too) and its ratio."""
    return {
        **_attrs(ranks, accuracy, macs, params), "macs": macs, "latency_ms": latency_ms,
        "latency_ratio": latency_ms / BASELINE_LATENCY_MS, "latency_s": 3.0, "recalibrate_s": 0.25,
    }  # fmt: skip


def latency_study(objectives: list[str]) -> optuna.Study:
    """An in-memory 0.4.0 study of ``objectives`` (accuracy, then costs among macs and latency) over TRIALS, each
    with its latency (LATENCY_MS), then one failed trial."""
    costs = objectives[1:]
    study = optuna.create_study(directions=["maximize", *["minimize"] * len(costs)], study_name="lat")
    study.set_user_attr("baseline", BASELINE)
    study.set_user_attr("baseline_latency_ms", BASELINE_LATENCY_MS)
    study.set_user_attr("latency_device", LATENCY_DEVICE)
    study.set_user_attr("config", {"model": "vgg16", "objectives": objectives})
    distributions = {name: DIST for name in _params(FAILED_RANKS)}
    for (ranks, accuracy, macs, params), latency_ms in zip(TRIALS, LATENCY_MS, strict=True):
        measured = {"macs": float(macs), "latency": latency_ms}
        study.add_trial(optuna.trial.create_trial(
            params=_params(ranks), distributions=distributions, values=[accuracy, *(measured[c] for c in costs)],
            user_attrs=_latency_attrs(ranks, accuracy, macs, params, latency_ms),
        ))  # fmt: skip
    return _with_failed_trial(study, distributions)


def _with_failed_trial(study: optuna.Study, distributions: dict) -> optuna.Study:
    """``study`` with one failed trial added last (as a crashed trial would be)."""
    study.add_trial(optuna.trial.create_trial(
        params=_params(FAILED_RANKS), distributions=distributions, state=optuna.trial.TrialState.FAIL, values=None,
        user_attrs={"fail_reason": "RuntimeError: CUDA out of memory"},
    ))  # fmt: skip
    return study


def hand_built_study(storage: str, trials=TRIALS, name: str = "s", attrs=_attrs) -> optuna.Study:
    """A ranksearch-like study: ``trials`` complete, then one failed trial."""
    study = optuna.create_study(directions=["maximize", "minimize"], storage=storage, study_name=name)
    study.set_user_attr("baseline", BASELINE)
    study.set_user_attr("config", {"model": "vgg16", "trials": len(trials) + 1})
    study.set_user_attr("ranksearch_version", "0.1.0")
    distributions = {name: DIST for name in _params(FAILED_RANKS)}
    for ranks, accuracy, macs, params in trials:
        study.add_trial(optuna.trial.create_trial(
            params=_params(ranks), distributions=distributions, values=[accuracy, float(macs)],
            user_attrs=attrs(ranks, accuracy, macs, params),
        ))  # fmt: skip
    return _with_failed_trial(study, distributions)


@pytest.fixture
def study(tmp_path) -> optuna.Study:
    return hand_built_study(f"sqlite:///{tmp_path}/s.db")


def test_the_hand_built_pareto_front_is_the_expected_one(study):
    assert {t.number for t in study.best_trials} == PARETO


def test_csv_has_every_trial_with_its_columns_and_pareto_flags(study, tmp_path):
    paths = write_report(study, tmp_path / "report" / "nested")
    assert [p.name for p in paths] == ["trials.csv", "pareto.html", "pareto.png"] and all(p.is_file() for p in paths)
    table = pd.read_csv(paths[0])
    rank_columns = [f"rank_{m}_k32" for m in MODULES]
    assert list(table.columns) == [
        "number", "state", *rank_columns, "val_accuracy", "macs", "params", "macs_ratio", "params_ratio",
        "decompose_s", "recalibrate_s", "finetune_s", "eval_s", "count_s", "latency_s", "seconds", "pareto",
        "fail_reason",
    ]  # fmt: skip
    assert list(table["number"]) == list(range(len(TRIALS) + 1))
    assert list(table["state"]) == ["COMPLETE"] * len(TRIALS) + ["FAIL"]
    assert set(table.loc[table["pareto"], "number"]) == {t.number for t in study.best_trials} == PARETO
    for number, (ranks, accuracy, macs, params) in enumerate(TRIALS):
        row = table.iloc[number]
        assert [row[c] for c in rank_columns] == ranks
        assert (row["val_accuracy"], row["macs"], row["params"]) == (accuracy, macs, params)
        assert row["macs_ratio"] == pytest.approx(macs / 1000) and row["params_ratio"] == pytest.approx(params / 200)
        assert row["finetune_s"] == 4.0 and row["seconds"] >= 0 and pd.isna(row["fail_reason"])
    failed = table.iloc[-1]
    assert [failed[c] for c in rank_columns] == FAILED_RANKS and not failed["pareto"]
    assert failed["fail_reason"] == "RuntimeError: CUDA out of memory"
    assert all(math.isnan(failed[c]) for c in ["val_accuracy", "macs", "params", "macs_ratio", "finetune_s"])


def test_table_keeps_rank_integers_and_nan_for_failed_trials(study):
    table = trials_table(study)
    assert str(table["rank_block1_k32"].dtype) == "Int64" and table["rank_block5_k32"].tolist()[-1] == 32
    assert table["pareto"].dtype == bool and table.loc[6, "macs"] != table.loc[6, "macs"]  # NaN


def test_html_is_self_contained_and_shows_every_pareto_trial(study, tmp_path):
    text = write_report(study, tmp_path / "r")[1].read_text()
    assert not re.search(r"<script[^>]*\bsrc=", text) and len(text) > 1_000_000  # plotly.js inlined, not loaded
    for number in PARETO:
        ranks = "/".join(map(str, TRIALS[number][0])) + " /32"
        assert to_json_plotly([number, ranks]).rstrip("]") in text  # the hover data: trial number, ranks...
    assert "baseline" in text


def test_figure_highlights_the_front_as_a_step_line_and_marks_the_baseline(study):
    traces = {trace.name: trace for trace in pareto_figure(study).data}
    front = traces["Pareto front"]
    assert [row[0] for row in front.customdata] == [0, 1, 3, 5]  # sorted by MACs
    assert list(front.x) == [0.08, 0.1, 0.24, 0.6] and list(front.y) == pytest.approx([86, 88, 89.5, 91])
    assert front.line.shape == "hv" and "lines" in front.mode
    assert sorted(row[0] for row in traces["trials"].customdata) == [2, 4]  # the failed trial is not plotted
    assert (traces["baseline"].x[0], traces["baseline"].y[0]) == (1.0, pytest.approx(90.0))
    assert front.customdata[1][1] == "3/2/2/1/1 /32" and front.customdata[1][2] == "100"


def test_png_is_a_png(study, tmp_path):
    png = write_report(study, tmp_path)[2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_summary_picks_the_best_accuracy_within_each_macs_budget(study):
    text = summary(study)
    assert "7 trials (6 complete, 1 failed)" in text
    assert "Pareto front: 4 of 6 complete trials" in text
    # by hand: at <= 10 % of the MACs trials 0 (86 %) and 1 (88 %, exactly 10 %) qualify -> trial 1;
    # at <= 25 % also 2 (87 %) and 3 (89.5 %) -> trial 3; trial 5 (91 %) needs 60 %.
    assert "best val accuracy at <= 10% of baseline MACs: 88.00% (trial 1, ranks 3/2/2/1/1 /32, MACs 0.100x)" in text
    assert "best val accuracy at <= 25% of baseline MACs: 89.50% (trial 3, ranks 6/5/4/2/2 /32, MACs 0.240x)" in text
    assert "baseline: val 90.00%, test 89.00%, 1,000 MACs, 200 params" in text


def test_summary_says_none_when_no_trial_fits_a_budget(tmp_path):
    study = hand_built_study(f"sqlite:///{tmp_path}/big.db", trials=[TRIALS[5], TRIALS[4]])
    text = summary(study)
    assert "3 trials (2 complete, 1 failed)" in text
    assert "at <= 10% of baseline MACs: none" in text and "at <= 25% of baseline MACs: none" in text


def test_a_study_without_complete_trials_still_reports(tmp_path):
    study = hand_built_study(f"sqlite:///{tmp_path}/empty.db", trials=[])
    paths = write_report(study, tmp_path / "out")
    assert len(pd.read_csv(paths[0])) == 1 and paths[2].read_bytes()[:4] == b"\x89PNG"
    assert "Pareto front: 0 of 0 complete trials" in summary(study) and "MACs: none" in summary(study)


def test_a_study_made_by_0_1_0_gives_the_same_table(tmp_path, study):
    old = hand_built_study(f"sqlite:///{tmp_path}/old.db", attrs=_old_attrs)
    same = [column for column in trials_table(study).columns if column != "seconds"]  # seconds: wall time
    pd.testing.assert_frame_equal(trials_table(old)[same], trials_table(study)[same])


def test_val_accuracy_and_macs_come_from_the_trials_values(tmp_path):
    stale = lambda *trial: {**_attrs(*trial), "val_accuracy": 0.5, "macs": 999}  # noqa: E731
    table = trials_table(hand_built_study(f"sqlite:///{tmp_path}/stale.db", attrs=stale))
    assert list(table["val_accuracy"][:-1]) == [accuracy for _, accuracy, _, _ in TRIALS]
    assert list(table["macs"][:-1]) == [macs for _, _, macs, _ in TRIALS]


# ----- studies that measure latency (0.4.0): 3 objectives, or accuracy and latency ---------------------------------


def _traces(figure, name: str, xaxis: str) -> list:
    return [trace for trace in figure.data if trace.name == name and trace.xaxis == xaxis]


def _numbers(traces) -> list[int]:
    return [row[0] for trace in traces for row in trace.customdata]


def test_the_3_objective_pareto_front_is_the_expected_one():
    assert {t.number for t in latency_study(["accuracy", "macs", "latency"]).best_trials} == PARETO_3D


def test_a_3_objective_csv_has_every_cost_and_3d_pareto_flags(tmp_path):
    study = latency_study(["accuracy", "macs", "latency"])
    paths = write_report(study, tmp_path)
    table = pd.read_csv(paths[0])
    rank_columns = [f"rank_{m}_k32" for m in MODULES]
    assert list(table.columns) == [
        "number", "state", *rank_columns, "val_accuracy", "macs", "params", "latency_ms", "macs_ratio",
        "params_ratio", "latency_ratio", "decompose_s", "recalibrate_s", "finetune_s", "eval_s", "count_s",
        "latency_s", "seconds", "pareto", "fail_reason",
    ]  # fmt: skip
    assert set(table.loc[table["pareto"], "number"]) == PARETO_3D
    for number, ((_, accuracy, macs, params), latency_ms) in enumerate(zip(TRIALS, LATENCY_MS, strict=True)):
        row = table.iloc[number]
        assert (row["val_accuracy"], row["macs"], row["params"], row["latency_ms"]) == (
            accuracy, macs, params, latency_ms,
        )  # fmt: skip
        assert row["latency_ratio"] == pytest.approx(latency_ms / 2) and row["macs_ratio"] == pytest.approx(
            macs / 1000
        )
        assert (row["recalibrate_s"], row["latency_s"]) == (0.25, 3.0)
    assert math.isnan(table.iloc[-1]["latency_ms"]) and not table.iloc[-1]["pareto"]


def test_a_3_objective_figure_has_a_panel_per_cost_with_every_pareto_trial_highlighted():
    figure = pareto_figure(latency_study(["accuracy", "macs", "latency"]))
    axes = list(figure.select_xaxes())
    assert [a.title.text for a in axes] == ["MACs / baseline's (log)", "latency (ms) / baseline's (log)"]
    assert [a.type for a in axes] == ["log", "log"] and figure.layout.yaxis.title.text == "validation accuracy (%)"
    # MACs panel: the step line joins 0, 1, 3, 5; 2 is Pareto by its latency only, so highlighted but not joined.
    macs_front = _traces(figure, "Pareto front", "x")
    assert _numbers(macs_front) == [0, 1, 3, 5] and list(macs_front[0].x) == [0.08, 0.1, 0.24, 0.6]
    assert macs_front[0].line.shape == "hv" and "lines" in macs_front[0].mode
    assert _numbers(_traces(figure, "other Pareto trials", "x")) == [2]
    # latency panel: by increasing latency, 0 (86 %), 2 (87 %), 1 (88 %), 3, 5; 4 (85 %) is behind.
    latency_front = _traces(figure, "Pareto front", "x2")
    assert _numbers(latency_front) == [0, 2, 1, 3, 5]
    assert list(latency_front[0].x) == pytest.approx([0.09, 0.2, 0.25, 0.6, 0.9])
    assert _traces(figure, "other Pareto trials", "x2") == []
    for xaxis in ("x", "x2"):
        assert _numbers(_traces(figure, "trials", xaxis)) == [4]  # the failed trial is not plotted
        (baseline,) = _traces(figure, "baseline", xaxis)
        assert (baseline.x[0], baseline.y[0]) == (1.0, pytest.approx(90.0))
    assert [t.name for t in figure.data if t.showlegend] == [
        "trials",
        "Pareto front",
        "other Pareto trials",
        "baseline",
    ]
    assert latency_front[0].customdata[2][2:] == ["100", "0.100x", "24", "0.120x", "0.50 ms", "0.250x"]  # trial 1
    assert "latency %{customdata[6]} (%{customdata[7]})" in latency_front[0].hovertemplate
    assert "2.00 ms (1x)" in _traces(figure, "baseline", "x2")[0].hovertemplate
    assert figure.layout.title.text == "lat: 5 Pareto trials of 6 complete"


def _png_width(path) -> int:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big")  # IHDR: width, then height


def test_a_3_objective_png_is_written_with_two_panels(tmp_path, study):
    wide = write_report(latency_study(["accuracy", "macs", "latency"]), tmp_path / "three")[2]
    narrow = write_report(study, tmp_path / "two")[2]
    assert wide.stat().st_size > 10_000 and _png_width(wide) > _png_width(narrow) * 1.5


def test_a_3_objective_summary_speaks_of_the_first_cost_macs():
    text = summary(latency_study(["accuracy", "macs", "latency"]))
    assert "7 trials (6 complete, 1 failed)" in text and "Pareto front: 5 of 6 complete trials" in text
    # the same trials as the 2-objective study by MACs (test_summary_picks_the_best_accuracy_within_each_macs_budget)
    assert (
        "best val accuracy at <= 10% of baseline MACs: 88.00% (trial 1, ranks 3/2/2/1/1 /32, MACs 0.100x, "
        "latency 0.250x)"
    ) in text
    assert (
        "best val accuracy at <= 25% of baseline MACs: 89.50% (trial 3, ranks 6/5/4/2/2 /32, MACs 0.240x, "
        "latency 0.600x)"
    ) in text
    assert (
        "baseline: val 90.00%, test 89.00%, 1,000 MACs, 200 params, latency 2.00 ms "
        "(device cpu, cpu x86_64, threads 2, batch 1)"
    ) in text


def test_a_latency_study_reports_against_latency():
    study = latency_study(["accuracy", "latency"])
    table = trials_table(study)
    assert set(table.loc[table["pareto"], "number"]) == PARETO_LATENCY == {t.number for t in study.best_trials}
    assert list(table["macs"][:-1]) == [macs for _, _, macs, _ in TRIALS]  # from the user attrs: not an objective
    text = summary(study)
    # by hand: at <= 10 % of the latency only trial 0 (9 %) fits; at <= 25 % also 2 (20 %) and 1 (exactly 25 %),
    # the best of them. By MACs the picks would be 1 and 3.
    assert (
        "best val accuracy at <= 10% of baseline latency: 86.00% (trial 0, ranks 2/2/1/1/1 /32, latency 0.090x)"
        in text
    )
    assert (
        "best val accuracy at <= 25% of baseline latency: 88.00% (trial 1, ranks 3/2/2/1/1 /32, latency 0.250x)"
        in text
    )
    assert "of baseline MACs" not in text
    figure = pareto_figure(study)
    assert [a.title.text for a in figure.select_xaxes()] == ["latency (ms) / baseline's (log)"]
    assert _numbers(_traces(figure, "Pareto front", "x")) == [0, 2, 1, 3, 5]

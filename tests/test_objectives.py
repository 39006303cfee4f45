"""Objectives as a config list: latency and three-objective studies run, resume, report and export through the CLI;
wrong lists and resumes that would mix measurements exit 2 with one line."""

import optuna
import pytest
from test_cli import assert_one_line_error

from conftest import SMOKE_CONFIG, run_cli
from ranksearch.objectives.registry import check_objectives
from ranksearch.utils.errors import UserError

SMOKE = ("--config", str(SMOKE_CONFIG))


def study_of(cwd, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd}/studies/{name}.db")


def run(workdir, data, name, *args):
    return run_cli("run", *SMOKE, "--data-dir", str(data), "--study-name", name, *args, cwd=workdir)


@pytest.mark.parametrize(
    "names",
    [["accuracy"], ["macs", "accuracy"], ["accuracy", "flops"], ["accuracy", "macs", "macs"], []],
)
def test_objective_lists_are_accuracy_then_one_or_two_costs(names):
    with pytest.raises(UserError, match="objectives must be accuracy then one or two of macs, params, latency"):
        check_objectives(names)


def test_wrong_objectives_flag_exits_2_with_one_line(tmp_path):
    result = run_cli("run", *SMOKE, "--objectives", "accuracy,speed", cwd=tmp_path)
    assert_one_line_error(result, "objectives must be accuracy then", "accuracy,speed")
    assert not (tmp_path / "studies").exists()


def test_latency_study_runs_reports_and_exports(workdir, tiny_imagefolder):
    result = run(workdir, tiny_imagefolder, "lat", "--objectives", "accuracy,latency", "--trials", "3")
    assert result.returncode == 0, result.stderr
    assert "latency" in result.stdout and "val accuracy vs latency (ms)" in result.stdout
    study = study_of(workdir, "lat")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert study.metric_names == ["val_accuracy", "latency_ms"]  # what optuna-dashboard labels the axes with
    device = study.user_attrs["latency_device"]
    assert device["device"] == "cpu" and device["batch"] == 1 and device["threads"] >= 1
    assert study.user_attrs["baseline_latency_ms"] > 0
    for trial in study.trials:
        assert trial.values[1] == trial.user_attrs["latency_ms"] > 0
        assert trial.user_attrs["latency_ratio"] == pytest.approx(
            trial.values[1] / study.user_attrs["baseline_latency_ms"]
        )
        assert trial.user_attrs["macs"] > 0  # the other costs are recorded too

    report = run_cli("report", "--study-name", "lat", "--out", "report", cwd=workdir)
    assert report.returncode == 0, report.stderr
    assert "latency" in report.stdout and (workdir / "report" / "pareto.png").is_file()

    for objective, attr in (("latency", "latency_ms"), ("macs", "macs")):
        out = workdir / f"{objective}.pt"
        export = run_cli("export", "--study-name", "lat", "--trial", "best", "--max-drop", "100",
                         "--objective", objective, "--out", str(out), cwd=workdir)  # fmt: skip
        assert export.returncode == 0, export.stderr
        lowest = min(study.best_trials, key=lambda t: (t.user_attrs[attr], -t.values[0], t.number))
        assert f"picked trial {lowest.number} " in export.stdout and out.is_file()


def test_three_objective_study_has_three_values(workdir, tiny_imagefolder):
    result = run(workdir, tiny_imagefolder, "three", "--objectives", "accuracy,macs,latency", "--trials", "2")
    assert result.returncode == 0, result.stderr
    study = study_of(workdir, "three")
    assert study.metric_names == ["val_accuracy", "macs", "latency_ms"]
    assert all(len(t.values) == 3 and t.values[2] == t.user_attrs["latency_ms"] for t in study.trials)
    report = run_cli("report", "--study-name", "three", "--out", "report", cwd=workdir)
    assert report.returncode == 0, report.stderr


def test_resume_with_other_objectives_or_latency_device_is_refused(workdir, tiny_imagefolder):
    assert run(workdir, tiny_imagefolder, "lat", "--objectives", "accuracy,latency", "--trials", "1").returncode == 0
    other = run(workdir, tiny_imagefolder, "lat", "--objectives", "accuracy,params", "--trials", "1")
    assert_one_line_error(other, "was made with another config", "objectives")
    three = run(workdir, tiny_imagefolder, "lat", "--objectives", "accuracy,macs,latency", "--trials", "1")
    assert_one_line_error(three, "exists with directions (maximize, minimize), not the (maximize, minimize, minimize)")

    study = study_of(workdir, "lat")
    elsewhere = study.user_attrs["latency_device"] | {"cpu": "some other CPU", "threads": 64}
    study.set_user_attr("latency_device", elsewhere)  # as if the trials so far had been measured there
    moved = run(workdir, tiny_imagefolder, "lat", "--objectives", "accuracy,latency", "--trials", "1")
    assert_one_line_error(moved, "measured latency elsewhere", "cpu: 'some other CPU'", "threads: 64")
    assert len(study_of(workdir, "lat").trials) == 1  # nothing added


def test_export_objective_the_study_did_not_measure_exits_2(workdir, tiny_imagefolder):
    assert run(workdir, tiny_imagefolder, "macs", "--trials", "1").returncode == 0
    result = run_cli("export", "--study-name", "macs", "--max-drop", "100", "--objective", "latency",
                     "--out", "x.pt", cwd=workdir)  # fmt: skip
    assert_one_line_error(result, "did not measure latency")

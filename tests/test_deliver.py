"""Issue 25: budget mode's rungs (multi-fidelity up to the refine) and the model a run delivers."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch

import ranksearch
from conftest import REPO, SMOKE_CONFIG, run_cli
from ranksearch.deliver.delivery import DELIVERED, PENDING, Target, candidates, target_paths, targets
from ranksearch.models.measure import count_macs
from ranksearch.search.samplers import fit_to_budget, within_spread
from ranksearch.study.config import load_config, search_fields
from ranksearch.study.storage import setup_mismatch
from ranksearch.study.weights import unkept
from ranksearch.utils.errors import UserError

SMOKE = ("--config", str(SMOKE_CONFIG))


def budget_run(data, *extra: str) -> tuple[str, ...]:
    return ("run", *SMOKE, "--data-dir", str(data), "--study-name", "b", "--budget", "macs=0.3", "--trials", "8",
            "--finetune-steps", "4", "--warm-start", "uniform", *extra)  # fmt: skip


def _load(cwd, name="b"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd}/studies/{name}.db")


@pytest.mark.slow
def test_a_budget_run_searches_in_rungs_and_delivers_its_refined_best(workdir, tiny_imagefolder):
    out = workdir / "shipped" / "model.pt"
    args = budget_run(tiny_imagefolder, "--deliver-epochs", "2", "--deliver-top", "2", "--out", str(out))
    result = run_cli(*args, cwd=workdir)
    assert result.returncode == 0, result.stderr
    study = _load(workdir)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned and complete  # successive halving let some go on and stopped others
    for trial in complete:  # a curve: val at the end of each rung, 4, 12 and 36 steps
        assert sorted(trial.intermediate_values) == [4, 12, 36] and trial.user_attrs["trained_steps"] == 36
        assert trial.intermediate_values[36] == trial.values[0]
    for trial in pruned:
        assert max(trial.intermediate_values) < 36 and trial.user_attrs["trained_steps"] < 36
    payload = torch.load(out, weights_only=True)
    model = ranksearch.load_model(out)
    assert count_macs(model, (1, 3, 32, 32)) == (payload["macs"], payload["params"])
    assert payload["macs_ratio"] <= 0.3
    assert payload["refine"]["epochs"] == 2 and len(payload["refine"]["history"]) == 2
    delivered = payload["delivered"]
    assert delivered["target"] == "macs=0.3" and len(delivered["candidates"]) == 2
    best = max(delivered["candidates"], key=lambda row: row["val_refined"])
    assert payload["trial_number"] == best["trial"] and payload["val_accuracy"] == best["val_refined"]
    assert {row["trial"] for row in delivered["candidates"]} == {t.number for t in candidates(
        study, Target("macs", 0.3), 2)}  # the two best by val at the top rung  # fmt: skip
    record = study.user_attrs[DELIVERED]
    assert record[0]["path"] == str(out) and record[0]["trial"] == payload["trial_number"]
    assert study.user_attrs[PENDING] is None and not list(out.parent.glob("*.refine.pt"))
    assert f"delivered trial {payload['trial_number']}" in result.stdout and "(baseline: val" in result.stdout
    report = run_cli("report", "--study-name", "b", "--out", "rep", cwd=workdir)
    assert f"delivered at macs=0.3: trial {payload['trial_number']} refined 2 epochs" in report.stdout
    shutil.rmtree(workdir / "studies" / "b-weights")  # export re-runs the best trial's every rung, to its value
    export = run_cli("export", "--study-name", "b", "--out", "again.pt", cwd=workdir)
    assert export.returncode == 0, export.stderr
    assert "fine-tune re-run from seed" in export.stdout and f"recorded {study.best_value:.2%}" in export.stdout


@pytest.mark.slow
def test_a_run_killed_during_its_delivery_refine_is_finished_by_the_same_command(workdir, tiny_imagefolder):
    epochs = 40  # on the tiny data, seconds after the first checkpoint
    args = budget_run(tiny_imagefolder, "--deliver-epochs", str(epochs), "--deliver-top", "1", "--out", "m.pt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen([sys.executable, "-m", "ranksearch", *args], cwd=workdir, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(workdir.glob("m.pt.trial*.refine.pt")) and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    still_running = killed.poll() is None
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL and still_running
    (checkpoint,) = workdir.glob("m.pt.trial*.refine.pt")
    done = torch.load(checkpoint, weights_only=True)["epochs_done"]
    assert 1 <= done < epochs
    trials = len(_load(workdir).trials)
    assert _load(workdir).user_attrs[PENDING]["paths"] == {"macs=0.3": "m.pt"}

    resumed = run_cli(*args, cwd=workdir, subprocess=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "finishing the delivery that a stopped run began (m.pt); this run adds no trials" in resumed.stdout
    assert f"refine: resuming at epoch {done + 1}/{epochs} from {checkpoint.name}" in resumed.stderr
    study = _load(workdir)
    assert len(study.trials) == trials and study.user_attrs[PENDING] is None  # no trial added; done
    assert not checkpoint.exists()
    payload = torch.load(workdir / "m.pt", weights_only=True)
    assert payload["refine"]["epochs"] == epochs and len(payload["refine"]["history"]) == epochs
    assert study.user_attrs[DELIVERED][0]["trial"] == payload["trial_number"]
    again = run_cli(*args, cwd=workdir, subprocess=True)  # now the same command adds trials again
    assert again.returncode == 0, again.stderr
    assert len(_load(workdir).trials) == trials + 8


@pytest.mark.slow
def test_a_multi_objective_run_delivers_one_model_per_fraction(workdir, tiny_imagefolder):
    result = run_cli("run", *SMOKE, "--data-dir", str(tiny_imagefolder), "--trials", "3", "--ranks",
                     "16/32,16/32,16/32,16/32,16/32", "--ranks", "6/32,6/32,6/32,6/32,6/32", "--deliver",
                     "macs=0.6,0.2", "--deliver-epochs", "1", "--out", "best.pt", "--format", "torchscript",
                     cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for fraction in ("0.6", "0.2"):
        payload = torch.load(workdir / f"best-macs{fraction}.pt", weights_only=True)
        assert payload["macs_ratio"] <= float(fraction) and payload["delivered"]["target"] == f"macs={fraction}"
        assert (workdir / f"best-macs{fraction}.ts").is_file()
    assert [r["target"] for r in _load(workdir, "smoke").user_attrs[DELIVERED]] == ["macs=0.6", "macs=0.2"]


def test_what_a_run_delivers_and_where():
    assert targets(load_config(None, {"budget": "macs=0.2"})) == [Target("macs", 0.2)]
    assert targets(load_config(None, {"budget": "macs=0.2", "deliver": "none"})) == []
    assert targets(load_config(None, {})) == []  # a multi-objective run delivers when asked only
    config = load_config(None, {"deliver": "macs=0.1,0.2", "deliver_out": "x/m.pt"})
    assert targets(config) == [Target("macs", 0.2), Target("macs", 0.1)]
    paths = target_paths(config, targets(config))
    assert [str(p["pt"]) for p in paths.values()] == ["x/m-macs0.2.pt", "x/m-macs0.1.pt"]
    beside = target_paths(load_config(None, {"budget": "macs=0.2", "storage": "sqlite:////data/s/x.db",
                                              "study_name": "x"}), [Target("macs", 0.2)])  # fmt: skip
    assert str(beside["macs=0.2"]["pt"]) == "/data/s/x-delivered.pt"  # beside the study's database


@pytest.mark.parametrize(
    "overrides, message",
    [({"budget": "macs=0.2", "deliver": "macs=0.1"}, "a budget run delivers its best model at its budget"),
     ({"deliver": "macs=2"}, "--deliver must be COST=F1,F2,..."),
     ({"deliver": "params=0.2"}, "params is none of this run's costs (macs)"),
     ({"deliver_formats": ["pt", "zip"]}, "--format must name pt, onnx, torchscript"),
     ({"max_finetune_steps": 1000}, "--max-finetune-steps applies to budget mode only"),
     ({"budget": "macs=0.2", "max_finetune_steps": 100, "finetune_steps": 200}, "max_finetune_steps must be 0"),
     ({"budget": "macs=0.2", "reduction_factor": 1}, "reduction_factor must be in [2, 100]"),
     ({"deliver_out": "m.pt"}, "--out: this run delivers no model"),
     ({"budget": "macs=0.2", "deliver": "none", "deliver_epochs": 2}, "--deliver-epochs: this run delivers no")],
)  # fmt: skip
def test_delivery_and_rung_settings_are_checked(overrides, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_config(None, overrides)


def test_an_out_that_is_a_folder_is_refused_before_the_study_is_written(workdir, tiny_imagefolder):
    (workdir / "shipped.pt").mkdir()
    result = run_cli(*budget_run(tiny_imagefolder, "--out", "shipped.pt"), cwd=workdir)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]  # after the baseline's lines
    assert last.startswith("ranksearch: error: --out shipped.pt is a folder") and "Traceback" not in result.stderr
    assert not (workdir / "studies" / "b.db").exists()


def test_a_budget_study_of_0_9_0_does_not_resume_and_a_multi_objective_one_does():
    budget = load_config(None, {"budget": "macs=0.2"})
    multi = load_config(None, {})
    for config, resumes in ((budget, False), (multi, True)):
        recorded = {"ranksearch_version": "0.9.0", "config": search_fields(config)}
        problem = setup_mismatch("s", recorded, config)
        assert (problem is None) == resumes, problem
    assert "max_finetune_steps" not in search_fields(multi) and "max_finetune_steps" in search_fields(budget)


def test_a_budget_study_keeps_the_weights_of_its_best_few():
    trials = [optuna.trial.create_trial(value=v) for v in (0.5, 0.9, 0.7, 0.9, 0.1)]
    directions = [optuna.study.StudyDirection.MAXIMIZE]
    assert [t.value for t in unkept(trials, directions, 1)] == [0.5, 0.7, 0.1]  # ties kept
    assert [t.value for t in unkept(trials, directions, 3)] == [0.5, 0.1]
    assert unkept(trials, directions, 9) == []


def test_no_module_is_starved_below_a_quarter_of_the_largest():
    assert within_spread([12 / 32, 2 / 32, 30 / 32], 4, 1 / 32, 1.0) == [12 / 32, 8 / 32, 30 / 32]  # 30/4 up to 8
    assert within_spread([6 / 32, 8 / 32, 2 / 32], 4, 1 / 32, 1.0) == [6 / 32, 8 / 32, 2 / 32]  # within: as drawn
    assert within_spread([12 / 32, 1 / 32], 32, 1 / 32, 1.0) == [12 / 32, 1 / 32]  # 32: no limit
    cost = lambda ranks: sum(ranks) / len(ranks)  # noqa: E731
    fitted = fit_to_budget([1.0, 1 / 32, 1 / 32], cost, 0.25, 1 / 32, 1.0, 4)
    assert cost(fitted) <= 0.25 and min(fitted) >= max(fitted) / 4  # within the budget and the spread
    assert fit_to_budget([1.0, 1 / 32, 1 / 32], cost, 0.25, 1 / 32, 1.0) == [22 / 32, 1 / 32, 1 / 32]  # before


@pytest.mark.parametrize("sampler", ["gp", "tpe"])
def test_a_multi_objective_study_draws_within_the_rank_spread(sampler):
    from ranksearch.search.runner import rank_space, spread_fit
    from ranksearch.search.samplers import make_sampler

    config = load_config(None, {"sampler": sampler, "trials": 10})
    modules = [f"block{i}" for i in range(1, 6)]
    sampler = make_sampler(config, spread_fit(config), rank_space(config, modules))
    study = optuna.create_study(directions=["maximize", "minimize"], sampler=sampler)

    def objective(trial):  # rewards a starved module: the sampler is drawn to the corner
        ranks = [trial.suggest_float(f"rank_{m}", 1 / 32, 1.0, step=1 / 32) for m in modules]
        return max(ranks) - min(ranks), sum(ranks)

    study.optimize(objective, n_trials=10)
    for trial in study.trials:
        ranks = list(trial.params.values())
        assert min(ranks) >= max(ranks) / 4 - 1e-9, ranks


def test_a_sensitivity_point_is_the_fine_tune_alone_in_budget_mode():
    """A point is shared by every study on its baseline and proxy (its study's name leaves the budget out), so a
    budget run's warm start measured it with the budget's rungs: 270 steps where other runs' points had 30."""
    from types import SimpleNamespace

    from ranksearch.search.sensitivity import PointObjective
    from ranksearch.train.baseline import new_model

    config = load_config(None, {"budget": "macs=0.2", "finetune_steps": 30})
    assert config.rung_steps() == [30, 90, 270]
    baseline = SimpleNamespace(model=new_model(config))
    point = PointObjective(config, None, baseline, None, SimpleNamespace(modules=[]))
    assert point.config.rung_steps() == [30]


@pytest.mark.slow
def test_a_pending_delivery_writes_where_the_command_says_or_is_dropped_by_deliver_none(workdir, tiny_imagefolder):
    """A study's records never name a file to write to: a pending delivery is finished at the command's --out."""
    first = run_cli(*budget_run(tiny_imagefolder, "--deliver-epochs", "1", "--out", "m.pt"), cwd=workdir)
    assert first.returncode == 0, first.stderr
    planted = workdir / "elsewhere.pt"
    _load(workdir).set_user_attr(PENDING, {"run_id": "x", "paths": {"macs=0.3": str(planted)}, "targets": []})
    trials = len(_load(workdir).trials)
    again = run_cli(*budget_run(tiny_imagefolder, "--deliver-epochs", "1", "--out", "m2.pt"), cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert "finishing the delivery that a stopped run began (m2.pt)" in again.stdout
    assert (workdir / "m2.pt").is_file() and not planted.exists() and len(_load(workdir).trials) == trials
    _load(workdir).set_user_attr(PENDING, {"run_id": "x"})
    dropped = run_cli(*budget_run(tiny_imagefolder, "--deliver", "none"), cwd=workdir)
    assert dropped.returncode == 0, dropped.stderr
    assert "finishing" not in dropped.stdout and "deliver:" not in dropped.stdout
    study = _load(workdir)
    assert len(study.trials) == trials + 8 and study.user_attrs[PENDING] is None

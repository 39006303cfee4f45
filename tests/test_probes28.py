"""Issue 28's probes (a deploying user's frictions) fixed so far: each failed before its fix."""

import io
import json
from pathlib import Path
from types import SimpleNamespace

import optuna
import pandas as pd
import pytest
import torch
from test_probes24_flags import one_line_error

from conftest import SMOKE_CONFIG, run_cli
from ranksearch.inspect.progress import TrialProgress
from ranksearch.inspect.report import plot_title
from ranksearch.search.samplers import BudgetSampler, make_sampler
from ranksearch.study.config import Config
from ranksearch.train.baseline import check_baseline_worth
from ranksearch.utils.errors import UserError


@pytest.mark.parametrize("command", ["run", "pretrain"])
def test_pretraining_zero_epochs_without_weights_is_refused_before_any_work(tmp_path, tiny_imagefolder, command):
    """It had searched an untrained network without a word."""
    folder = tmp_path / "work"
    folder.mkdir()
    result = run_cli(command, "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder),
                     "--pretrain-epochs", "0", cwd=folder)  # fmt: skip
    one_line_error(result, "--pretrain-epochs 0 would search an untrained network", "--weights FILE")
    assert list(folder.iterdir()) == []


def test_the_report_title_counts_one_pareto_trial_in_the_singular():
    """It read "1 Pareto trials of 2"."""
    rows = pd.DataFrame({"pareto": [True, False]})
    assert plot_title(SimpleNamespace(study_name="b"), rows) == "b: 1 Pareto trial of 2 complete"
    assert plot_title(SimpleNamespace(study_name="b"), pd.DataFrame({"pareto": [True, True]})).startswith(
        "b: 2 Pareto trials of 2")


def test_trials_help_names_the_configs_value_as_the_default(workdir):
    """It said "default 200" where the CPU config sets 20."""
    result = run_cli("run", "--help", cwd=workdir)
    text = " ".join(result.stdout.split())
    assert "default: the config's trials" in text and "default 200" not in text


class Proposes(optuna.samplers.BaseSampler):
    """A sampler that proposes one vector every time (as GP, with no liar, did to two workers asking at once)."""

    def __init__(self, vector: dict):
        self.vector = vector

    def infer_relative_search_space(self, study, trial):
        return {}

    def sample_relative(self, study, trial, search_space):
        return {name: self.vector[name] for name in search_space}

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.vector[param_name]


SPACE = {f"rank_block{i}": optuna.distributions.FloatDistribution(1 / 32, 1.0, step=1 / 32) for i in (1, 2, 3)}
SAME = {name: 8 / 32 for name in SPACE}
GRID1 = optuna.distributions.FloatDistribution(1 / 32, 1.0, step=1 / 32)


@pytest.mark.parametrize("state", ["running", "complete", "pruned"])
def test_a_vector_another_trial_has_is_redrawn(state):
    """Two workers asking at once had drawn 16/10/14/4/1 twice and trained it twice."""
    storage = optuna.storages.InMemoryStorage()
    sampler = lambda: BudgetSampler(Proposes(SAME), SPACE, list, seed=0)  # noqa: E731
    first = optuna.create_study(directions=["maximize", "minimize"], storage=storage, sampler=sampler())
    trial = first.ask(SPACE)
    assert trial.params == SAME
    if state == "complete":
        first.tell(trial, (0.5, 0.5))
    elif state == "pruned":
        first.tell(trial, state=optuna.trial.TrialState.PRUNED)
    other = optuna.load_study(study_name=first.study_name, storage=storage, sampler=sampler())  # another worker
    drawn = other.ask(SPACE)
    assert drawn.params != SAME and all(v * 32 == round(v * 32) for v in drawn.params.values())
    again = optuna.load_study(study_name=first.study_name, storage=storage, sampler=sampler())
    assert again.ask(SPACE).params != drawn.params  # the redraw was taken too


@pytest.mark.parametrize("name", ["gp", "tpe", "tpe-multivariate", "nsga2", "random"])
def test_no_sampler_draws_a_vector_twice_while_new_ones_remain(name):
    """9 trials over a space of 9 vectors: each a new one (before, every sampler repeated some)."""
    space = {f"rank_block{i}": optuna.distributions.FloatDistribution(1 / 32, 3 / 32, step=1 / 32) for i in (1, 2)}
    study = optuna.create_study(directions=["maximize", "minimize"],
                                sampler=make_sampler(Config(sampler=name, trials=9), None, space))  # fmt: skip
    for _ in range(9):
        trial = study.ask(space)
        ranks = list(trial.params.values())
        study.tell(trial, (sum(ranks), max(ranks)))
    assert len({tuple(t.params.values()) for t in study.trials}) == 9


def test_threads_sets_the_threads_a_run_measures_with(workdir, tiny_imagefolder):
    """There was no --threads: a process on a shared machine took every core and ran 10-20x slower."""
    result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--study-name",
                     "t1", "--threads", "1", "--objectives", "accuracy,macs,latency", "--trials", "1",
                     cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="t1", storage=f"sqlite:///{workdir}/studies/t1.db")
    assert study.user_attrs["latency_device"]["threads"] == 1
    refused = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--threads", "-1",
                      cwd=workdir)  # fmt: skip
    one_line_error(refused, "threads must be")


def test_the_eta_follows_the_recent_pace_when_the_machine_gets_busy():
    """10 trials at 4 s, then the machine is shared and trials take 74 s: the ETA had stayed near the first pace
    (the whole run's mean); it is now the last trials' pace."""
    study = optuna.create_study(directions=["maximize", "minimize"])
    clock = {"now": 0.0}
    out = io.StringIO()
    progress = TrialProgress(total=40, modules=["block1"], costs=["macs"], out=out, clock=lambda: clock["now"])
    for seconds in [4.0] * 10 + [74.0] * 5:
        clock["now"] += seconds
        trial = optuna.trial.create_trial(params={"rank_block1": 0.5}, distributions={"rank_block1": GRID1},
                                          values=(0.5, 10.0), user_attrs={"macs_ratio": 0.5})  # fmt: skip
        study.add_trial(trial)
        progress(study, study.trials[-1])
    last = out.getvalue().splitlines()[-1]
    assert "ETA 30:50" in last  # 25 trials left at 74 s (the whole run's mean said 11:23)


def test_a_baseline_near_chance_stops_the_run_unless_the_user_insists(workdir, tiny_imagefolder):
    """A 3-class baseline at 38 % (chance 33 %) had gone through search and export without a word."""
    config = Config(num_classes=3, min_baseline_accuracy=None)
    near_chance = SimpleNamespace(val_accuracy=0.38)
    with pytest.raises(UserError, match=r"38.00% is within 10 points of chance \(33.33% for 3 classes\)"):
        check_baseline_worth(config, near_chance)
    check_baseline_worth(config, SimpleNamespace(val_accuracy=0.44))  # 10 points over chance: on it goes
    check_baseline_worth(Config(num_classes=3, min_baseline_accuracy=0.0), near_chance)  # the user insists
    # a run: the smoke baseline (40 % val) under a floor of 0.9 stops before the study is written; 0 goes on
    run = ("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--study-name", "floor",
           "--trials", "1")  # fmt: skip
    refused = run_cli(*run, "--min-baseline-accuracy", "0.9", cwd=workdir)
    one_line_error(refused, "under --min-baseline-accuracy 0.9", "train it longer", after_baseline=True)
    assert not (workdir / "studies" / "floor.db").exists()
    assert run_cli(*run, "--min-baseline-accuracy", "0", cwd=workdir).returncode == 0


def test_an_interrupted_pretraining_resumes_where_its_kept_epochs_end(tmp_path, tiny_imagefolder, monkeypatch,
                                                                      capsys):  # fmt: skip
    """Ctrl-C during pretraining lost every epoch (8.5 h of the full config on a CPU). Now the epochs done are kept,
    and the next command goes on from them to the weights an uninterrupted pretraining gives."""
    import ranksearch.train.baseline as baseline_module
    import ranksearch.train.loops as train_module
    from ranksearch.data.datasets import device_data
    from ranksearch.study.config import load_config
    from ranksearch.train.baseline import ensure_baseline, train_baseline
    from ranksearch.utils.interrupts import Interrupted

    config = load_config(SMOKE_CONFIG, {"data_dir": str(tiny_imagefolder), "pretrain_epochs": 4,
                                        "baseline_dir": str(tmp_path / "baselines")})  # fmt: skip
    data = device_data(config, torch.device("cpu"))
    whole = train_baseline(config, data).model.state_dict()  # uninterrupted, kept nowhere

    monkeypatch.setattr(baseline_module, "CHECKPOINT_SECONDS", 0.0)  # every epoch kept (tiny epochs)
    real_steps, calls = train_module.train_steps, []

    def ctrl_c_in_epoch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_steps(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_steps", ctrl_c_in_epoch_3)
    with pytest.raises(Interrupted, match=r"its first 2 epochs are kept in .*\.pretraining, and the next command"):
        ensure_baseline(config, data)
    monkeypatch.setattr(train_module, "train_steps", real_steps)
    resumed = ensure_baseline(config, data)
    assert "resuming its pretraining at epoch 3/4" in capsys.readouterr().err
    assert all(torch.equal(resumed.model.state_dict()[k], whole[k]) for k in whole)  # bit for bit, on the CPU
    assert [p.suffix for p in (tmp_path / "baselines").iterdir()] == [".pt"]  # the checkpoint is gone


def test_a_cpu_pretraining_of_hours_says_so_after_its_first_steps():
    from ranksearch.utils.steps import PaceNote

    out, clock = io.StringIO(), {"now": 0.0}
    shown = []
    note = PaceNote(SimpleNamespace(update=lambda steps: shown.append(steps), close=lambda: None), total=10_530,
                    text=lambda s: f"about {s:.0f} s", clock=lambda: clock["now"], out=out)  # fmt: skip
    for _ in range(30):
        clock["now"] += 1.0  # 1 s a step: 10,530 steps, about 3 hours
        note.update(1)
    assert out.getvalue() == "about 10530 s\n" and len(shown) == 30  # once, and every step still shown
    fast = io.StringIO()
    quick = PaceNote(SimpleNamespace(update=lambda steps: None, close=lambda: None), total=1000,
                     text=lambda s: "slow", clock=lambda: clock["now"], out=fast)  # fmt: skip
    for _ in range(30):
        clock["now"] += 0.1
        quick.update(1)
    assert fast.getvalue() == ""  # 100 s in all: nothing to say


@pytest.mark.slow
def test_sensitivity_points_are_measured_once_for_every_study_on_the_baseline(workdir, tiny_imagefolder):
    """With the default storage (a database per study) every study name measured the points again, and the points'
    study sat in the main study's dashboard list. They are now in one database beside the baselines."""
    smoke = ("--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--warm-start", "sensitivity",
             "--trials", "1")  # fmt: skip
    first = run_cli("run", *smoke, "--study-name", "one", cwd=workdir)
    assert first.returncode == 0, first.stderr
    assert "sensitivity: measuring 45 of 45 points" in first.stdout
    second = run_cli("run", *smoke, "--study-name", "two", cwd=workdir)
    assert second.returncode == 0, second.stderr
    assert "measuring" not in second.stdout and "warm start (sensitivity): enqueued" in second.stdout
    for name in ("one", "two"):  # each study's database holds that study alone
        assert optuna.get_all_study_names(f"sqlite:///{workdir}/studies/{name}.db") == [name]
    (points,) = optuna.get_all_study_names(f"sqlite:///{workdir}/studies/baselines/sensitivity.db")
    assert "-sensitivity-" in points


def test_the_dashboard_shows_the_reports_pareto_plot_and_notes_that_hold_after_the_front_moves(workdir,
                                                                                                tiny_imagefolder):
    """The study page had Optuna's own plot alone (val as a fraction against absolute MACs); a trial pushed off the
    front kept a note saying its weights are "kept while on the Pareto front"."""
    import json

    from optuna_dashboard._custom_plot_data import get_plotly_graph_objects

    from ranksearch.inspect.notes import trial_note
    from ranksearch.study.attrs import WEIGHTS_ATTR

    result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "2",
                     cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{workdir}/studies/smoke.db")
    plots = get_plotly_graph_objects(study._storage.get_study_system_attrs(study._study_id))
    figure = json.loads(plots["ranksearch-pareto"])
    assert figure["layout"]["yaxis"]["title"]["text"] == "validation accuracy (%)"
    assert figure["layout"]["xaxis"]["type"] == "log" and "baseline's" in figure["layout"]["xaxis"]["title"]["text"]
    trial = study.trials[0]
    kept = optuna.trial.create_trial(params=trial.params, distributions=trial.distributions, values=trial.values,
                                     user_attrs={**trial.user_attrs, WEIGHTS_ATTR: "x", "seed": 7})  # fmt: skip
    note = trial_note(kept, ["block1"], [], "python -m ranksearch export --study-name smoke")
    assert max(len(line) for line in note.splitlines()) <= 92  # the dashboard wraps nothing
    note = note.replace("\\\n  ", " ")  # the hard breaks
    assert "kept while on the Pareto front" not in note
    assert "deleted if a later trial pushes it off" in note and "re-runs its fine-tune (seed 7)" in note


def test_a_budget_plot_draws_the_budget():
    from ranksearch.inspect.report import pareto_figure

    study = optuna.create_study(direction="maximize")
    study.set_user_attr("config", {"budget": "macs=0.2"})
    study.set_user_attr("baseline", {"val_accuracy": 0.9, "test_accuracy": 0.9, "macs": 100, "params": 10})
    for val, ratio in ((0.8, 0.19), (0.7, 0.15)):
        attrs = {"macs": ratio * 100, "macs_ratio": ratio, "params": 5, "params_ratio": 0.5}
        study.add_trial(optuna.trial.create_trial(params={"rank_block1": 0.5}, distributions={"rank_block1": GRID1},
                                                  value=val, user_attrs=attrs))  # fmt: skip
    figure = pareto_figure(study)
    (budget,) = [t for t in figure.data if t.name == "budget 0.2x"]
    assert list(budget.x) == [0.2, 0.2]


def test_export_best_names_the_margin_that_takes_the_nearest_trial():
    """`export --trial best` failed on every CPU study (all trials over 1 point below the baseline) and said only
    "raise --max-drop"; the tutorial's "where next" suggested it as it was."""
    from ranksearch.deliver.export import pick_best

    study = optuna.create_study(directions=["maximize", "minimize"])
    study.set_user_attr("baseline", {"val_accuracy": 0.40, "test_accuracy": 0.4, "macs": 100, "params": 10})
    for val, ratio in ((0.20, 0.227), (0.30, 0.296)):
        attrs = {"macs": ratio * 100, "macs_ratio": ratio, "params": 5, "params_ratio": 0.5}
        study.add_trial(optuna.trial.create_trial(params={"rank_block1": 0.5}, distributions={"rank_block1": GRID1},
                                                  values=(val, ratio * 100), user_attrs=attrs))  # fmt: skip
    with pytest.raises(UserError, match=r"--max-drop 10 takes trial 1 "):
        pick_best(study, 1.0)
    assert pick_best(study, 10.0).trial.number == 1  # and it does


def test_a_failed_download_leaves_no_folder_behind(tmp_path, monkeypatch):
    """A download that failed (no network) left an empty data/, though a failed start is said to leave nothing."""
    import torchvision.datasets

    from ranksearch.data.datasets import load_dataset

    def no_network(root, train, download):
        (Path(root) / "cifar-10-python.tar.gz").touch()  # torchvision opens the archive before the first byte
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", no_network)
    with pytest.raises(UserError, match="the download failed"):
        load_dataset(tmp_path / "data" / "cifar", download=True)
    assert list(tmp_path.iterdir()) == []


def test_a_warm_start_vector_fitted_to_the_budget_says_so(capsys):
    """The sensitivity allocation printed 16/12/8/6/12 and 17/12/8/6/12 was queued, with no word why."""
    from ranksearch.search.warmstart import queue_warm_starts

    study = optuna.create_study(direction="maximize")
    config = Config(warm_start=["sensitivity"], budget="macs=0.2", trials=4)
    modules = ["block1", "block2", "block3", "block4", "block5"]
    allocation = [k / 32 for k in (16, 12, 8, 6, 12)]
    fit = lambda ranks: [ranks[0] + 1 / 32, *ranks[1:]]  # noqa: E731 (the budget's boundary is one step up)
    queue_warm_starts(study, config, None, modules, [allocation], fit)
    out = capsys.readouterr().out
    assert "fitted to budget macs=0.2" in out and "16/12/8/6/12 /32 -> 17/12/8/6/12 /32" in out
    assert "enqueued 1: 17/12/8/6/12 /32" in out


def test_ranks_vbmf_says_what_its_vector_costs(workdir, tiny_imagefolder):
    """`ranks --vbmf` printed a --ranks vector without its MACs."""
    result = run_cli("ranks", "--vbmf", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder),
                     cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-2].startswith("--ranks ")
    assert lines[-1].startswith("its cost: MACs ") and lines[-1].endswith("x of the baseline's")


def test_export_and_delivery_measure_the_speed_up_and_record_it(workdir, tiny_imagefolder):
    """MACs are not speed (0.426x MACs ran at 0.773x latency), and export never reported the speed-up it could
    measure: now both export and a run's delivery time the model against the baseline, deployed, at batch 1 and a
    second batch, print it and record it in the .pt."""
    run = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "1",
                  "--deliver", "macs=1", "--deliver-epochs", "1", cwd=workdir)  # fmt: skip
    assert run.returncode == 0, run.stderr
    said = run.stdout + run.stderr
    assert "speed on this machine (" in said and "batch 1: " in said and "batch 32: " in said
    assert "x as fast at batch 1, " in said and "x at 32 -> " in said  # the delivered line
    delivered = torch.load(workdir / "studies" / "smoke-delivered.pt", weights_only=True)
    assert set(delivered["speed"]["batches"]) == {"1", "32"} and delivered["speed"]["form"].startswith("BatchNorm")
    report = run_cli("report", "--study-name", "smoke", "--out", "report", cwd=workdir)
    assert report.returncode == 0 and "x as fast at batch 1, " in report.stdout, report.stdout + report.stderr
    export = run_cli("export", "--study-name", "smoke", "--trial", "0", "--out", "exports/t0.pt", "--speed-batch",
                     "0", cwd=workdir)  # fmt: skip
    assert export.returncode == 0, export.stderr
    speed = torch.load(workdir / "exports" / "t0.pt", weights_only=True)["speed"]
    assert list(speed["batches"]) == ["1"] and speed["batches"]["1"]["speedup"] > 0
    assert speed["where"]["device"] == "cpu" and speed["where"]["threads"] >= 1
    refused = run_cli("export", "--study-name", "smoke", "--trial", "0", "--out", "exports/t1.pt", "--speed-batch",
                      "-1", cwd=workdir)  # fmt: skip
    one_line_error(refused, "--speed-batch must be 0..4096")


def test_a_strangers_delivery_and_budget_records_print_nothing_they_do_not_hold():
    """The report reads a study that may be anyone's: speed-ups that are no numbers and a budget that is no budget
    leave their words out instead of a traceback."""
    from ranksearch.inspect.report import budget_of
    from ranksearch.objectives.latency import speedups_text

    assert speedups_text({"32": 2.79, "1": 4.47}) == ", 4.47x as fast at batch 1, 2.79x at 32"
    assert speedups_text({"1": "os.system('x')", "../x": 1.0, "2": float("nan")}) == ""
    assert speedups_text("not a dict") == ""
    study = optuna.create_study()
    study.set_user_attr("config", {"budget": "rm -rf /"})
    assert budget_of(study) is None
    study.set_user_attr("config", "no dict")
    assert budget_of(study) is None


def test_a_trials_user_attrs_each_fit_one_line_of_the_dashboards_trial_page(workdir, tiny_imagefolder):
    """optuna-dashboard lists a trial's user attrs one to a line, unwrapped: VGG16's ``conv_ranks`` (conv name ->
    R, 13 of them) made that line wider than a 1400-pixel window, and the page scrolled sideways. The per-conv
    record is now in the trial's system attrs, which the dashboard does not list."""
    from optuna_dashboard._serializer import serialize_attrs

    result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "1",
                     cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    (trial,) = optuna.load_study(study_name="smoke", storage=f"sqlite:///{workdir}/studies/smoke.db").trials
    shown = [f"{a['key']} {a['value']}" for a in serialize_attrs(trial.user_attrs)]
    assert max(len(line) for line in shown) <= 100, max(shown, key=len)  # about what a 1400-px window shows
    convs = trial.system_attrs["conv_ranks"]
    assert len(convs) == 13 and set(trial.system_attrs["kept_convs"]) <= set(convs)


def test_a_latency_is_reused_from_a_trial_that_recorded_its_conv_ranks_either_way():
    """Trials before 0.13.0 recorded ``conv_ranks`` as user attrs: a resumed study still reuses their latency."""
    from ranksearch.objectives.latency import recorded_latency

    record = ({"features.0": 3, "features.3": 2}, ["features.0"])
    key = json.dumps(record, sort_keys=True)
    study = optuna.create_study()
    old = {"latency_ms": 2.5, "conv_ranks": record[0], "kept_convs": record[1]}
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs=old))
    assert recorded_latency(study, key) == 2.5
    study = optuna.create_study()
    new = optuna.trial.create_trial(value=0.5, user_attrs={"latency_ms": 4.0},
                                    system_attrs={"conv_ranks": record[0], "kept_convs": record[1]})  # fmt: skip
    study.add_trial(new)
    assert recorded_latency(study, key) == 4.0
    assert recorded_latency(study, json.dumps(({"features.0": 3, "features.3": 1}, ["features.0"]))) is None
    study = optuna.create_study()  # a stranger's record without kept_convs first: compared, never a KeyError
    study.add_trial(optuna.trial.create_trial(value=0.5, user_attrs={"latency_ms": 1.0},
                                              system_attrs={"conv_ranks": "x"}))  # fmt: skip
    study.add_trial(new)
    assert recorded_latency(study, key) == 4.0

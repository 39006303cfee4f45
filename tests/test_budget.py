"""Budget mode: the cost table, vectors fitted to a budget, the budget sampler, pruning, and `run --budget`."""

import copy
import dataclasses
import random

import optuna
import pytest

from conftest import SMOKE_CONFIG, run_cli
from ranksearch.decompose import decompose
from ranksearch.models import RANK_STEPS, attach_rank_buffers, build_model, set_ranks
from ranksearch.models.measure import count_macs
from ranksearch.objectives.budget import parse_budget, rungs
from ranksearch.objectives.cost_table import cost_table
from ranksearch.search.samplers import BudgetSampler, RungPruner, fit_to_budget, make_pruner
from ranksearch.utils.errors import UserError


@pytest.mark.parametrize(
    "model, width, space, decomposition, svd",
    [("vgg16", 0.25, "module", "tucker2", False), ("resnet20", 1.0, "layer", "cp", True),
     ("vgg11", 0.5, "module", "tucker2", True)],
)  # fmt: skip
def test_the_cost_table_equals_counting_the_decomposed_model(model, width, space, decomposition, svd):
    net = build_model(model, width=width, num_classes=10)
    if svd:
        attach_rank_buffers(net, pointwise=True)
    table = cost_table(net, space, decomposition)
    rng = random.Random(0)
    for _ in range(4):
        ranks = [rng.randint(1, RANK_STEPS) / RANK_STEPS for _ in table.modules]
        shaped = decompose(set_ranks(copy.deepcopy(net), ranks, space), factorize=False, decomposition=decomposition)
        macs, params = count_macs(shaped)
        assert table.cost("macs", ranks) == macs
        assert table.cost("params", ranks) == params
    assert table.ratio("macs", [1.0] * len(table.modules)) <= 1.0


def test_a_module_alone_saves_what_counting_says():
    net = build_model("vgg16", width=0.25, num_classes=10)
    table = cost_table(net)
    base, _ = count_macs(net)
    shaped = decompose(set_ranks(copy.deepcopy(net), {"block3": 4 / 32}), factorize=False)
    assert table.alone_ratio("macs", "block3", 4 / 32) == pytest.approx(count_macs(shaped)[0] / base)


def test_fit_to_budget_spends_the_budget_and_no_step_more():
    ratio = lambda ranks: sum(r**1.5 for r in ranks) / len(ranks)  # noqa: E731  (any cost that grows with ranks)
    shares = [0.9, 0.3, 0.6, 0.1]
    fitted = fit_to_budget(shares, ratio, 0.2, 1 / 32, 1.0)
    assert ratio(fitted) <= 0.2
    assert all(round(r * RANK_STEPS) == r * RANK_STEPS for r in fitted)
    steps = [round(r * RANK_STEPS) for r in fitted]
    assert steps.index(max(steps)) == 0 and steps.index(min(steps)) == 3  # the shares' order is kept
    factor = max(r / s for r, s in zip(fitted, shares, strict=True)) + 1e-6
    larger = [min(1.0, max(1 / 32, int(s * factor * 1.25 * 32) / 32)) for s in shares]
    assert ratio(larger) > 0.2  # a quarter more of the same direction is over
    assert fit_to_budget([1.0, 1.0], ratio, 1.0, 1 / 32, 1.0) == [1.0, 1.0]
    assert fit_to_budget(shares, ratio, 0.001, 1 / 32, 1.0) is None  # even every module at rank_min is over


@pytest.mark.parametrize("text", ["macs", "macs=0", "macs=1.5", "flops=0.1", "macs=x", "=0.1", "latency=nan"])
def test_a_bad_budget_is_a_user_error(text):
    with pytest.raises(UserError, match="budget must be COST=FRACTION"):
        parse_budget(text)


def test_parse_budget():
    assert parse_budget("macs=0.1") == ("macs", 0.1)
    assert parse_budget("latency=1") == ("latency", 1.0)


@pytest.mark.parametrize("sampler", ["tpe", "tpe-multivariate", "gp", "nsga2", "random"])
def test_every_draw_of_the_budget_sampler_meets_the_budget(sampler):
    from ranksearch.search.samplers import make_sampler
    from ranksearch.study.config import Config

    table = cost_table(build_model("vgg16", width=0.25, num_classes=10))
    names = [f"rank_{m}" for m in table.modules]
    space = {n: optuna.distributions.FloatDistribution(1 / 32, 1.0, step=1 / 32) for n in names}
    ratio = lambda ranks: table.ratio("macs", ranks)  # noqa: E731
    fit = lambda shares: fit_to_budget(shares, ratio, 0.2, 1 / 32, 1.0)  # noqa: E731
    study = optuna.create_study(sampler=make_sampler(Config(sampler=sampler, trials=12), fit, space))
    assert isinstance(study.sampler, BudgetSampler)

    def objective(trial):
        ranks = [trial.suggest_float(n, 1 / 32, 1.0, step=1 / 32) for n in names]
        return ratio(ranks) - sum(ranks)

    study.optimize(objective, n_trials=12)
    for trial in study.trials:
        ranks = [trial.params[n] for n in names]
        assert ratio(ranks) <= 0.2
        assert ratio(ranks) > 0.15  # on the budget's boundary, not anywhere under it
    assert len({tuple(t.params.values()) for t in study.trials}) > 3  # the sampler still explores


def test_rungs_and_pruner():
    assert rungs(30, None) == [30, 90, 270]  # three rungs by default
    assert rungs(200, 1000) == [200, 600, 1000]  # the top rung ends where max_finetune_steps says
    assert rungs(30, 30) == rungs(30, 0) == [30]  # the fine-tune alone
    assert rungs(10, 100, 2) == [10, 20, 40, 80, 100]
    assert isinstance(make_pruner("halving", [30, 90, 270]), RungPruner)
    assert isinstance(make_pruner("hyperband", [30, 90, 270]), optuna.pruners.HyperbandPruner)
    assert isinstance(make_pruner("none", [30, 90, 270]), optuna.pruners.NopPruner)
    assert isinstance(make_pruner("halving", [30]), optuna.pruners.NopPruner)  # one rung: nothing to prune at


def test_the_rung_pruner_lets_the_best_few_go_on_then_the_best_third():
    study = optuna.create_study(direction="maximize", pruner=RungPruner([10, 30, 90], factor=3, keep=2))
    went_on = []
    for value in (0.9, 0.5, 0.4, 0.6, 0.3, 0.2, 0.8, 0.1, 0.7, 0.95):
        trial = study.ask()
        trial.report(value, 10)
        went_on.append(not trial.should_prune())
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    # the first two always; then the best 2 of up to 8, the best 3 of 9 and 10 (Optuna's halving: the best only)
    assert went_on == [True, True, False, True, False, False, True, False, True, True]
    trial = study.ask()
    trial.report(0.0, 90)  # the top rung: the trial's end, never pruned there
    assert not trial.should_prune()


def _load(cwd, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{cwd}/studies/{name}.db")


@pytest.mark.slow
def test_run_budget_meets_the_budget_prunes_and_exports_the_best(workdir, tiny_imagefolder):
    data = str(tiny_imagefolder)
    result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", data, "--study-name", "b", "--budget",
                     "macs=0.3", "--trials", "10", "--finetune-steps", "9", "--warm-start", "uniform",
                     cwd=workdir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "budget macs=0.3:" in result.stdout and "best: trial" in result.stdout
    study = _load(workdir, "b")
    assert [d.name for d in study.directions] == ["MAXIMIZE"]
    ended = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(ended) == 10
    assert all(t.user_attrs["macs_ratio"] <= 0.3 for t in study.trials if t.state.name == "COMPLETE")
    pruned = [t for t in study.trials if t.state.name == "PRUNED"]
    assert pruned and all(t.intermediate_values and "pruned_at" in t.user_attrs for t in pruned)
    assert study.trials[0].params == {f"rank_block{i}": study.trials[0].params["rank_block1"] for i in range(1, 6)}
    out = workdir / "best.pt"
    export = run_cli("export", "--study-name", "b", "--out", str(out), cwd=workdir)
    assert export.returncode == 0, export.stderr
    assert f"trial {study.best_trial.number}" in export.stdout and "within budget macs=0.3" in export.stdout
    report = run_cli("report", "--study-name", "b", "--out", "rep", cwd=workdir)
    assert report.returncode == 0, report.stderr
    assert "pruned)" in report.stdout and "best val accuracy within budget macs=0.3: " in report.stdout


@pytest.mark.parametrize(
    "flags, message",
    [(["--budget", "macs=0"], "budget must be COST=FRACTION"),
     (["--budget", "macs=0.0001"], "below the cheapest model's macs"),
     (["--budget", "macs=0.2", "--ranks", "16/32,16/32,16/32,16/32,16/32"], "over the budget macs=0.2"),
     (["--budget", "latency=0.5", "--objectives", "accuracy,macs,params"], "latency must be one of the objectives")],
)  # fmt: skip
def test_a_budget_that_cannot_be_met_is_one_line_and_writes_no_study(workdir, tiny_imagefolder, flags, message):
    result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--study-name", "x",
                     *flags, cwd=workdir)  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert sum(line.startswith("ranksearch: error") for line in result.stderr.splitlines()) == 1
    assert not (workdir / "studies" / "x.db").exists()


@pytest.mark.slow
def test_a_params_budget_on_resnet20_cp_with_two_workers_on_postgresql(postgres_url, workdir, tiny_imagefolder):
    result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--model",
                     "resnet20", "--width", "0.25", "--decomposition", "cp", "--budget", "params=0.5", "--storage",
                     postgres_url, "--study-name", "r", "--workers", "2", "--trials", "6", "--finetune-steps", "9",
                     "--sampler", "tpe-multivariate", cwd=workdir, subprocess=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(study_name="r", storage=postgres_url)
    ended = [t for t in study.trials if t.state.name in ("COMPLETE", "PRUNED")]
    assert len(ended) == 6 and {t.user_attrs["worker"] for t in ended} == {0, 1}
    complete = [t for t in ended if t.state.name == "COMPLETE"]
    assert complete and all(0.4 < t.user_attrs["params_ratio"] <= 0.5 for t in complete)
    assert study.user_attrs["config"]["objectives"] == ["accuracy", "macs", "params"]


def test_a_latency_budget_measures_each_candidate_architecture_with_the_trials_meter():
    """Latency is measured, not tabled: the fit asks the trials' meter for each candidate it tries (here a stand-in
    whose milliseconds are the architecture's MACs, so that the result is known)."""
    import types

    from ranksearch.search.runner import budget_fit, budget_ratio_of
    from ranksearch.study.config import Config

    model = build_model("vgg16", width=0.25, num_classes=10)
    table = cost_table(model)
    asked = []

    def latency(shaped, study):
        asked.append(shaped)
        return count_macs(shaped)[0] / 1e6, 0.0

    meter = types.SimpleNamespace(latency=latency, baseline_ms=table.base["macs"] / 1e6)
    config = Config(budget="latency=0.3", objectives=["accuracy", "latency"])
    baseline = types.SimpleNamespace(model=model)
    fit = budget_fit(config, budget_ratio_of(config, baseline, table, meter, None))
    ranks = fit([0.5, 0.5, 0.25, 0.25, 0.25])
    assert table.ratio("macs", ranks) <= 0.3 < table.ratio("macs", [min(1.0, r + 1 / 32) for r in ranks])
    assert 3 <= len(asked) <= 12  # a bisection over the candidates, not a sweep
    with pytest.raises(UserError, match="below the cheapest model's latency"):
        budget_fit(
            dataclasses.replace(config, budget="latency=0.001"),
            budget_ratio_of(config, baseline, table, meter, None),
        )([0.5] * 5)

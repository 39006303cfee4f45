"""One trial on a real in-memory study: ranks a complete trial already has are copied, not trained again; and
each worker's sampler draws its own ranks, reproducibly."""

import dataclasses
import math
import types

import optuna
import pytest
import torch

from conftest import SMOKE_CONFIG
from ranksearch import count_macs
from ranksearch.data.datasets import DeviceData, load_dataset
from ranksearch.inspect.report import trials_table, write_report
from ranksearch.models import vgg16_cifar
from ranksearch.objectives import latency
from ranksearch.objectives.latency import PAIRED_ROUNDS
from ranksearch.search import trial
from ranksearch.search.samplers import make_sampler, sampler_seed
from ranksearch.study.config import load_config
from ranksearch.study.weights import WeightsStore
from ranksearch.train.baseline import Baseline

DIRECTIONS = ["maximize", "minimize"]
MODULES = ["block1", "block2", "block3", "block4", "block5"]
DIST = optuna.distributions.FloatDistribution(1 / 32, 1, step=1 / 32)
RANKS = {f"rank_{m}": k / 32 for m, k in zip(MODULES, [8, 8, 4, 2, 2], strict=True)}
TIMINGS = {"decompose_s", "recalibrate_s", "finetune_s", "eval_s", "count_s"}  # CPU; peak_gpu_mib too on CUDA
LATENCY_ATTRS = {"latency_ms", "latency_ratio"}  # recorded (and copied) when latency is an objective


@pytest.fixture(scope="module")
def setup(tiny_imagefolder):
    """The smoke config, the tiny data, and an (untrained) smoke-width baseline."""
    config = load_config(SMOKE_CONFIG)
    data = DeviceData(load_dataset(tiny_imagefolder), config.val_size, config.split_seed, torch.device("cpu"))
    model = vgg16_cifar(num_classes=config.num_classes, width=config.width)
    macs, params = count_macs(model)
    return config, data, Baseline(model, 0.1, 0.1, macs, params, 0.0)


@pytest.fixture
def trainings(monkeypatch) -> list[dict]:
    """Counts the trials that decompose and fine-tune (the ranks of each), running them for real."""
    calls, real = [], trial.trial_model

    def counted(baseline, ranks, *args, **kwargs):
        calls.append(ranks)
        return real(baseline, ranks, *args, **kwargs)

    monkeypatch.setattr(trial, "trial_model", counted)
    return calls


def test_ranks_already_complete_are_copied_not_trained_again(setup, trainings, tmp_path):
    config, data, baseline = setup
    weights = WeightsStore(tmp_path / "weights")
    study = optuna.create_study(directions=DIRECTIONS)
    distributions = {name: DIST for name in RANKS}
    study.add_trial(optuna.trial.create_trial(params=RANKS, distributions=distributions,
                                              state=optuna.trial.TrialState.FAIL))  # fmt: skip
    study.enqueue_trial(RANKS, user_attrs={"run_id": "first"})
    study.enqueue_trial(RANKS, user_attrs={"run_id": "second"})  # as another worker would tag it
    study.optimize(trial.Objective(config, data, baseline, weights), n_trials=2)
    failed, original, copy = study.trials
    assert len(trainings) == 1  # the failed trial does not count: trial 1 trained, trial 2 did not
    assert copy.state == optuna.trial.TrialState.COMPLETE and copy.values == original.values
    measured = {key: value for key, value in original.user_attrs.items() if key not in TIMINGS}
    assert TIMINGS <= set(original.user_attrs)
    assert set(measured) == {*trial.COPIED_ATTRS, "run_id", "trained_steps"} - LATENCY_ATTRS - {"weights_not_kept"}
    assert original.user_attrs["trained_steps"] == config.finetune_steps
    # its own tags, no timings, and no steps trained
    assert copy.user_attrs == measured | {"copied_from": 1, "run_id": "second", "trained_steps": 0}
    assert copy.user_attrs["seed"] == trial.trial_seed(config, 1) != trial.trial_seed(config, 2)
    kept = weights.load(original)
    assert all(torch.equal(weights.load(copy)[key], value) for key, value in kept.items())

    # export's other path: the recorded seed re-runs the original's fine-tune to its weights
    ranks = {name.removeprefix("rank_"): value for name, value in copy.params.items()}
    rebuilt, _ = trial.trial_model(baseline.model, ranks, config, data, copy.user_attrs["seed"])
    for key, value in kept.items():
        torch.testing.assert_close(rebuilt.state_dict()[key].cpu(), value, atol=1e-6, rtol=1e-5)

    # the report lists the copy as a trial of its own, with the original's values and no fine-tune seconds
    table = trials_table(study).set_index("number")
    assert table.loc[2, "val_accuracy"] == table.loc[1, "val_accuracy"] and table.loc[2, "pareto"]
    assert table.loc[2, "macs_ratio"] == table.loc[1, "macs_ratio"] and math.isnan(table.loc[2, "finetune_s"])
    assert all(path.is_file() for path in write_report(study, tmp_path / "report"))

    # both leave the front together, and with them the one copy of their weights
    study.add_trial(optuna.trial.create_trial(params=RANKS, distributions=distributions, values=[1.0, 1.0]))
    weights.prune(study)
    assert weights.load(original) is None and weights.load(copy) is None


def draws(study: optuna.Study, count: int = 3) -> list[dict]:
    """``count`` rank vectors ``study`` asks of its sampler, each told a value so that the next one sees it."""
    drawn = []
    for _ in range(count):
        trial = study.ask({f"rank_{m}": DIST for m in MODULES})
        study.tell(trial, [sum(trial.params.values()), -sum(trial.params.values())])
        drawn.append(trial.params)
    return drawn


def fresh_study(sampler: optuna.samplers.BaseSampler, storage=None) -> optuna.Study:
    return optuna.create_study(directions=DIRECTIONS, sampler=sampler, storage=storage)


@pytest.mark.parametrize("name", ["gp", "tpe", "tpe-multivariate", "nsga2", "random"])
def test_a_trial_draws_by_its_number_the_same_again_and_never_like_another_worker(name):
    config = dataclasses.replace(load_config(SMOKE_CONFIG), sampler=name)
    first = draws(fresh_study(make_sampler(config)))
    assert first == draws(fresh_study(make_sampler(config)))  # the same study again: the same ranks
    assert first != draws(fresh_study(make_sampler(dataclasses.replace(config, seed=1))))
    # two workers on one study, each with its own sampler, asking at the same state: different trial numbers
    storage = optuna.storages.InMemoryStorage()
    one = fresh_study(make_sampler(config), storage)
    other = optuna.load_study(study_name=one.study_name, storage=storage, sampler=make_sampler(config))
    space = {f"rank_{m}": DIST for m in MODULES}
    asked = [one.ask(space), other.ask(space)]  # both running at once
    assert asked[0].params != asked[1].params and asked[0].params == first[0]


def test_sampler_seeds_are_stable_across_processes_and_fit_32_bits():
    assert sampler_seed(0, 0) == 2872663220  # sha256, not the per-process salted ``hash``
    assert len({sampler_seed(seed, number) for seed in (0, 1) for number in range(100)}) == 200
    assert all(0 <= sampler_seed(seed, 0) < 2**32 for seed in (0, 2**32 - 1))


def test_latency_is_timed_beside_the_baseline_so_that_load_cancels(monkeypatch):
    """The machine gets 3x slower after the baseline was first timed: a model that is truly half as fast as the
    baseline still reads baseline_ms x 0.5, the ratio timed side by side."""
    load = {"factor": 1.0}
    true_ms = {"baseline": 4.0, "model": 2.0}

    def fake_measure(model, **kwargs):
        return types.SimpleNamespace(median_ms=true_ms[model.name] * load["factor"])

    monkeypatch.setattr(latency, "measure_latency", fake_measure)
    monkeypatch.setattr(latency, "deployed_form", lambda model, input_shape, device: model)
    config = load_config(SMOKE_CONFIG, {"objectives": ["accuracy", "latency"]})
    meter = latency.LatencyMeter(config.latency_batch, config.decomposition, torch.device("cpu"),
                                 types.SimpleNamespace(name="baseline"))
    load["factor"] = 3.0
    assert meter.baseline_ms == 4.0 and meter.measure(types.SimpleNamespace(name="model")) == pytest.approx(2.0)


def test_latency_objective_is_measured_once_per_architecture(setup, trainings, monkeypatch):
    """Three objectives: values (val accuracy, MACs, latency ms); the latency is measured on the decomposed model
    before its fine-tune, once per set of integer ranks (block1 at 1/32 and 3/32 both round to R = 1 of its 4
    channels), and once for the baseline, in this process."""
    config, data, baseline = setup
    config = dataclasses.replace(config, objectives=["accuracy", "macs", "latency"])
    timed = []
    real = latency.measure_latency

    def counted(model, **kwargs):
        timed.append(model)
        return real(model, max_seconds=0.5, **kwargs)

    monkeypatch.setattr(latency, "measure_latency", counted)
    study = optuna.create_study(directions=["maximize", "minimize", "minimize"])
    first, same_layers, other = dict(RANKS), dict(RANKS), dict(RANKS)
    first["rank_block1"], same_layers["rank_block1"], other["rank_block5"] = 1 / 32, 3 / 32, 5 / 32
    for ranks in (first, same_layers, other):
        study.enqueue_trial(ranks)
    objective = trial.Objective(config, data, baseline)
    study.optimize(objective, n_trials=3)
    architectures = {id(model) for model in timed if model is not objective.latency.baseline}
    beside = sum(model is objective.latency.baseline for model in timed)  # first alone, then beside each architecture
    assert len(trainings) == 3 and len(architectures) == 2 and beside == 1 + 2 * PAIRED_ROUNDS
    one, two, three = study.trials
    assert len(one.values) == 3 and one.values[2] == one.user_attrs["latency_ms"] > 0
    assert two.values[2] == one.values[2] and two.user_attrs["latency_s"] == 0 < one.user_attrs["latency_s"]
    assert three.values[2] != one.values[2] or three.user_attrs["latency_s"] > 0
    assert one.user_attrs["latency_ratio"] == pytest.approx(one.values[2] / objective.latency.baseline_ms)
    assert one.values[1] == one.user_attrs["macs"] and one.system_attrs["conv_ranks"] == two.system_attrs["conv_ranks"]

"""Kept weights: prune keeps exactly the Pareto front, judged from one read of the trials, and stays right while
several workers finish trials and prune the same study at once."""

import random
import threading

import optuna
import pytest
from torch import nn

from ranksearch.study.weights import WeightsStore, dominated

DIRECTIONS = ["maximize", "minimize"]
DIST = optuna.distributions.FloatDistribution(1 / 32, 1, step=1 / 32)


def finish_trial(study: optuna.Study, store: WeightsStore, values: list[float]) -> int:
    """A trial as a worker runs one: its weights saved while it runs, then its values told; returns its number."""
    trial = study.ask({"rank_block1": DIST})
    layer = nn.Linear(1, 1, bias=False)
    nn.init.constant_(layer.weight, trial.number)  # each trial's weights say whose they are
    store.save(trial, layer)
    study.tell(trial, values)
    return trial.number


def kept(store: WeightsStore, study: optuna.Study) -> set[int]:
    """The numbers of the trials whose weights load, checked to be their own."""
    numbers = set()
    for trial in study.get_trials(deepcopy=False):
        state = store.load(trial)
        if state is not None:
            assert state["weight"].item() == trial.number
            numbers.add(trial.number)
    return numbers


def front(study: optuna.Study) -> set[int]:
    return {t.number for t in study.best_trials}


@pytest.mark.parametrize("directions", [DIRECTIONS, ["minimize", "maximize"], ["minimize", "minimize"]])
def test_dominated_leaves_exactly_optunas_pareto_front(directions):
    study = optuna.create_study(directions=directions)
    rng = random.Random(0)
    for _ in range(60):  # values on a coarse grid: many ties and duplicates
        values = [rng.randint(0, 6) / 6, rng.randint(0, 6)]
        study.add_trial(optuna.trial.create_trial(params={}, distributions={}, values=values))
    trials = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    out = {t.number for t in dominated(trials, study.directions)}
    assert out and front(study) and out == {t.number for t in trials} - front(study)
    assert dominated([], study.directions) == []


def test_prune_deletes_the_weights_of_dominated_trials_only(tmp_path):
    study = optuna.create_study(directions=DIRECTIONS)
    store = WeightsStore(tmp_path / "weights")
    for values in ([0.80, 100.0], [0.70, 200.0], [0.90, 300.0], [0.80, 100.0], [0.85, 400.0]):
        finish_trial(study, store, values)
    study.add_trial(optuna.trial.create_trial(params={}, distributions={}, values=[0.95, 500.0]))  # no weights
    store.prune(study)
    assert kept(store, study) == {0, 2, 3} == front(study) - {5}  # equal values both stay on the front
    store.prune(study)  # again: nothing more to delete, nothing fails
    assert kept(store, study) == {0, 2, 3}


def test_prune_reads_the_trials_once_and_spares_a_trial_that_finished_after(tmp_path):
    """Another worker finishes a better trial right after this worker's prune read the trials: the prune must
    neither delete its weights (it is on the front) nor those of the trials it now dominates (not yet judged)."""
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(directions=DIRECTIONS, storage=storage, study_name="s")
    other = optuna.load_study(study_name="s", storage=storage)
    store, other_store = WeightsStore(tmp_path / "weights"), WeightsStore(tmp_path / "weights")
    for values in ([0.80, 100.0], [0.90, 200.0], [0.70, 300.0]):
        finish_trial(study, store, values)
    reads, read = [], storage.get_all_trials

    def read_then_other_worker_finishes(*args, **kwargs):
        trials = read(*args, **kwargs)
        reads.append(len(trials))
        if len(reads) == 1:
            storage.get_all_trials = read  # the other worker's own reads are not the prune's
            finish_trial(other, other_store, [0.95, 50.0])  # dominates all three
            storage.get_all_trials = read_then_other_worker_finishes
        return trials

    storage.get_all_trials = read_then_other_worker_finishes
    store.prune(study)
    storage.get_all_trials = read
    assert reads == [3]  # one read, before trial 3 finished
    assert kept(store, study) == {0, 1, 3}  # only trial 2 was dominated in that read
    store.prune(study)
    assert kept(store, study) == {3} == front(study)


def test_two_workers_pruning_at_once_never_lose_a_pareto_trials_weights(tmp_path):
    url = f"sqlite:///{tmp_path}/s.db"
    optuna.create_study(directions=DIRECTIONS, storage=url, study_name="s")
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
            study = optuna.load_study(study_name="s", storage=storage)
            store, rng = WeightsStore(tmp_path / "weights"), random.Random(seed)
            for step in range(15):  # later trials tend to be better: the front keeps changing
                finish_trial(study, store, [step + rng.random(), rng.random() * 1000])
                store.prune(study)
        except BaseException as error:  # noqa: BLE001 (re-raised in the test's thread)
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors and not any(thread.is_alive() for thread in threads), errors
    study = optuna.load_study(study_name="s", storage=url)
    assert len(study.trials) == 30
    assert front(study) <= kept(WeightsStore(tmp_path / "weights"), study)
    WeightsStore(tmp_path / "weights").prune(study)  # the last prunes may have read before the last trials
    assert kept(WeightsStore(tmp_path / "weights"), study) == front(study)

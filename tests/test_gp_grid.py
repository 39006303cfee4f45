"""The GP sampler's acquisition optimizer over the rank grid (``ranksearch.gp_grid``)."""

import numpy as np
import optuna

from ranksearch.search.gp_grid import GridGPSampler, on_grid
from ranksearch.search.samplers import make_sampler
from ranksearch.study.config import Config

GRID = optuna.distributions.FloatDistribution(1 / 32, 1.0, step=1 / 32)
NAMES = [f"rank_block{i}" for i in range(1, 6)]


def told(space: dict, count: int) -> list[optuna.trial.FrozenTrial]:
    """``count`` trials of a toy 2-objective problem (saturating accuracy, quadratic cost) drawn at random."""
    rng = np.random.default_rng(0)
    trials = []
    for _ in range(count):
        params = {name: dist.low + (dist.high - dist.low) * rng.integers(0, 32) / 31 for name, dist in space.items()}
        ranks = np.array(list(params.values()))
        accuracy = float(1 - np.exp(-3 * ranks).mean() + 0.01 * rng.standard_normal())
        trials.append(optuna.trial.create_trial(params=params, distributions=space,
                                                values=(accuracy, float(np.square(ranks).sum()))))  # fmt: skip
    return trials


class Compared(GridGPSampler):
    """Optimizes each acquisition function both ways and records the values reached."""

    found: list

    def _optimize_acqf(self, acqf, best_params):
        ours = super()._optimize_acqf(acqf, best_params)
        theirs = optuna.samplers.GPSampler._optimize_acqf(self, acqf, best_params)
        values = acqf.eval_acqf_no_grad(np.stack([ours, theirs]))
        self.found.append((on_grid(acqf), float(values[0]), float(values[1])))
        return ours


def test_the_grid_optimizer_reaches_optunas_acquisition_value_on_rank_grids():
    """On the ranks' grid the batched coordinate search runs (Optuna's private interface is there) and finds an
    acquisition value at least Optuna's own optimizer's, for every suggestion; what it suggests is on the grid."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = dict.fromkeys(NAMES, GRID)
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trials(told(space, 30))
    found = []
    for seed in range(3):
        sampler = Compared(seed=seed)
        sampler.found = found
        study.sampler = sampler
        trial = study.ask(space)
        assert all(abs(v * 32 - round(v * 32)) < 1e-9 for v in trial.params.values())
        study.tell(trial, (0.5, 1.0))
    assert len(found) == 3
    for used, ours, theirs in found:
        assert used and ours >= theirs - 1e-6 * max(1.0, abs(theirs))


def test_a_continuous_parameter_gets_optunas_own_optimizer():
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    space = {"rank_block1": GRID, "lr": optuna.distributions.FloatDistribution(1e-3, 1.0)}
    study = optuna.create_study(directions=["maximize", "minimize"])
    study.add_trials(told(space, 12))
    found = []
    sampler = Compared(seed=0)
    sampler.found = found
    study.sampler = sampler
    study.ask(space)
    assert [used for used, _, _ in found] == [False]


def test_the_gp_sampler_of_a_run_is_the_grid_one():
    seeded = make_sampler(Config(sampler="gp")).base  # inside the sampler that fits and redraws (budget.py)
    assert isinstance(seeded.base, GridGPSampler)
    seeded.before_trial(optuna.create_study(), optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING))
    assert isinstance(seeded.base, GridGPSampler)  # each trial's own, seeded by its number

"""How a study draws and prunes its trials: the sampler (``make_sampler``: GP, TPE, NSGA-II or random, seeded per
trial by ``TrialSeeded``), wrapped so that every draw is new and fitted (``BudgetSampler``), and budget mode's pruner
over the fine-tune's rungs (``make_pruner``).

Budget mode (``run --budget macs=0.1``; the text is parsed in ``ranksearch.objectives.budget``): every drawn rank
vector meets the budget, and spends it: the sampler's proposal is a direction (each module's share of the rank), and
the trial gets the largest multiple of it on the 1/32 grid, within [rank_min, rank_max], whose cost is at or under
the budget (``fit_to_budget``). MACs and params come from the exact cost table; latency is measured (once per
architecture) as the trials measure it. The candidates are the finitely many vectors where a module's rank steps
up, searched by bisection (cost never falls as the multiple grows), so a latency budget costs about
log2(32 x modules) measurements for a new direction.

Multi-fidelity (``pruner: halving`` or ``hyperband``): after each rung of a trial's fine-tune (``rungs``) its val
accuracy (all of val) is reported to Optuna at its step count, and the pruner decides whether it goes on:
successive halving keeps about the best 1/``reduction_factor`` of the trials at each rung, Hyperband runs brackets
of it that start pruning at different rungs. The trials that are not pruned end at the top rung, where the study's
best is chosen: the fidelity nearest the refine the delivered model gets (``ranksearch.deliver``).
"""

import hashlib
import json
import math
from collections.abc import Callable, Sequence

import numpy as np
import optuna

from ..models import RANK_STEPS
from ..objectives.budget import REDUCTION_FACTOR
from ..study.config import Config
from .gp_grid import GridGPSampler


def nsga2_population(trials: int) -> int:
    """NSGA-II's population for a run of ``trials``: a fifth of them (8..50), so that it breeds a few generations
    (at Optuna's 50, a 40-trial run never leaves its random first one)."""
    return min(50, max(8, trials // 5))


def make_sampler(
    config: Config, fit: Callable[[list[float]], list[float]] | None = None, space: dict | None = None
) -> optuna.samplers.BaseSampler:
    """The study's sampler (``config.sampler``), each trial drawn by one seeded from the config's seed and the
    trial's number (``TrialSeeded``); GP's acquisition function is maximized over the rank grid in batches
    (``gp_grid``: the same hypervolume in 0.64x Optuna's time at 200 trials). TPE's constant liar counts the other
    workers' running trials as bad, so that workers spread out rather than crowd one region. In budget mode
    (``fit``: a vector scaled to the budget; ``space``: the rank params), every draw is fitted to the budget, and
    otherwise brought within the rank spread; either way a vector another trial has (running, queued or finished)
    is redrawn (``BudgetSampler``)."""

    def base(seed: int) -> optuna.samplers.BaseSampler:
        if config.sampler == "nsga2":
            return optuna.samplers.NSGAIISampler(seed=seed, population_size=nsga2_population(config.trials))
        if config.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if config.sampler == "gp":
            return GridGPSampler(seed=seed)
        multivariate = config.sampler == "tpe-multivariate"
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, multivariate=multivariate)

    seeded = TrialSeeded(base, config.seed)
    return BudgetSampler(seeded, space or {}, fit or list, seed=config.seed)


class TrialSeeded(optuna.samplers.BaseSampler):
    """Draws trial ``n`` with a new sampler seeded by (seed, n). The storage numbers a study's trials one by one, so
    workers sharing a study (processes, machines, started together or not) never draw with one seed, and the same
    command on the same study draws the same ranks: a run repeated in a fresh folder repeats its study where its
    trials repeat (on the CPU). A sampler kept across trials, seeded once per process, could have both only with a
    per-run identity, and a random one (as before) gave up the second. Every sampler used here reads its history
    from the study, so a new one per trial loses only caches (GP's kernel fit starts afresh: no slower,
    BENCHMARKS.md)."""

    def __init__(self, make: Callable[[int], optuna.samplers.BaseSampler], seed: int):
        self.make, self.seed = make, seed
        self.base = make(sampler_seed(seed, -1))  # until a trial starts (Optuna asks before_trial first)

    def before_trial(self, study, trial):
        self.base = self.make(sampler_seed(self.seed, trial.number))
        self.base.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values):
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self):
        self.base.reseed_rng()


def sampler_seed(seed: int, trial_number: int) -> int:
    """A seed in 0..2**32-1 from sha256 (stable across processes and Python versions, unlike ``hash``)."""
    text = json.dumps([seed, trial_number])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def on_grid(value: float, low: float, high: float) -> float:
    """``value`` rounded down to the 1/32 grid, within [low, high]."""
    return min(high, max(low, math.floor(value * RANK_STEPS + 1e-9) / RANK_STEPS))


def scaled(shares: Sequence[float], factor: float, low: float, high: float) -> list[float]:
    return [on_grid(share * factor, low, high) for share in shares]


def step_factors(shares: Sequence[float], low: float, high: float) -> list[float]:
    """The multiples at which some module's rank steps up, in order (from all at ``low`` to all at ``high``)."""
    factors = {0.0}
    for share in shares:
        if share > 0:
            factors |= {k / RANK_STEPS / share for k in range(1, RANK_STEPS + 1) if low <= k / RANK_STEPS <= high}
    return sorted(factors)


def within_spread(ranks: Sequence[float], spread: float, low: float, high: float) -> list[float]:
    """``ranks`` with each raised to at least 1/``spread`` of the largest (rounded up to the grid), within [low,
    high]: no module starved while the others are high (``rank_spread``; ``RANK_STEPS`` or more: no limit)."""
    floor = math.ceil(max(ranks) / spread * RANK_STEPS - 1e-9) / RANK_STEPS
    return [min(high, max(rank, floor, low)) for rank in ranks]


def fit_to_budget(shares: Sequence[float], ratio_of: Callable[[list[float]], float], budget: float, low: float,
                  high: float, spread: float = RANK_STEPS) -> list[float] | None:  # fmt: skip
    """The largest multiple of ``shares`` on the grid (within [low, high], and within ``spread``: ``within_spread``)
    whose cost ratio ``ratio_of`` is at or under ``budget``; None when even every module at ``low`` is over it."""
    candidates = [within_spread(scaled(shares, factor, low, high), spread, low, high)
                  for factor in step_factors(shares, low, high)]  # fmt: skip
    if ratio_of(candidates[0]) > budget:
        return None
    lo, hi = 0, len(candidates) - 1  # candidates[lo] fits; find the last that does
    while lo < hi:
        middle = (lo + hi + 1) // 2
        if ratio_of(candidates[middle]) <= budget:
            lo = middle
        else:
            hi = middle - 1
    return candidates[lo]


TAKEN = (optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.WAITING, optuna.trial.TrialState.COMPLETE,
         optuna.trial.TrialState.PRUNED)  # a vector in one of these is being trained, queued or known


REDRAWS = 16  # random redraws of a vector another trial has, before the proposal is kept (a space nearly used up)

class BudgetSampler(optuna.samplers.BaseSampler):
    """A sampler whose every draw is fitted and new: ``base`` proposes a rank vector (its joint sample, or one
    value per module where it has none), ``fit`` scales it to the budget's boundary (``fit_to_budget``) or, without
    a budget, brings it within the rank spread (``within_spread``; or leaves it). A vector that another trial is
    training, is queued with, or has finished is redrawn at random (seeded by ``seed`` and the trial's number) and
    fitted again, so that workers asking at once never train one vector twice (GP, with no liar, proposed the same
    one to two workers) and no trial of the run's count is spent on a copy. The check reads the study when the
    draw ends: two draws ending within the same few milliseconds can still meet."""

    def __init__(self, base: optuna.samplers.BaseSampler, space: dict[str, optuna.distributions.FloatDistribution],
                 fit: Callable[[list[float]], list[float]], seed: int = 0):  # fmt: skip
        self.base, self.space, self.fit, self.seed = base, space, fit, seed

    def infer_relative_search_space(self, study, trial):
        return dict(self.space)

    def sample_relative(self, study, trial, search_space):
        if not search_space:
            return {}
        proposal = self.base.sample_relative(study, trial, search_space)
        for name, distribution in search_space.items():
            if name not in proposal:
                proposal[name] = self.base.sample_independent(study, trial, name, distribution)
        names = list(search_space)
        ranks = self.fit([proposal[name] for name in names])
        taken = taken_vectors(study, trial, names)
        rng = np.random.default_rng([self.seed, trial.number])
        for _ in range(REDRAWS):
            if grid_key(ranks) not in taken:
                break
            ranks = self.fit([random_on_grid(search_space[name], rng) for name in names])
        return dict(zip(names, ranks, strict=True))

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self):
        self.base.reseed_rng()


def grid_key(ranks: Sequence[float]) -> tuple[int, ...]:
    """A rank vector as its grid steps (k of k/32): equal vectors compare equal however their floats were made."""
    return tuple(round(r * RANK_STEPS) for r in ranks)


def taken_vectors(study: optuna.Study, trial: optuna.trial.FrozenTrial, names: list[str]) -> set[tuple[int, ...]]:
    """The rank vectors (``grid_key``) of the study's other trials that are running, queued or finished."""
    taken = set()
    for other in study.get_trials(deepcopy=False, states=TAKEN):
        params = other.params or other.system_attrs.get("fixed_params", {})
        if other.number != trial.number and all(name in params for name in names):
            taken.add(grid_key([params[name] for name in names]))
    return taken


def random_on_grid(distribution: optuna.distributions.FloatDistribution, rng: np.random.Generator) -> float:
    """A value drawn uniformly from ``distribution``'s grid (low, low + step, ..., high)."""
    count = round((distribution.high - distribution.low) / distribution.step) + 1
    return distribution.low + distribution.step * int(rng.integers(count))


class RungPruner(optuna.pruners.BasePruner):
    """Successive halving over the rungs (asynchronous, as ASHA): at the end of a rung but the last, a trial goes
    on when its value is among the best max(``keep``, n // ``factor``) of the n trials that reported there (itself
    included, running ones too); else it is pruned. So the first ``keep`` trials at each rung go on, and at least
    that many reach the top rung (the run keeps 2, or the delivery's candidates if more). Optuna's
    ``SuccessiveHalvingPruner`` let a trial go on early only when it beat every other there, and after a strong warm
    start it pruned 23 of 24 trials of a quality study at the first or second rung (BENCHMARKS.md, "The delivered
    model")."""

    def __init__(self, marks: list[int], factor: int = REDUCTION_FACTOR, keep: int = 2):
        self.marks, self.factor, self.keep = set(marks[:-1]), factor, keep

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step not in self.marks:
            return False
        value = trial.intermediate_values[step]
        if math.isnan(value):
            return True
        sign = 1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else -1
        others = [t.intermediate_values[step] for t in study.get_trials(deepcopy=False)
                  if t.number != trial.number and step in t.intermediate_values]  # fmt: skip
        allowed = max(self.keep, (len(others) + 1) // self.factor)
        return sum(sign * other > sign * value for other in others) >= allowed


def make_pruner(
    name: str, marks: list[int], factor: int = REDUCTION_FACTOR, keep: int = 2
) -> optuna.pruners.BasePruner:
    """The study's pruner over the rungs ending at step counts ``marks``: ``halving`` (``RungPruner``: successive
    halving that lets the first ``keep`` at each rung go on), ``hyperband`` (Optuna's), or ``none`` (every trial runs
    every rung)."""
    if name == "none" or len(marks) < 2:
        return optuna.pruners.NopPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=marks[0], max_resource=marks[-1], reduction_factor=factor)
    return RungPruner(marks, factor, keep)

"""Budget mode (``run --budget macs=0.1``): the best val accuracy with a cost at or under a fraction of the
baseline's, as a single-objective study, so that Optuna's pruners work.

Every drawn rank vector meets the budget, and spends it: the sampler's proposal is a direction (each module's share
of the rank), and the trial gets the largest multiple of it on the 1/32 grid, within [rank_min, rank_max], whose
cost is at or under the budget (``fit_to_budget``). MACs and params come from the exact cost table; latency is
measured (once per architecture) as the trials measure it. The candidates are the finitely many vectors where a
module's rank steps up, searched by bisection (cost never falls as the multiple grows), so a latency budget costs
about log2(32 x modules) measurements for a new direction.

Pruning (``pruner: halving``): the fine-tune reports val accuracy at 1/9 and 1/3 of its steps, and Optuna's
successive-halving pruner stops a trial whose accuracy there is below the best third of the trials that got as far
(multi-fidelity: the hopeless ones pay a third of the fine-tune or less). A checkpoint measures a fixed slice of
``CHECKPOINT_IMAGES`` val images spread over the split; the trial's value is still measured on all of val.
"""

import math
from collections.abc import Callable, Sequence

import optuna

from .errors import UserError
from .models import RANK_STEPS

PRUNE_FRACTIONS = (1 / 9, 1 / 3)  # the fine-tune's checkpoints (fractions of its steps) where a trial may be pruned
REDUCTION_FACTOR = 3  # successive halving keeps the best 1/3 at each checkpoint
CHECKPOINT_IMAGES = 1000  # val images a checkpoint measures (a slice over the whole split): a full val pass costs
# as much as 20 fine-tune steps on the quality config, which would eat what pruning saves


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


def fit_to_budget(shares: Sequence[float], ratio_of: Callable[[list[float]], float], budget: float, low: float,
                  high: float) -> list[float] | None:  # fmt: skip
    """The largest multiple of ``shares`` on the grid (within [low, high]) whose cost ratio ``ratio_of`` is at or
    under ``budget``; None when even every module at ``low`` is over it."""
    candidates = [scaled(shares, factor, low, high) for factor in step_factors(shares, low, high)]
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


def parse_budget(text: str) -> tuple[str, float]:
    """``macs=0.1`` as ("macs", 0.1): a cost and a fraction of the baseline's, in (0, 1]."""
    from .objectives import BUILT_IN

    name, sep, value = text.partition("=")
    try:
        ratio = float(value)
    except ValueError:
        ratio = math.nan
    if not sep or name.strip() not in BUILT_IN or not (0 < ratio <= 1):
        raise UserError(
            f"budget must be COST=FRACTION with COST one of {', '.join(BUILT_IN)} and FRACTION in (0, 1] of the "
            f"baseline's cost (e.g. --budget macs=0.1), got {text!r}"
        )
    return name.strip(), ratio


def canonical_budget(text: str) -> str:
    """The budget ``text`` in one spelling per value: ``macs=.3``, ``macs=0.30`` and `` macs=0.3`` as ``macs=0.3``
    (a study records it; resuming it compares budgets by value)."""
    cost, ratio = parse_budget(text)
    return f"{cost}={ratio!r}"


class BudgetSampler(optuna.samplers.BaseSampler):
    """A sampler whose every draw meets the budget: ``base`` proposes a rank vector (its joint sample, or one value
    per module where it has none), ``fit`` scales it to the budget's boundary (``fit_to_budget``)."""

    def __init__(self, base: optuna.samplers.BaseSampler, space: dict[str, optuna.distributions.FloatDistribution],
                 fit: Callable[[list[float]], list[float]]):  # fmt: skip
        self.base, self.space, self.fit = base, space, fit

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
        return dict(zip(names, self.fit([proposal[name] for name in names]), strict=True))

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study, trial):
        self.base.before_trial(study, trial)

    def after_trial(self, study, trial, state, values):
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self):
        self.base.reseed_rng()


def checkpoints(steps: int) -> list[int]:
    """The fine-tune steps after which a pruned trial reports val accuracy (distinct, within 1..steps - 1)."""
    return sorted({max(1, round(steps * f)) for f in PRUNE_FRACTIONS} - {steps}) if steps > 1 else []


def make_pruner(name: str, steps: int) -> optuna.pruners.BasePruner:
    """The study's pruner: ``halving`` (successive halving on the fine-tune's checkpoints) or ``none``."""
    marks = checkpoints(steps)
    if name == "none" or not marks:
        return optuna.pruners.NopPruner()
    return optuna.pruners.SuccessiveHalvingPruner(min_resource=marks[0], reduction_factor=REDUCTION_FACTOR)

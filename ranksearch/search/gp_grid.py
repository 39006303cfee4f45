"""Optuna's GP sampler with its acquisition function maximized the way a grid of ranks allows.

Every rank is a discrete parameter of 32 values (1/32 .. 1). Optuna's optimizer searches a discrete parameter of more
than 16 values by a Brent line search that evaluates the acquisition function at one point per call: about 1,500
calls of a millisecond each, most of them Python overhead, on the critical path of every trial (1-2 s a suggestion;
BENCHMARKS.md, "The GP sampler's time"); and it evaluates its 2,048 random starting points in one call, whose time
grows faster than the points (36x the time of 320 points at 6.4x the points, 400 trials). Here every evaluation is
batched in chunks of ``CHUNK`` points, and each coordinate step evaluates every value of that rank for every start
still moving, at once: the exhaustive search Optuna itself uses up to 16 values, calling it "faster and better than
the line search". The starts are Optuna's: the best of 2,048 random grid points, more picked by its roulette, and the
Pareto trials (``best_params``).

It relies on Optuna's private interface (the acquisition function's ``eval_acqf_no_grad`` and ``search_space``, the
sampler's ``_rng``; Optuna 5.x); where that differs, or the space holds a continuous parameter, Optuna's own
optimizer runs instead.
"""

import numpy as np
import optuna

PRELIMINARY_SAMPLES = 2048  # random grid points whose acquisition value picks the starts (Optuna's default)
STARTS = 10  # local searches (Optuna's default)
MAX_ROUNDS = 20  # sweeps over the coordinates; a start stops once a whole sweep leaves it where it was
CHUNK = 256  # points per evaluation of the acquisition function (larger calls cost more per point)


class GridGPSampler(optuna.samplers.GPSampler):
    """``optuna.samplers.GPSampler`` whose acquisition function is maximized by batched coordinate search over
    each discrete parameter's values (``maximize_on_grid``)."""

    def _optimize_acqf(self, acqf, best_params: np.ndarray | None) -> np.ndarray:
        rng = getattr(getattr(self, "_rng", None), "rng", None)
        if rng is None or not on_grid(acqf):
            return super()._optimize_acqf(acqf, best_params)
        return maximize_on_grid(acqf, best_params, rng)


def on_grid(acqf) -> bool:
    """Whether ``acqf`` has the interface ``maximize_on_grid`` uses and a space of discrete parameters only."""
    space = getattr(acqf, "search_space", None)
    needed = ("discrete_indices", "continuous_indices", "get_choices_of_discrete_params", "sample_normalized_params")
    if not hasattr(acqf, "eval_acqf_no_grad") or not all(hasattr(space, name) for name in needed):
        return False
    return len(space.continuous_indices) == 0


def maximize_on_grid(acqf, best_params: np.ndarray | None, rng: np.random.RandomState) -> np.ndarray:
    """The normalized parameters (one row's worth) of the highest acquisition value found: coordinate ascent from
    ``STARTS`` starts, each step trying every value of one parameter for every start in one batched evaluation."""
    space = acqf.search_space
    sampled = space.sample_normalized_params(PRELIMINARY_SAMPLES, rng=rng)
    values = evaluate(acqf, sampled)
    given = np.empty((0, sampled.shape[1])) if best_params is None else best_params
    points = np.vstack([sampled[starts(values, STARTS - len(given), rng)], given])
    scores = evaluate(acqf, points)
    coordinates = list(zip(space.discrete_indices, space.get_choices_of_discrete_params(), strict=True))
    moving = np.ones(len(points), dtype=bool)
    for _ in range(MAX_ROUNDS):
        moved = np.zeros(len(points), dtype=bool)
        for index, choices in coordinates:
            moved |= coordinate_step(acqf, points, scores, index, choices, moving)
        moving = moved
        if not moving.any():
            break
    return points[int(np.argmax(scores))]


def evaluate(acqf, points: np.ndarray) -> np.ndarray:
    """The acquisition function's values at ``points`` (rows of normalized parameters), ``CHUNK`` at a time."""
    return np.concatenate([np.asarray(acqf.eval_acqf_no_grad(points[start : start + CHUNK]), dtype=float)
                           for start in range(0, len(points), CHUNK)])  # fmt: skip


def starts(values: np.ndarray, count: int, rng: np.random.RandomState) -> np.ndarray:
    """Optuna's choice of starts among sampled points: the best, then up to ``count`` - 1 more drawn without
    replacement with probability proportional to exp(value - best)."""
    best = int(np.argmax(values))
    weights = np.exp(values - values[best])
    weights[best] = 0.0
    others = min(count - 1, int(np.count_nonzero(weights > 0)))
    if others <= 0:
        return np.array([best])
    drawn = rng.choice(len(values), size=others, replace=False, p=weights / weights.sum())
    return np.append(best, drawn)


def coordinate_step(acqf, points: np.ndarray, scores: np.ndarray, index: int, choices: np.ndarray,
                    moving: np.ndarray) -> np.ndarray:  # fmt: skip
    """Move each of the ``moving`` ``points`` (in place, with its ``scores``) to the best value of parameter
    ``index`` among ``choices`` when that raises its acquisition value; which points moved (a mask)."""
    rows = np.flatnonzero(moving)
    moved = np.zeros(len(points), dtype=bool)
    if rows.size == 0:
        return moved
    candidates = np.repeat(points[rows, None, :], len(choices), axis=1)  # (moving starts, choices, dim)
    candidates[:, :, index] = choices
    values = evaluate(acqf, candidates.reshape(-1, points.shape[1])).reshape(len(rows), len(choices))
    best = values.argmax(axis=1)
    found = values[np.arange(len(rows)), best]
    better = found > scores[rows]
    points[rows[better]] = candidates[np.arange(len(rows)), best][better]
    scores[rows[better]] = found[better]
    moved[rows[better]] = True
    return moved

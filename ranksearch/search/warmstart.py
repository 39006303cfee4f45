"""Warm starts: rank vectors the search tries before its sampler's own draws.

**VBMF ranks** (Tucker-2 studies: ``decomposition: tucker2``). For every rank-carrying k x k conv of a (pretrained)
model, EVBMF of its two channel-mode unfoldings (``vbmf.tucker2_vbmf_ranks``, as Kim et al. 2015) estimates
(R_in, R_out). This module maps them onto the search's grid of normalized ranks. A normalized rank r gives a conv
Cin -> Cout the Tucker-2 ranks R = max(1, round(r * Cout)), R_in = min(R, Cin), R_out = min(R, Cout)
(``decompose.tucker2_ranks``), so a conv's **grid rank** is the smallest r = k/32 whose R_in and R_out are both at
least the estimated ones: the estimate rounded up to the grid, never below 1/32, and 1 when even r = 1 gives fewer
(an estimated R_in above Cout). A 1x1 conv or linear layer (ranked when ``svd_layers`` is on) becomes a truncated
SVD with one rank R = max(1, round(r * min(Cin, Cout))) (``decompose.svd_rank``): EVBMF of its (Cout, Cin) matrix
estimates R (shown as R_in = R_out = R), and its grid rank is the smallest r whose R is at least that.

A module's rank is the **largest** of its layers' grid ranks, so that no layer gets fewer components than VBMF asks
for (the module's other layers get more: the cautious side, since the search explores below it anyway).

An estimate of 0 (VBMF found only noise) never reaches a layer: it counts as 1, and the layer's row says so.

**Uniform sweep.** Every module at k/32 for k in 2, 4, 8, 16.

**Sensitivity allocations.** The least-loss rank vector under the additive model for each of a ladder of budgets
(``ranksearch.search.sensitivity``), measured first when the study's points are missing.

In budget mode every vector is scaled to the budget's boundary (``samplers.fit_to_budget``).

Both are clipped into the config's [rank_min, rank_max] (the VBMF point) or skipped outside it (the sweep), and
``enqueue_warm_starts`` queues the vectors the study does not hold yet.
"""

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import optuna
import torch
from torch import nn

from ..decompose import svd_rank, tucker2_ranks
from ..decompose.vbmf import evbmf, tucker2_vbmf_ranks
from ..models import RANK_STEPS, is_pointwise, rank_modules, rank_step, rank_text
from ..study.attrs import param_name
from ..study.config import WARM_STARTS, Config

UNIFORM_STEPS = (2, 4, 8, 16)  # the uniform sweep: every module at k/32 for these k
VBMF_WEAKENING = 1.0  # the warm start's VBMF point: plain EVBMF


@dataclass(frozen=True)
class LayerEstimate:
    """One rank-carrying layer's VBMF estimate and the grid rank it implies."""

    name: str  # qualified name in the model (``features.block2.3``)
    module: str  # the search module holding it
    form: str  # what it is decomposed into: "tucker2" (a k x k conv) or "svd" (a 1x1 conv or linear layer)
    shape: tuple[int, ...]  # its weight's: (Cout, Cin, kh, kw), or (out, in) for a linear layer
    found: tuple[int, int]  # (R_in, R_out) as EVBMF found them (R, R for an SVD); 0 = nothing above the noise
    rank: float  # the smallest k/32 whose ranks cover ``found`` (a 0 counted as 1)

    @property
    def found_only_noise(self) -> bool:
        return 0 in self.found


@dataclass(frozen=True)
class VBMFRanks:
    """A model's VBMF estimates: one row per rank-carrying layer, and one rank per search module."""

    weakening: float
    layers: list[LayerEstimate]
    modules: dict[str, float]  # module -> the largest grid rank of its layers


def guard_zero(ranks: tuple[int, ...]) -> tuple[int, ...]:
    """Ranks with a 0 (only noise) raised to 1: a decomposed layer needs at least one component per mode."""
    return tuple(max(1, rank) for rank in ranks)


def smallest_grid_rank(needed: tuple[int, ...], ranks_at: Callable[[float], tuple[int, ...]]) -> float:
    """The smallest k/32 whose integer ranks (``ranks_at(k/32)``) are at least ``needed`` in every mode (a 0 counts
    as 1); 1.0 when none is. ``ranks_at`` grows with k, so the first k found is the smallest."""
    need = guard_zero(needed)
    for k in range(1, RANK_STEPS + 1):
        if all(got >= n for got, n in zip(ranks_at(k / RANK_STEPS), need, strict=True)):
            return k / RANK_STEPS
    return 1.0


def grid_rank(ranks: tuple[int, int], in_channels: int, out_channels: int) -> float:
    """A conv's grid rank: the smallest k/32 whose Tucker-2 ranks (``tucker2_ranks``) are at least ``ranks`` =
    (R_in, R_out) in both modes; 1.0 when none is (an R_in above ``out_channels``). A 0 counts as 1."""
    return smallest_grid_rank(ranks, lambda r: tucker2_ranks(r, in_channels, out_channels))


def svd_grid_rank(rank: int, in_features: int, out_features: int) -> float:
    """A 1x1 conv's or linear layer's grid rank: the smallest k/32 whose SVD rank (``svd_rank``) is at least
    ``rank`` (a 0 counts as 1)."""
    return smallest_grid_rank((rank,), lambda r: (svd_rank(r, in_features, out_features),))


def matrix_vbmf_rank(weight: torch.Tensor, weakening: float) -> int:
    """EVBMF rank of a 1x1 conv's or linear layer's (Cout, Cin) matrix, its noise variance scaled by ``weakening``."""
    matrix = weight.detach().flatten(1)
    plain = evbmf(matrix)
    return evbmf(matrix, plain.sigma2 * weakening).rank if plain.sigma2 > 0 else plain.rank  # 0: an all-zero matrix


def layer_estimate(name: str, module: str, layer: nn.Module, weakening: float) -> LayerEstimate:
    shape = tuple(layer.weight.shape)
    if is_pointwise(layer):  # an SVD: one rank
        rank = matrix_vbmf_rank(layer.weight, weakening)
        return LayerEstimate(name, module, "svd", shape, (rank, rank), svd_grid_rank(rank, shape[1], shape[0]))
    found = tucker2_vbmf_ranks(layer.weight, weakening)
    return LayerEstimate(name, module, "tucker2", shape, found, grid_rank(found, shape[1], shape[0]))


def vbmf_ranks(model: nn.Module, space: str = "module", weakening: float = VBMF_WEAKENING) -> VBMFRanks:
    """VBMF's ranks for every rank-carrying layer of ``model`` and, per module of ``space``, the largest of them.

    ``model`` must be undecomposed, its k x k convs meant for Tucker-2; ``weakening`` > 0 scales EVBMF's noise
    variance (1: plain EVBMF, below 1 keeps more components).
    """
    layers = [
        layer_estimate(name, module, layer, weakening)
        for module, pairs in rank_modules(model, space).items()
        for name, layer in pairs
    ]
    modules: dict[str, float] = {}
    for layer in layers:
        modules[layer.module] = max(modules.get(layer.module, 0.0), layer.rank)
    return VBMFRanks(weakening, layers, modules)


def clip_ranks(ranks: Iterable[float], low: float, high: float) -> list[float]:
    return [min(max(rank, low), high) for rank in ranks]


def uniform_ranks(count: int, low: float, high: float) -> list[list[float]]:
    """The uniform sweep for ``count`` modules: all at k/32 for each k of ``UNIFORM_STEPS`` within [low, high]."""
    values = [k / RANK_STEPS for k in UNIFORM_STEPS]
    return [[value] * count for value in values if low <= value <= high]


def warm_start_vectors(
    config: Config, model: nn.Module, allocations: Sequence[Sequence[float]] | None = None
) -> list[list[float]]:
    """The rank vectors (one value per module of ``config.search_space``) of ``config.warm_start``, in its order:
    ``vbmf`` is the VBMF point at weakening 1 clipped into [rank_min, rank_max], ``uniform`` the uniform sweep,
    ``sensitivity`` the ``allocations`` (``sensitivity.sensitivity_allocations``)."""
    vectors: list[list[float]] = []
    for kind in config.warm_start:
        if kind == "sensitivity":
            vectors.extend(list(ranks) for ranks in allocations or [])
            continue
        if kind == "vbmf":
            ranks = vbmf_ranks(model, config.search_space, VBMF_WEAKENING).modules.values()
            vectors.append(clip_ranks(ranks, config.rank_min, config.rank_max))
        elif kind == "uniform":
            count = len(rank_modules(model, config.search_space))
            vectors.extend(uniform_ranks(count, config.rank_min, config.rank_max))
        else:  # config.validate refuses these
            raise ValueError(f"unknown warm start {kind!r}; choose from {', '.join(WARM_STARTS)}")
    return vectors


def steps_key(ranks: Iterable[float]) -> tuple[int, ...]:
    """A rank vector as its grid steps (k of k/32), for comparing vectors exactly."""
    return tuple(rank_step(rank) for rank in ranks)


def param_names(modules: Sequence[str]) -> list[str]:
    return [param_name(module) for module in modules]


def study_vectors(study: optuna.Study, modules: Sequence[str]) -> set[tuple[int, ...]]:
    """The rank vectors (as grid steps) of the study's trials in any state: run, running, or queued (a queued
    trial's fixed params), as Optuna's ``enqueue_trial(skip_if_exists=True)`` reads them."""
    names = param_names(modules)
    vectors = set()
    for trial in study.get_trials(deepcopy=False):
        params = trial.system_attrs.get("fixed_params", trial.params)
        if set(params) == set(names):
            vectors.add(steps_key(params[name] for name in names))
    return vectors


def enqueue_warm_starts(
    study: optuna.Study, modules: Sequence[str], vectors: Sequence[Sequence[float]]
) -> tuple[list[list[float]], list[list[float]]]:
    """Queue each vector (in order) the study does not hold yet and that the list does not repeat.

    Returns (enqueued, skipped)."""
    names = param_names(modules)
    seen = study_vectors(study, modules)
    enqueued, skipped = [], []
    for ranks in vectors:
        key = steps_key(ranks)
        if key in seen:
            skipped.append(list(ranks))
            continue
        seen.add(key)
        study.enqueue_trial(dict(zip(names, ranks, strict=True)), skip_if_exists=True)
        enqueued.append(list(ranks))
    return enqueued, skipped


def ranks_argument(ranks: Iterable[float]) -> str:
    """``--ranks`` text for ``run``: ``8/32,8/32,4/32``."""
    return ",".join(rank_text(rank) for rank in ranks)


def _vectors_text(vectors: Sequence[Sequence[float]]) -> str:
    """``1/6/6/4/5, 2/2/2/2/2 /32`` (as the trial lines write ranks), or ``none``."""
    if not vectors:
        return "none"
    return ", ".join("/".join(map(str, steps_key(ranks))) for ranks in vectors) + f" /{RANK_STEPS}"


def warm_start_line(kinds: Sequence[str], enqueued: Sequence, skipped: Sequence, waiting: int, trials: int) -> str:
    """One console line: what the warm start queued, what it skipped as already in the study or repeated, and
    how many queued trials this run's ``trials`` leave for a later run."""
    line = (
        f"warm start ({','.join(kinds)}): enqueued {len(enqueued)}: {_vectors_text(enqueued)}; "
        f"skipped {len(skipped)} already in the study or repeated: {_vectors_text(skipped)}"
    )
    if waiting > trials:
        line += f"; {waiting - trials} queued trial(s) beyond --trials {trials} wait for a later run"
    return line


def queue_warm_starts(
    study: optuna.Study, config: Config, model: nn.Module, modules: Sequence[str],
    allocations: Sequence[Sequence[float]] | None = None, fit: Callable[[list[float]], list[float]] | None = None,
) -> None:  # fmt: skip
    """``run``'s warm start: queue ``config.warm_start``'s vectors the study lacks (after ``--ranks``), one line.
    ``allocations``: the sensitivity warm start's vectors; ``fit``: budget mode's (each vector scaled to the
    budget's boundary)."""
    if not config.warm_start:
        return
    vectors = warm_start_vectors(config, model, allocations)
    if fit is not None:  # vectors that fit to the same one are queued once
        fitted = [fit(list(ranks)) for ranks in vectors]
        moved = [(before, after) for before, after in zip(vectors, fitted, strict=True) if
                 steps_key(before) != steps_key(after)]  # fmt: skip
        if moved:  # say why a printed allocation is not what is queued
            pairs = ", ".join(f"{_vectors_text([before])} -> {_vectors_text([after])}" for before, after in moved)
            print(f"warm start: fitted to budget {config.budget} (or its rank spread), as every vector of the run "
                  f"is: {pairs}", flush=True)  # fmt: skip
        vectors = [ranks for i, ranks in enumerate(fitted) if ranks not in fitted[:i]]
    enqueued, skipped = enqueue_warm_starts(study, modules, vectors)
    waiting = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)))
    print(warm_start_line(config.warm_start, enqueued, skipped, waiting, config.trials), flush=True)

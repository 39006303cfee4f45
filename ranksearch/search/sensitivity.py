"""Sensitivity analysis: the val accuracy a model keeps with one module decomposed alone, at a ladder of ranks, and
the rank allocations those curves give for a ladder of budgets (``--warm-start sensitivity``).

A **point** (module, rank) is measured as a trial is (``trial.trial_model``): the baseline with only that module's
layers decomposed at that rank (the config's decomposition and method), BatchNorm re-estimated and fine-tuned by
the config's proxy, then its val accuracy. Points are the trials of a single-objective study of their own, in the
run's storage, named after everything a point depends on (``sensitivity_name``): a re-run, ``run --warm-start
sensitivity`` and another worker (``sensitivity --workers N``, or processes on other machines on one PostgreSQL
storage) find the points measured, take the queued ones, and run a crashed worker's point again as trials are: its
heartbeat stops, and 2 x ``heartbeat_seconds`` later any process fails it and measures it again. A point is
counted once: a process that queued a point another queued at the same instant measures its copy only when no
other copy was told or started first (``counted_elsewhere``). A process ends only when every point is measured or
failed, waiting for those another process holds; allocations come from a complete set of points only.

An **allocation** for a budget (a fraction of the baseline's MACs or params) is the rank vector, one ladder rank
per module, that loses the least val accuracy under the additive model (the sum of the modules' single drops)
with its cost within the budget: a multiple-choice knapsack, solved exactly by dynamic programming over the
modules (``allocate``). Costs come from the exact cost table
(``ranksearch.objectives.cost_table``).
"""

import dataclasses
import hashlib
import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch

from .. import __version__
from ..data.datasets import DeviceData
from ..inspect.notes import save_study_note
from ..models import RANK_STEPS, rank_modules, rank_text
from ..objectives.cost_table import TABLE_COSTS, CostTable, cost_table
from ..study.attrs import FAIL_REASON, INTERRUPTED, RETRY_OF
from ..study.config import Config, search_fields
from ..study.storage import check_storage_url, open_storage
from ..train.baseline import Baseline
from ..train.loops import evaluate
from ..utils.errors import UserError, shown_url
from ..utils.files import atomic_write, check_writable
from ..utils.interrupts import Signals
from ..utils.steps import clock_text
from .trial import trial_model, with_fail_reason
from .workers import Worker, new_run, optimize_share, run_workers

LADDER_STEPS = (1, 2, 3, 4, 6, 8, 12, 16, 24)  # the ranks k/32 each module is measured at (then rank_max)
BUDGETS = (0.5, 0.33, 0.2, 0.14, 0.1, 0.07)  # the warm start's budgets, as fractions of the baseline's cost
# Config fields a point does not depend on: what the main study optimises and how it samples.
NOT_MEASURED = ("objectives", "latency_batch", "sampler", "rank_min", "rank_max", "budget", "pruner", "rank_spread",
                "max_finetune_steps", "reduction_factor")
POINT_VERSION = 1  # raise it when what a point measures changes: earlier points are then measured again
COMPLETE = optuna.trial.TrialState.COMPLETE
RUNNING = optuna.trial.TrialState.RUNNING
WAITING = optuna.trial.TrialState.WAITING
FAIL = optuna.trial.TrialState.FAIL
DUPLICATE_OF = "duplicate_of"  # user attr of a point's copy not measured: the trial that counts for the point


def sensitivity_fields(config: Config) -> dict:
    return {k: v for k, v in search_fields(config).items() if k not in NOT_MEASURED}


def sensitivity_name(config: Config, baseline: Baseline) -> str:
    """The study holding the points of ``config`` on ``baseline``: the same for every study, sampler and
    objective on them, another for another baseline, proxy, decomposition, search space or ``POINT_VERSION``."""
    key = json.dumps([sensitivity_fields(config), baseline.path.name, POINT_VERSION], sort_keys=True)
    return f"{config.model.replace(':', '-')}-sensitivity-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def is_sensitivity_study(study: optuna.Study) -> bool:
    """Whether ``study`` holds sensitivity points (``open_sensitivity``'s): one objective, and a ranksearch config
    without the search's fields (``NOT_MEASURED``; a budget study, the search's one-objective kind, has them)."""
    config = study.user_attrs.get("config")
    return len(study.directions) == 1 and isinstance(config, dict) and "budget" not in config


def unchanged_at(table: CostTable, module: str, rank: float) -> bool:
    """True when no layer of ``module`` is decomposed at ``rank`` (its cost is its layers' own)."""
    index = table.modules.index(module)
    return table.steps["macs"][index][round(rank * RANK_STEPS) - 1] == table.original["macs"][index]


def ladder(config: Config, table: CostTable, module: str) -> list[float]:
    """The ranks ``module`` is measured at: ``LADDER_STEPS`` within [rank_min, rank_max], and rank_max, less those
    at which it stays as it is (they keep the baseline's accuracy)."""
    ranks = {k / RANK_STEPS for k in LADDER_STEPS if config.rank_min <= k / RANK_STEPS <= config.rank_max}
    return sorted(r for r in ranks | {config.rank_max} if not unchanged_at(table, module, r))


def wanted_points(config: Config, table: CostTable) -> list[tuple[str, float]]:
    return [(module, rank) for module in table.modules for rank in ladder(config, table, module)]


def point_of(trial: optuna.trial.FrozenTrial) -> tuple[str, float] | None:
    params = trial.system_attrs.get("fixed_params", trial.params)
    return (params["module"], float(params["rank"])) if {"module", "rank"} <= set(params) else None


def _is_queued(trial: optuna.Trial) -> bool:
    """Whether ``trial`` is a queued point (its module and rank fixed), not a draw of the sampler's."""
    frozen = next(t for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)
    return point_of(frozen) is not None


def point_seed(config: Config, module_index: int, rank: float) -> int:
    """A point's fine-tune seed: fixed by the point, whoever measures it and in what order."""
    return config.seed * 1_000_003 + 1000 * module_index + round(rank * RANK_STEPS)


@dataclass(frozen=True)
class Point:
    module: str
    rank: float
    accuracy: float  # val accuracy, the module alone decomposed at ``rank``
    ratios: dict  # cost name -> the model's cost as a ratio to the baseline's


class PointObjective:
    """Measure one point (the trial's ``module`` and ``rank``): decompose, tune, evaluate on val."""

    def __init__(self, config: Config, data: DeviceData, baseline: Baseline, bases, table: CostTable):
        self.config = dataclasses.replace(config, budget=None)  # a point is the fine-tune alone: no budget's rungs
        self.data, self.baseline, self.bases, self.table = data, baseline, bases, table
        modules = rank_modules(baseline.model, config.search_space)
        self.layers = {module: {name for name, _ in pairs} for module, pairs in modules.items()}

    def __call__(self, trial: optuna.Trial) -> float:
        return with_fail_reason(trial, self._measure)

    def _measure(self, trial: optuna.Trial) -> float:
        config, table = self.config, self.table
        if not _is_queued(trial):  # another process took the last queued point between this one's check and ask
            raise optuna.TrialPruned("no queued point left: another process took the last one")
        module = trial.suggest_categorical("module", table.modules)
        rank = trial.suggest_float("rank", 1 / RANK_STEPS, 1.0, step=1 / RANK_STEPS)
        trial.set_user_attr("ranks", f"{module} {rank_text(rank)}")
        other = counted_elsewhere(trial, (module, rank))
        if other is not None:
            trial.set_user_attr(DUPLICATE_OF, other.number)
            raise optuna.TrialPruned(f"trial {other.number} measures this point")
        seed = point_seed(config, table.modules.index(module), rank)
        model, seconds = trial_model(self.baseline.model, {module: rank}, config, self.data, seed, self.bases,
                                     only=self.layers[module])  # fmt: skip
        accuracy = evaluate(model, self.data, "val", config.eval_batch_size)
        for name in TABLE_COSTS:
            trial.set_user_attr(f"{name}_ratio", table.alone_ratio(name, module, rank))
        trial.set_user_attr("seed", seed)
        for key, value in seconds.items():
            trial.set_user_attr(key, value)
        return accuracy


POINTS_DATABASE = "sensitivity.db"  # beside the baselines: the points of every study on them


def points_storage_url(config: Config, name: str) -> str:
    """Where the points' study ``name`` is: in a storage the user named (``--storage``), which every study in it
    and every machine's workers share; with the default storage (a database per study), one database beside the
    baselines, so that every study on a baseline uses the points measured once (0.11.0 kept them in each study's
    own database, where they are still read)."""
    if config.storage is not None:
        return config.storage
    own = config.storage_url()
    path = Path(own.removeprefix("sqlite:///"))
    if path.is_file() and name in optuna.get_all_study_names(own):
        return own  # measured by 0.11.0 for this study
    return f"sqlite:///{Path(config.baseline_dir) / POINTS_DATABASE}"


POINTS_NOTE = ("Sensitivity points: the val accuracy of the baseline with one module decomposed at one rank, after "
               "the proxy fine-tune. Every study on this baseline and proxy reads them (run --warm-start sensitivity, "
               "ranksearch sensitivity); deleting this study makes the next of those measure them again.")


def open_sensitivity(config: Config, baseline: Baseline) -> optuna.Study:
    """The points' study (created when new) in ``points_storage_url``."""
    name = sensitivity_name(config, baseline)
    url = points_storage_url(config, name)
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    storage = open_storage(url, config.heartbeat_seconds)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize", load_if_exists=True)
    if "config" not in study.user_attrs:
        study.set_metric_names(["val_accuracy"])
        study.set_user_attr("config", sensitivity_fields(config))
        study.set_user_attr("ranksearch_version", __version__)
        study.set_user_attr("baseline", baseline.metrics())
        save_study_note(study, POINTS_NOTE)  # what a dashboard that lists it shows
    return study


def counted_elsewhere(trial: optuna.Trial, point: tuple[str, float]) -> optuna.trial.FrozenTrial | None:
    """Another trial of ``point`` that counts instead of ``trial``: a COMPLETE one, or a RUNNING one that started
    first (by start time, then number). Two processes that queued one point at the same instant each hold a copy;
    each copy is started (RUNNING) before this check, so of two copies started together one yields to the other."""
    started = trial.datetime_start
    for other in trial.study.get_trials(deepcopy=False, states=(COMPLETE, RUNNING)):
        if other.number != trial.number and point_of(other) == point:
            first = (other.datetime_start or started, other.number) < (started, trial.number)
            if other.state == COMPLETE or first:
                return other
    return None


def fail_dead_points(study: optuna.Study) -> None:
    """Fail the points whose worker stopped sending heartbeats 2 x ``heartbeat_seconds`` ago (killed, or its
    machine gone): the storage's retry queues each again with the same point (3 times at most)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def by_point(study: optuna.Study) -> dict[tuple[str, float], list[optuna.trial.FrozenTrial]]:
    """The study's trials of each point, in the order they were made."""
    found: dict[tuple[str, float], list[optuna.trial.FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False):
        point = point_of(trial)
        if point is not None:
            found.setdefault(point, []).append(trial)
    return found


def queue_missing(study: optuna.Study, config: Config, table: CostTable) -> int:
    """Queue every wanted point the study holds no trial of that is measured, running or queued: a new point, and
    one that failed, was interrupted or whose worker died (failed here first, when its heartbeat is old enough);
    returns how many points are queued now."""
    fail_dead_points(study)
    trials = by_point(study)
    live = (COMPLETE, RUNNING, WAITING)
    for module, rank in wanted_points(config, table):
        held = trials.get((module, rank), [])
        if not any(t.state in live for t in held):
            again = {RETRY_OF: held[-1].number} if held else None
            study.enqueue_trial({"module": module, "rank": rank}, user_attrs=again)
    return len(study.get_trials(deepcopy=False, states=(WAITING,)))


class PointProgress:
    """Optuna callback: one line per point measured."""

    def __init__(self, total: int, label: str = ""):
        self.total, self.label, self.done, self.start = total, label, 0, time.monotonic()

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.done += 1
        prefix = f"{self.label} " if self.label else ""
        if trial.state == COMPLETE:
            result = f"val {trial.value:.2%}  MACs {trial.user_attrs.get('macs_ratio', float('nan')):.3f}x"
        elif DUPLICATE_OF in trial.user_attrs:
            result = f"measured by trial {trial.user_attrs[DUPLICATE_OF]} (another process queued it too); skipped"
        else:
            result = f"{trial.state.name}: {trial.user_attrs.get('fail_reason', 'no reason recorded')}"
        elapsed = time.monotonic() - self.start
        eta = elapsed / self.done * max(self.total - self.done, 0)
        print(f"{prefix}sensitivity [{self.done}/{self.total}] {trial.user_attrs.get('ranks', '?')}  {result} | "
              f"elapsed {clock_text(elapsed)}, ETA {clock_text(eta)}", flush=True)  # fmt: skip


def _stop_when_queue_is_empty(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
    """Optuna callback: points are queued trials only (a sampled trial would be an arbitrary point)."""
    if not study.get_trials(deepcopy=False, states=(WAITING,)):
        study.stop()


def measure_points(study: optuna.Study, objective: PointObjective, worker: Worker, count: int, label: str = ""):
    """Measure up to ``count`` of the queued points in this process (fewer when other workers took the rest)."""
    if count > 0 and study.get_trials(deepcopy=False, states=(WAITING,)):
        callbacks = [PointProgress(count, label), _stop_when_queue_is_empty]
        optimize_share(study, objective, worker, count, callbacks=callbacks)


def curves(study: optuna.Study, modules: Sequence[str]) -> dict[str, list[Point]]:
    """The measured points by module (in the order of ``modules``), by rank (the first COMPLETE trial of each)."""
    found: dict[tuple[str, float], Point] = {}
    for trial in study.get_trials(deepcopy=False, states=(COMPLETE,)):
        point = point_of(trial)
        if point is not None and point not in found:
            ratios = {name: trial.user_attrs[f"{name}_ratio"] for name in TABLE_COSTS}
            found[point] = Point(point[0], point[1], trial.value, ratios)
    points = sorted(found.values(), key=lambda p: p.rank)
    by_module = {module: [p for p in points if p.module == module] for module in modules}
    return {module: points for module, points in by_module.items() if points}


def missing(config: Config, table: CostTable, measured: dict[str, list[Point]]) -> list[tuple[str, float]]:
    have = {(p.module, p.rank) for points in measured.values() for p in points}
    return [point for point in wanted_points(config, table) if point not in have]


def held_elsewhere(study: optuna.Study, config: Config, table: CostTable) -> list[tuple[str, float]]:
    """The wanted points not measured yet that a process is measuring (or was, until it died: its heartbeat is
    not old enough yet for the point to be failed)."""
    trials = by_point(study)
    return [point for point in wanted_points(config, table)
            if not any(t.state == COMPLETE for t in trials.get(point, []))
            and any(t.state == RUNNING for t in trials.get(point, []))]  # fmt: skip


def _pause(seconds: float) -> None:
    """Sleep ``seconds``; Ctrl-C or SIGTERM (taken as a flag once a measure ran here) ends it at once."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if Signals.pending:
            raise KeyboardInterrupt
        time.sleep(min(0.2, max(end - time.monotonic(), 0)))


def settle_points(study: optuna.Study, objective: "PointObjective", config: Config, table: CostTable,
                  run: Worker) -> None:  # fmt: skip
    """Measure here every queued point, then wait for the points another process holds: each is told there, or,
    when that process died, failed once its heartbeat is 2 x ``heartbeat_seconds`` old and measured here."""
    said: list[tuple[str, float]] = []
    while True:
        fail_dead_points(study)
        waiting = len(study.get_trials(deepcopy=False, states=(WAITING,)))
        if waiting:
            measure_points(study, objective, run, waiting)
            continue
        held = held_elsewhere(study, config, table)
        if not held:
            return
        if held != said:
            names = ", ".join(f"{m} {rank_text(r)}" for m, r in held[:4]) + (", ..." if len(held) > 4 else "")
            print(f"sensitivity: waiting for {len(held)} point(s) another process is measuring ({names}); a dead "
                  f"process's point is measured here once its heartbeat is {2 * config.heartbeat_seconds} s old",
                  flush=True)  # fmt: skip
            said = held
        _pause(min(config.heartbeat_seconds, 5))


def why_missing(trials: list[optuna.trial.FrozenTrial], heartbeat_seconds: int) -> str:
    """Why a point has no measure, from its latest trial."""
    if not trials:
        return "not measured"
    last = trials[-1]
    if any(t.state == RUNNING for t in trials):
        return "another process is measuring it"
    reason = last.user_attrs.get(FAIL_REASON)
    if last.state == FAIL and reason == INTERRUPTED:
        return "interrupted"
    if last.state == FAIL and reason:
        return f"failed: {reason}"
    if last.state == FAIL:
        return f"its worker died (no heartbeat for {2 * heartbeat_seconds} s)"
    return f"{last.state.name.lower()}, not measured"


def check_complete(study: optuna.Study, config: Config, table: CostTable, measured: dict[str, list[Point]]) -> None:
    """Refuse to go on from an incomplete set of points (allocations from it would differ): one line naming each
    missing point and why."""
    lost = missing(config, table, measured)
    if not lost:
        return
    trials = by_point(study)
    details = "; ".join(f"{m} {rank_text(r)}: {why_missing(trials.get((m, r), []), config.heartbeat_seconds)}"
                        for m, r in lost[:4]) + ("; ..." if len(lost) > 4 else "")  # fmt: skip
    raise UserError(f"{len(lost)} of {len(wanted_points(config, table))} sensitivity points are not measured "
                    f"({details}); no allocations from an incomplete set: run the command again to measure them "
                    f"(study {study.study_name!r})")  # fmt: skip


# ----- allocation ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Allocation:
    budget: float  # the cost ratio asked for
    ranks: list[float]  # one per module
    ratio: float  # its cost as a ratio to the baseline's (exact)
    predicted: float  # val accuracy under the additive model


def module_options(config: Config, table: CostTable, module: str, points: list[Point], base_accuracy: float,
                   cost: str) -> list[tuple[float, float, float]]:  # fmt: skip
    """(rank, drop, cost) for each rank ``module`` may take: its measured points in [rank_min, rank_max], and
    rank_max at no drop when it leaves the module as it is. A rank's drop is the largest at it or above (a curve
    made monotone from the top: a lower rank that measured better by noise is not trusted to be better)."""
    index = table.modules.index(module)
    row = table.steps[cost][index]
    options = []
    if unchanged_at(table, module, config.rank_max):
        options.append((config.rank_max, 0.0, table.original[cost][index]))
    worst = options[0][1] if options else -float("inf")
    for point in sorted(points, key=lambda p: -p.rank):
        if config.rank_min <= point.rank <= config.rank_max:
            worst = max(worst, base_accuracy - point.accuracy)
            options.append((point.rank, worst, row[round(point.rank * RANK_STEPS) - 1]))
    return options


def allocation_front(options: Sequence[list[tuple[float, float, float]]]) -> list[tuple[float, float, tuple]]:
    """Every (cost, drop, ranks) no other choice beats on both, one option per module: exact, by dynamic
    programming (the front after k modules extends only the front after k - 1)."""
    front: list[tuple[float, float, tuple]] = [(0.0, 0.0, ())]
    for choices in options:
        merged = sorted((c + oc, d + od, ranks + (r,)) for c, d, ranks in front for r, od, oc in choices)
        front, best = [], float("inf")
        for cost, drop, ranks in merged:  # by cost: keep a choice only when it drops less than every cheaper one
            if drop < best - 1e-12:
                front.append((cost, drop, ranks))
                best = drop
    return front


def allocate(
    config: Config, table: CostTable, measured: dict[str, list[Point]], base_accuracy: float, cost: str = "macs",
    budgets: Sequence[float] = BUDGETS,
) -> list[Allocation]:  # fmt: skip
    """The best allocation under the additive model within each of ``budgets`` (fractions of the baseline's
    ``cost``) that any allocation meets, in the order of ``budgets``."""
    if cost not in TABLE_COSTS:
        raise ValueError(f"allocations need an additive cost ({', '.join(TABLE_COSTS)}), not {cost!r}")
    options = [module_options(config, table, m, measured.get(m, []), base_accuracy, cost) for m in table.modules]
    if not all(options):
        return []
    front = allocation_front(options)
    found = []
    for budget in budgets:
        limit = budget * table.base[cost] - table.fixed[cost]
        fits = [(drop, c, ranks) for c, drop, ranks in front if c <= limit + 1e-6]
        if fits:
            drop, c, ranks = min(fits)
            found.append(Allocation(budget, list(ranks), (c + table.fixed[cost]) / table.base[cost],
                                    max(0.0, base_accuracy - drop)))  # fmt: skip
    return found


# ----- the console table and the plot -----------------------------------------------------------------------------


def table_text(measured: dict[str, list[Point]], base_accuracy: float, cost: str = "macs") -> str:
    """A row per module: val accuracy at each measured rank, and the model's cost ratio there."""
    ranks = sorted({p.rank for points in measured.values() for p in points})
    width = max([len(m) for m in measured] + [6])
    lines = [f"val accuracy with one module decomposed alone (baseline {base_accuracy:.2%}); "
             f"second row: the model's {cost} as a ratio to the baseline's",
             f"{'module':<{width}} " + " ".join(f"{rank_text(r):>7}" for r in ranks)]  # fmt: skip
    for module, points in measured.items():
        at = {p.rank: p for p in points}
        accuracies = (f"{at[r].accuracy:7.2%}" if r in at else f"{'':>7}" for r in ranks)
        costs = (f"{at[r].ratios[cost]:6.3f}x" if r in at else f"{'':>7}" for r in ranks)
        lines += [f"{module:<{width}} " + " ".join(accuracies), f"{'':<{width}} " + " ".join(costs)]
    return "\n".join(lines)


def allocations_text(allocations: Sequence[Allocation], cost: str = "macs") -> str:
    lines = [f"allocations (additive model, exact at these {cost}):"]
    for a in allocations:
        steps = "/".join(str(round(r * RANK_STEPS)) for r in a.ranks)
        predicted = f"predicted val {a.predicted:.2%}"
        lines.append(f"  <= {a.budget:.2f}x: {steps} /{RANK_STEPS}  {cost} {a.ratio:.3f}x  {predicted}")
    return "\n".join(lines)


def write_plots(measured: dict[str, list[Point]], base_accuracy: float, out_dir: Path, title: str) -> list[Path]:
    """sensitivity.png (matplotlib) and sensitivity.html (plotly): val accuracy against the MACs saved, a curve
    per module, each point labelled with its rank; and sensitivity.csv."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import plotly.graph_objects as go

    check_writable(out_dir, "--out")
    out_dir.mkdir(parents=True, exist_ok=True)
    figure = go.Figure()
    axes = plt.figure(figsize=(9, 5.5)).add_subplot()
    rows = ["module,rank,val_accuracy,macs_ratio,params_ratio"]
    for module, points in measured.items():
        saved = [100 * (1 - p.ratios["macs"]) for p in points]
        accuracy = [100 * p.accuracy for p in points]
        labels = [rank_text(p.rank) for p in points]
        figure.add_trace(go.Scatter(x=saved, y=accuracy, mode="lines+markers", name=module, text=labels,
                                    hovertemplate=f"{module} %{{text}}<br>MACs saved %{{x:.1f}} %<br>"
                                    "val %{y:.2f} %<extra></extra>"))  # fmt: skip
        axes.plot(saved, accuracy, marker="o", label=module)
        for x, y, label in zip(saved, accuracy, labels, strict=True):
            axes.annotate(label, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        rows += [f"{module},{rank_text(p.rank)},{p.accuracy:.6f},{p.ratios['macs']:.6f},{p.ratios['params']:.6f}"
                 for p in points]  # fmt: skip
    figure.add_hline(y=100 * base_accuracy, line_dash="dot", annotation_text="baseline")
    axes.axhline(100 * base_accuracy, linestyle=":", color="grey", label="baseline")
    figure.update_layout(title=title, xaxis_title="MACs saved (% of the baseline's), this module alone",
                         yaxis_title="val accuracy (%)", template="plotly_white")  # fmt: skip
    axes.set(title=title, xlabel="MACs saved (% of the baseline's), this module alone", ylabel="val accuracy (%)")
    axes.legend()
    axes.grid(alpha=0.3)
    paths = [out_dir / "sensitivity.png", out_dir / "sensitivity.html", out_dir / "sensitivity.csv"]
    atomic_write(paths[0], lambda partial: axes.figure.savefig(partial, format="png", dpi=120, bbox_inches="tight"))
    plt.close(axes.figure)
    atomic_write(paths[1], lambda partial: figure.write_html(partial, include_plotlyjs=True))
    atomic_write(paths[2], lambda partial: partial.write_text("\n".join(rows) + "\n"))
    return paths


def allocation_cost(config: Config) -> str:
    """The additive cost allocations meet: the budget's or the study's first cost when it is one (MACs, params),
    else MACs (latency adds up no more than accuracy drops do)."""
    wanted = config.budget_cost() if config.budget else config.objectives[1]
    return wanted if wanted in TABLE_COSTS else "macs"


# ----- measuring: in this process, or by workers -----------------------------------------------------------------


def sensitivity_argv(argv: list[str]) -> list[str]:
    """The command line of ``sensitivity`` workers started from ``run``'s or ``sensitivity``'s own."""
    return ["sensitivity", *argv[1:]] if argv and argv[0] == "run" else list(argv)


def ensure_points(config: Config, data: DeviceData, baseline: Baseline, bases, table: CostTable,
                  argv: list[str] | None = None, worker: Worker | None = None) -> optuna.Study:  # fmt: skip
    """The points' study with every wanted point measured (or failed): by this process, or by ``config.workers``
    processes started with ``argv``, and the points other processes hold waited for. A ``worker`` (started so)
    measures its share of the queued points."""
    study = open_sensitivity(config, baseline)
    objective = PointObjective(config, data, baseline, bases, table)
    if worker is not None:
        measure_points(study, objective, worker, config.trials, label=f"w{worker.index}")
        return study
    queued = queue_missing(study, config, table)
    if queued:
        print(f"sensitivity: measuring {queued} of {len(wanted_points(config, table))} points (study "
              f"{study.study_name!r} in {shown_url(points_storage_url(config, study.study_name))})",
              flush=True)  # fmt: skip
    if config.workers > 1 and queued > 1 and argv:
        gpus = torch.cuda.device_count() if data.device.type == "cuda" else 0
        waiting = lambda: len(study.get_trials(deepcopy=False, states=(WAITING,)))  # noqa: E731
        run_workers(sensitivity_argv(argv), new_run(queued), config.workers, gpus, waiting,
                    grace_seconds=2 * config.heartbeat_seconds + 1, threads=config.threads)  # fmt: skip
    settle_points(study, objective, config, table, new_run(queued))
    return study


def budgets_of(config: Config) -> list[float]:
    """The budgets allocations are made for: the budget's own in budget mode, else ``BUDGETS``."""
    return [config.budget_ratio()] if config.budget is not None else list(BUDGETS)


def report_allocations(config: Config, baseline: Baseline, table: CostTable, study: optuna.Study) -> list[Allocation]:
    """Print the curves as a table and the allocations they give; return the allocations."""
    measured = curves(study, table.modules)
    cost = allocation_cost(config)
    print(table_text(measured, baseline.val_accuracy, cost), flush=True)
    check_complete(study, config, table, measured)
    allocations = allocate(config, table, measured, baseline.val_accuracy, cost, budgets_of(config))
    print(allocations_text(allocations, cost), flush=True)
    return allocations


def sensitivity_allocations(config: Config, data: DeviceData, baseline: Baseline, bases, table: CostTable,
                            argv: list[str] | None) -> list[list[float]]:  # fmt: skip
    """``--warm-start sensitivity``'s vectors: the points measured when missing, then the allocations."""
    study = ensure_points(config, data, baseline, bases, table, argv)
    return [a.ranks for a in report_allocations(config, baseline, table, study)]


def run_sensitivity(config: Config, out: Path, argv: list[str] | None = None, worker: Worker | None = None) -> None:
    """``ranksearch sensitivity``: measure the missing points, print the table and allocations, write the plots."""
    from ..data.datasets import device_data
    from ..train.baseline import check_baseline_source, check_baseline_worth, ensure_baseline
    from ..utils.device import resolve_device
    from .trial import trial_bases

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if worker is not None and worker.threads:
        torch.set_num_threads(worker.threads)
    check_baseline_source(config)  # a --weights file that does not fit, or no pretraining: before anything else
    if worker is None:
        check_storage_url(config.storage_url())  # before any pretraining: an in-memory or query-string SQLite URL
        check_writable(out, "--out")
    data = device_data(config, resolve_device(config.device))
    baseline = ensure_baseline(config, data, quiet=worker is not None)  # the parent said it once
    check_baseline_worth(config, baseline)
    table = cost_table(baseline.model, config.search_space, config.decomposition, data.spec.input_size())
    study = ensure_points(config, data, baseline, trial_bases(config, baseline, data), table, argv, worker)
    if worker is not None:
        return
    report_allocations(config, baseline, table, study)
    title = f"{config.model} sensitivity ({config.decomposition}, {config.finetune_steps} fine-tune steps)"
    paths = write_plots(curves(study, table.modules), baseline.val_accuracy, out, title)
    print(
        f"study {study.study_name!r} in {shown_url(points_storage_url(config, study.study_name))}; wrote "
        + ", ".join(map(str, paths)),
        flush=True,
    )

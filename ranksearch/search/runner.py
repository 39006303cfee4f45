"""A run's search: prepare the data and the baseline, open or join the study, queue its first ranks and warm starts,
and run this process's share of its trials (``trial``: one trial; ``ranksearch.run``: the whole ``run`` command)."""

import copy
from collections.abc import Callable
from pathlib import Path

import optuna
import torch

from ..data.datasets import DeviceData, device_data
from ..decompose import decompose
from ..inspect.notes import TrialNotes, export_command
from ..inspect.progress import LongRunNote, TrialProgress, trial_ranks_text
from ..models import RANK_STEPS, rank_modules, set_ranks
from ..objectives.cost_table import TABLE_COSTS, CostTable
from ..objectives.latency import LatencyMeter, latency_device
from ..objectives.registry import COSTS, costs_text, study_objectives
from ..study.attrs import param_name
from ..study.config import Config
from ..study.storage import (
    check_compatible,
    check_data,
    check_latency_device,
    claim_study,
    create_or_load,
    find_study,
    record_setup,
)
from ..study.weights import WeightsStore
from ..train.baseline import Baseline, check_baseline_source, check_baseline_worth, ensure_baseline, new_model
from ..utils.device import resolve_device, use_deterministic_kernels
from ..utils.errors import UserError, first_line
from ..utils.files import check_writable
from .samplers import fit_to_budget, make_pruner, make_sampler, within_spread
from .sensitivity import sensitivity_allocations
from .trial import Objective, trial_bases
from .warmstart import queue_warm_starts, ranks_argument
from .workers import Worker, done_in_run, optimize_share, requeue_interrupted, worker_threads


def check_enqueued(modules: list[str], rank_vectors: list[list[float]], source: str) -> None:
    """Each enqueued vector has a rank per module; ``source`` (``--ranks`` or the config key) names them in errors."""
    for ranks in rank_vectors:
        if len(ranks) != len(modules):
            raise UserError(f"{source} needs {len(modules)} values per rank vector (one per module: "
                            f"{', '.join(modules)}), got {len(ranks)}")  # fmt: skip


def budget_summary(study: optuna.Study, config: Config, modules: list[str]) -> str:
    """The closing lines of a budget run: the best trial within the budget, and how many trials were pruned."""
    trials = study.get_trials(deepcopy=False)
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    head = f"budget {config.budget}: {len(complete)} complete and {pruned} pruned of {len(trials)} trials"
    if not complete:
        return head
    best = study.best_trial
    costs = study_objectives(study)[1:]
    ranks = trial_ranks_text(best.params, modules)
    return (f"{head}\n  best: trial {best.number}  ranks {ranks}  val {best.value:7.2%}  "
            f"{costs_text(best, costs, absolute=True)}")  # fmt: skip


def pareto_summary(study: optuna.Study, modules: list[str]) -> str:
    costs = study_objectives(study)[1:]
    front = sorted(study.best_trials, key=lambda t: t.values[1:])
    labels = " and ".join(COSTS[name].label for name in costs)
    finished = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    lines = [f"Pareto front: {len(front)} of {len(finished)} complete trials (val accuracy vs {labels})"]
    for t in front:
        lines.append(
            f"  trial {t.number:>4}  ranks {trial_ranks_text(t.params, modules)}  val {t.values[0]:7.2%}  "
            f"{costs_text(t, costs, absolute=True)}"
        )
    return "\n".join(lines)


def budget_ratio_of(config: Config, baseline: Baseline, table: CostTable, meter: LatencyMeter | None,
                    study: optuna.Study | None) -> Callable[[list[float]], float]:  # fmt: skip
    """A rank vector's cost as a ratio to the baseline's, for the budget's cost: from the cost table (MACs,
    params), or measured by the trials' latency ``meter`` on the vector's architecture (random weights: latency
    does not depend on them), or read from ``study``'s trials that measured it."""
    cost = config.budget_cost()
    if cost in TABLE_COSTS:
        return lambda ranks: table.ratio(cost, ranks)

    known: dict[tuple[float, ...], float] = {}  # a fit revisits vectors: build each architecture once

    def latency_ratio(ranks: list[float]) -> float:
        if tuple(ranks) not in known:
            model = set_ranks(copy.deepcopy(baseline.model), ranks, space=config.search_space)
            shaped = decompose(model, inplace=True, factorize=False, decomposition=config.decomposition)
            milliseconds, _ = meter.latency(shaped, study)
            known[tuple(ranks)] = milliseconds / meter.baseline_ms
        return known[tuple(ranks)]

    return latency_ratio


def spread_fit(config: Config) -> Callable[[list[float]], list[float]]:
    """A drawn vector -> the same within the config's rank spread (``samplers.within_spread``)."""
    return lambda ranks: within_spread(ranks, config.rank_spread, config.rank_min, config.rank_max)


def budget_fit(config: Config, ratio_of: Callable[[list[float]], float]) -> Callable[[list[float]], list[float]]:
    """Rank shares -> the vector on the budget's boundary, within the rank spread (``fit_to_budget``); a UserError
    when none meets it."""

    def fit(shares: list[float]) -> list[float]:
        ranks = fit_to_budget(shares, ratio_of, config.budget_ratio(), config.rank_min, config.rank_max,
                              config.rank_spread)  # fmt: skip
        if ranks is None:
            check_reachable(config, ratio_of, len(shares))
        return ranks

    return fit


def check_reachable(config: Config, ratio_of: Callable[[list[float]], float], modules: int) -> None:
    """A UserError when the budget is below the cheapest model's cost (every module at rank_min)."""
    cheapest = ratio_of([config.rank_min] * modules)
    if cheapest > config.budget_ratio():
        raise UserError(f"budget {config.budget} is below the cheapest model's {config.budget_cost()} "
                        f"({cheapest:.3f}x, every module at rank_min); raise it")  # fmt: skip


def rank_space(config: Config, modules: list[str]) -> dict[str, optuna.distributions.FloatDistribution]:
    """The rank params and their distributions, as ``trial.suggest_ranks`` draws them."""
    grid = optuna.distributions.FloatDistribution(config.rank_min, config.rank_max, step=1 / RANK_STEPS)
    return {param_name(module): grid for module in modules}


def check_budget(config: Config, baseline: Baseline, table: CostTable, modules: list[str]) -> None:
    """Before the study is written: the budget can be met, and every ``--ranks`` vector meets it (MACs and params;
    a latency budget is checked by ``check_latency_budget`` once the trials' meter exists)."""
    if config.budget is None or config.budget_cost() not in TABLE_COSTS:
        return
    fit = budget_fit(config, budget_ratio_of(config, baseline, table, None, None))
    fit([config.rank_max] * len(modules))
    for ranks in config.enqueue_ranks:
        ratio = table.ratio(config.budget_cost(), ranks)
        if ratio > config.budget_ratio() + 1e-12:
            raise UserError(f"{config.ranks_source} vector {ranks_argument(ranks)} costs {ratio:.3f}x "
                            f"{config.budget_cost()}, over the budget {config.budget}")  # fmt: skip


def check_latency_budget(config: Config, data: DeviceData, baseline: Baseline, modules: list[str],
                         objective: Objective | None, study: optuna.Study | None) -> None:  # fmt: skip
    """Before the study is written: a latency budget is above the cheapest model's latency, timed as the trials time
    it (by the trials' meter, whose fits then reuse the measure; a parent of workers times with a meter of its own).
    On a small model the factor convs' overhead can keep every decomposed model above a tight budget."""
    if config.budget is None or config.budget_cost() != "latency":
        return
    meter = objective.latency if objective is not None else None
    meter = meter or LatencyMeter(config.latency_batch, config.decomposition, data.device, baseline.model,
                                 data.spec.shape())
    check_reachable(config, budget_ratio_of(config, baseline, None, meter, study), len(modules))


def latency_where(config: Config, device: torch.device, worker: Worker | None) -> dict | None:
    """Where this run's trials measure latency (None when it is no objective): the device, the CPU, the torch
    threads of the process that measures (a worker's share of the cores in a multi-worker run), the batch."""
    if "latency" not in config.objectives:
        return None
    workers = config.workers > 1 and worker is None
    threads = worker_threads(config.workers, config.threads) if workers else torch.get_num_threads()
    return latency_device(device, threads) | {"batch": config.latency_batch}


def prepare_run(config: Config, worker: Worker | None = None) -> tuple[optuna.Study | None, DeviceData, Baseline]:
    """Everything a run needs before its study may be written: the study it resumes (checked, not created),
    the data (checked against that study), the baseline (cached or pretrained). A failure here writes no study."""
    check_baseline_source(config)  # a --weights file that does not fit, or no pretraining: before anything else
    modules = list(rank_modules(new_model(config), config.search_space))
    check_enqueued(modules, config.enqueue_ranks, config.ranks_source)
    device = resolve_device(config.device)
    existing = find_study(config)
    check_latency_device(existing, latency_where(config, device, worker))
    check_writable(config.weights_path(), "weights folder")
    data = device_data(config, device)
    check_data(existing, data.identity)
    baseline = ensure_baseline(config, data, quiet=worker is not None)  # the parent said it once
    check_baseline_worth(config, baseline)  # before the study is written
    return existing, data, baseline


def join_study(config: Config, existing: optuna.Study | None, data: DeviceData, baseline: Baseline) -> optuna.Study:
    """The run's study, created when new, claimed for this run's setup (``claim_study``: another run started at the
    same instant with another config or heartbeat is refused here, before either asks for a trial), with what its
    trials are measured with recorded. The caller releases the claim when the run ends (``release_claim``)."""
    if config.storage is None:
        Path("studies").mkdir(exist_ok=True)
    study = existing or create_or_load(config)
    check_compatible(study, config)  # another process may have made it, or measured in it, since find_study
    claim_study(study, config)
    record_setup(
        study, config, data=data.identity, baseline=baseline.metrics(),
        weights_dir=str(Path(config.weights_path()).resolve()), baseline_path=str(baseline.path.resolve()),
        data_dir=str(Path(config.data_dir).resolve()),
        weights_file=None if config.weights is None else str(Path(config.weights).resolve()),
    )  # fmt: skip
    return study


def enqueue_first(study: optuna.Study, config: Config, modules: list[str]) -> None:
    """Trials to run before the sampler's own: interrupted ones again, then the ``--ranks`` vectors."""
    requeued = requeue_interrupted(study)
    if requeued:
        print(f"re-running interrupted trial(s) {', '.join(map(str, requeued))} with their ranks", flush=True)
    for ranks in config.enqueue_ranks:
        study.enqueue_trial({param_name(m): r for m, r in zip(modules, ranks, strict=True)}, skip_if_exists=True)


def warm_starts(study: optuna.Study, config: Config, data: DeviceData, baseline: Baseline, table: CostTable,
                modules: list[str], argv: list[str] | None) -> None:  # fmt: skip
    """Queue the config's warm starts: the sensitivity allocations (their points measured first when missing, by
    ``config.workers`` processes) among them; in budget mode each vector fitted to the budget."""
    if not config.warm_start:
        return
    if config.budget is not None and config.budget_cost() not in TABLE_COSTS:
        print(f"warm start ({','.join(config.warm_start)}) skipped: a latency budget is met by measuring, which the "
              "trials do; the sampler draws every vector", flush=True)  # fmt: skip
        return
    allocations = None
    if "sensitivity" in config.warm_start:
        bases = trial_bases(config, baseline, data)
        allocations = sensitivity_allocations(config, data, baseline, bases, table, argv)
    fit = None
    if config.budget is not None:
        fit = budget_fit(config, budget_ratio_of(config, baseline, table, None, None))
    queue_warm_starts(study, config, baseline.model, modules, allocations, fit)


def trial_objective(config: Config, data: DeviceData, baseline: Baseline) -> Objective:
    """What this process's trials run, made before the study is written: it times the baseline's latency (when an
    objective) and measures its registered costs, so that a failure or a Ctrl-C there leaves no study behind."""
    use_deterministic_kernels(data.device, config.deterministic)
    weights = WeightsStore(config.weights_path())
    try:
        return Objective(config, data, baseline, weights, trial_bases(config, baseline, data))
    except RuntimeError as error:  # e.g. out of memory at a large latency_batch
        if "latency" not in config.objectives:
            raise
        raise UserError(f"cannot time the baseline's latency at latency_batch {config.latency_batch} "
                        f"({first_line(error)}); lower --latency-batch") from None  # fmt: skip


def run_trials(
    config: Config,
    study: optuna.Study,
    data: DeviceData,
    baseline: Baseline,
    worker: Worker,
    modules: list[str],
    table: CostTable,
    objective: Objective,
    label: str = "",
) -> None:
    """This process's share of the run: ``config.trials`` trials of ``objective``, one line each (``label``: the
    worker's name)."""
    weights = objective.weights
    if config.budget is None:
        fit = None if config.rank_spread >= RANK_STEPS else spread_fit(config)
        study.sampler = make_sampler(config, fit, rank_space(config, modules))
    else:
        fit = budget_fit(config, budget_ratio_of(config, baseline, table, objective.latency, study))
        study.sampler = make_sampler(config, fit, rank_space(config, modules))
        keep = max(2, config.deliver_top)  # at least two reach the top rung, where the best is chosen
        study.pruner = make_pruner(config.pruner, config.rung_steps(), config.reduction_factor, keep)
    if objective.latency is not None and "baseline_latency_ms" not in study.user_attrs:
        study.set_user_attr("baseline_latency_ms", objective.latency.baseline_ms)  # the first worker's measure
    for metric in objective.registered:  # a registered cost's baseline value, for reports
        study.set_user_attr(metric.baseline_attr, objective.registered_baseline[metric.name])
    progress = TrialProgress(worker.total, modules, config.objectives[1:], label=label,
                             count=lambda trials: len(done_in_run(trials, worker.run_id)),
                             budget=config.budget)  # fmt: skip
    keep = config.deliver_top if config.budget is not None else 1  # a budget run delivers from its best few
    prune = lambda study, _: weights.prune(study, keep_best=keep)  # noqa: E731
    notes = TrialNotes(modules, list(COSTS), export_command(config.study_name, config.storage))  # optuna-dashboard's
    callbacks = [progress, prune, notes]
    if data.device.type == "cpu" and config.workers == 1:  # a long CPU run says how long after its first trial
        callbacks.append(LongRunNote(worker.total))
    optimize_share(study, objective, worker, config.trials, callbacks=callbacks)

"""The ``run`` command's pipeline, end to end: the data and the baseline, the study, its trials (by this process or
by workers), the Pareto front or the budget's best, and the delivered model (``ranksearch.deliver``)."""

import contextlib
import warnings

import optuna
import torch

from .data.datasets import device_data
from .deliver.delivery import PENDING, check_delivery, deliver, finishing_line, pending, targets
from .inspect.notes import save_study_note, study_note
from .models import rank_modules
from .objectives.cost_table import cost_table
from .search.runner import (
    budget_summary,
    check_budget,
    check_latency_budget,
    enqueue_first,
    join_study,
    latency_where,
    pareto_summary,
    prepare_run,
    run_trials,
    trial_objective,
    warm_starts,
)
from .search.workers import Worker, done_in_run, new_run, run_workers
from .study.config import Config, search_fields
from .study.storage import release_claim
from .utils.device import resolve_device


def run_search(
    config: Config, argv: list[str] | None = None, worker: Worker | None = None
) -> tuple[optuna.Study, list[optuna.trial.FrozenTrial]]:
    """The main job: baseline (pretrained if needed), then ``config.trials`` more trials in the study, by this
    process or, with ``config.workers`` > 1, by that many worker processes started with ``argv``.

    ``worker``: set in a worker started by a multi-worker run. Returns the study and the trials the run ran.
    However it ends, the run leaves the study's claim (``release_claim``): a study it left with no trials may then
    be re-configured.
    """
    with contextlib.ExitStack() as on_exit:
        return _run_search(config, argv, worker, on_exit)


def _run_search(
    config: Config, argv: list[str] | None, worker: Worker | None, on_exit: contextlib.ExitStack
) -> tuple[optuna.Study, list[optuna.trial.FrozenTrial]]:
    """``run_search``'s work; leaving the study's claim is left to ``on_exit``."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by the progress lines instead
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if worker is not None and worker.threads:
        torch.set_num_threads(worker.threads)
    existing, data, baseline = prepare_run(config, worker)
    modules = list(rank_modules(baseline.model, config.search_space))
    # every rank vector's costs, once per process:
    table = cost_table(baseline.model, config.search_space, config.decomposition, data.spec.input_size())
    check_budget(config, baseline, table, modules)  # before the study is written
    runs_trials = not (config.workers > 1 and worker is None)  # a parent of workers runs none itself
    objective = trial_objective(config, data, baseline) if runs_trials else None  # before the study is written too
    if worker is None:  # its parent checked them
        check_latency_budget(config, data, baseline, modules, objective, existing)
        check_delivery(config)  # its files can be written: checked before any trial
    study = join_study(config, existing, data, baseline)
    on_exit.callback(release_claim, study)
    if worker is None and pending(study) is not None:  # a run stopped during its delivery
        if targets(config):  # finish it, and nothing else
            print(finishing_line(config), flush=True)
            deliver(study, config, data, baseline.model, config.weights_path(), pending(study)["run_id"])
            return study, []
        study.set_user_attr(PENDING, None)  # --deliver none: the trials it asks for instead
    run = worker or new_run(config.trials)
    gpus = torch.cuda.device_count() if data.device.type == "cuda" else 0
    where = latency_where(config, data.device, worker)
    if where is not None and not study.trials:
        study.set_user_attr("latency_device", where)
    if worker is None:  # the parent (or the only process) writes the study's dashboard note, once per run
        save_study_note(study, study_note(search_fields(config), baseline.metrics(), data.identity, config.objectives))
        enqueue_first(study, config, modules)
        warm_starts(study, config, data, baseline, table, modules, argv)
    if config.workers > 1 and worker is None:
        del data  # the workers load their own (a delivery loads it again)
        owed = lambda: run.total - len(done_in_run(study.get_trials(deepcopy=False), run.run_id))  # noqa: E731
        run_workers(argv or [], run, config.workers, gpus, owed, grace_seconds=2 * config.heartbeat_seconds + 1,
                    threads=config.threads)  # fmt: skip
    else:
        label = f"w{run.index}" if worker else ""
        run_trials(config, study, data, baseline, run, modules, table, objective, label=label)
    if worker is None:
        summary = budget_summary(study, config, modules) if config.budget else pareto_summary(study, modules)
        print(summary, flush=True)
        from .inspect.dashboard import save_pareto_plot  # optuna-dashboard's imports: at the end, not at every start

        save_pareto_plot(study)  # the study page's plot of val % against cost ratios, in optuna-dashboard
        if targets(config):
            data = device_data(config, resolve_device(config.device)) if config.workers > 1 else data
            deliver(study, config, data, baseline.model, config.weights_path(), run.run_id)
    ran = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("run_id") == run.run_id]
    return study, ran

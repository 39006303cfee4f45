"""The main job: prepare data and baseline, open the study, and run trials in it (see ``trial`` for one trial)."""

import hashlib
import json
import warnings
from pathlib import Path

import optuna
import torch

from .baseline import Baseline, ensure_baseline, new_model
from .config import Config
from .data import DeviceData, device_data
from .errors import UserError
from .files import check_writable
from .latency import latency_device
from .models import rank_modules
from .objectives import COSTS, costs_text, study_objectives
from .progress import TrialProgress, ranks_text
from .study import check_data, check_latency_device, create_or_load, find_study, record_setup
from .train import resolve_device, use_deterministic_kernels
from .trial import Objective, param_name, trial_bases
from .warmstart import queue_warm_starts
from .weights import WeightsStore
from .workers import (
    Worker,
    done_in_run,
    forward_sigterm,
    new_run,
    optimize_share,
    requeue_interrupted,
    run_workers,
    worker_threads,
)


def make_sampler(config: Config, worker: str, trials_so_far: int) -> optuna.samplers.BaseSampler:
    """The sampler of one worker (``worker``: its identity, e.g. ``run_id/index``) joining a study that holds
    ``trials_so_far`` trials: workers of one study draw different ranks, a resumed study fresh ones, and the same
    worker at the same point the same ones. TPE's constant liar counts the other workers' running trials as bad,
    so that workers spread out rather than crowd one region."""
    seed = sampler_seed(config.seed, worker, trials_so_far)
    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if config.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, constant_liar=True)


def sampler_seed(seed: int, worker: str, trials_so_far: int) -> int:
    """A seed in 0..2**32-1 from sha256 (stable across processes and Python versions, unlike ``hash``)."""
    text = json.dumps([seed, worker, trials_so_far])  # one text per (seed, worker, trials), whatever the worker
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


def check_enqueued(modules: list[str], rank_vectors: list[list[float]]) -> None:
    for ranks in rank_vectors:
        if len(ranks) != len(modules):
            raise UserError(f"--ranks needs {len(modules)} values (one per module: {', '.join(modules)})")


def pareto_summary(study: optuna.Study, modules: list[str]) -> str:
    costs = study_objectives(study)[1:]
    front = sorted(study.best_trials, key=lambda t: t.values[1:])
    labels = " and ".join(COSTS[name].label for name in costs)
    lines = [f"Pareto front: {len(front)} of {len(study.trials)} trials (val accuracy vs {labels})"]
    for t in front:
        lines.append(
            f"  trial {t.number:>4}  ranks {ranks_text(t.params, modules)}  val {t.values[0]:7.2%}  "
            f"{costs_text(t, costs, absolute=True)}"
        )
    return "\n".join(lines)


def latency_where(config: Config, device: torch.device, worker: Worker | None) -> dict | None:
    """Where this run's trials measure latency (None when it is no objective): the device, the CPU, the torch
    threads of the process that measures (a worker's share of the cores in a multi-worker run), the batch."""
    if "latency" not in config.objectives:
        return None
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    workers = config.workers > 1 and worker is None
    threads = worker_threads(config.workers, gpus) if workers else torch.get_num_threads()
    return latency_device(device, threads) | {"batch": config.latency_batch}


def prepare_run(config: Config, worker: Worker | None = None) -> tuple[optuna.Study | None, DeviceData, Baseline]:
    """Everything a run needs before its study may be written: the study it resumes (checked, not created),
    the data (checked against that study), the baseline (cached or pretrained). A failure here writes no study."""
    modules = list(rank_modules(new_model(config), config.search_space))
    check_enqueued(modules, config.enqueue_ranks)
    device = resolve_device(config.device)
    existing = find_study(config)
    check_latency_device(existing, latency_where(config, device, worker))
    check_writable(config.weights_path(), "weights_dir")
    data = device_data(config, device)
    check_data(existing, data.identity)
    return existing, data, ensure_baseline(config, data)


def join_study(config: Config, existing: optuna.Study | None, data: DeviceData, baseline: Baseline) -> optuna.Study:
    """The run's study, created when new, with what its trials are measured with recorded."""
    if config.storage is None:
        Path("studies").mkdir(exist_ok=True)
    study = existing or create_or_load(config)
    record_setup(
        study, config, data=data.identity, baseline=baseline.metrics(),
        weights_dir=str(Path(config.weights_path()).resolve()), baseline_path=str(baseline.path.resolve()),
        data_dir=str(Path(config.data_dir).resolve()),
    )  # fmt: skip
    return study


def enqueue_first(study: optuna.Study, config: Config, modules: list[str]) -> None:
    """Trials to run before the sampler's own: interrupted ones again, then the ``--ranks`` vectors."""
    requeued = requeue_interrupted(study)
    if requeued:
        print(f"re-running interrupted trial(s) {', '.join(map(str, requeued))} with their ranks", flush=True)
    for ranks in config.enqueue_ranks:
        study.enqueue_trial({param_name(m): r for m, r in zip(modules, ranks, strict=True)}, skip_if_exists=True)


def run_trials(
    config: Config,
    study: optuna.Study,
    data: DeviceData,
    baseline: Baseline,
    worker: Worker,
    modules: list[str],
    label: str = "",
) -> None:
    """This process's share of the run: ``config.trials`` trials, one line each (``label``: the worker's name)."""
    use_deterministic_kernels(data.device)
    weights = WeightsStore(config.weights_path())
    study.sampler = make_sampler(config, worker.name, len(study.trials))
    objective = Objective(config, data, baseline, weights, trial_bases(config, baseline, data))
    if objective.latency is not None and "baseline_latency_ms" not in study.user_attrs:
        study.set_user_attr("baseline_latency_ms", objective.latency.baseline_ms)  # the first worker's measure
    progress = TrialProgress(worker.total, modules, config.objectives[1:], label=label,
                             count=lambda trials: len(done_in_run(trials, worker.run_id)))  # fmt: skip
    prune = lambda study, _: weights.prune(study)  # noqa: E731
    optimize_share(study, objective, worker, config.trials, callbacks=[progress, prune])


def run_search(
    config: Config, argv: list[str] | None = None, worker: Worker | None = None
) -> tuple[optuna.Study, list[optuna.trial.FrozenTrial]]:
    """The main job: baseline (pretrained if needed), then ``config.trials`` more trials in the study, by this
    process or, with ``config.workers`` > 1, by that many worker processes started with ``argv``.

    ``worker``: set in a worker started by a multi-worker run. Returns the study and the trials the run ran.
    """
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by the progress lines instead
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if worker is not None and worker.threads:
        torch.set_num_threads(worker.threads)
    existing, data, baseline = prepare_run(config, worker)
    study = join_study(config, existing, data, baseline)
    run = worker or new_run(config.trials)
    modules = list(rank_modules(baseline.model, config.search_space))
    gpus = torch.cuda.device_count() if data.device.type == "cuda" else 0
    where = latency_where(config, data.device, worker)
    if where is not None and not study.trials:
        study.set_user_attr("latency_device", where)
    if worker is None:
        enqueue_first(study, config, modules)
        queue_warm_starts(study, config, baseline.model, modules)
    if config.workers > 1 and worker is None:
        del data  # the workers load their own
        forward_sigterm()
        owed = lambda: run.total - len(done_in_run(study.get_trials(deepcopy=False), run.run_id))  # noqa: E731
        run_workers(argv or [], run, config.workers, gpus, owed, grace_seconds=2 * config.heartbeat_seconds + 1)
    else:
        run_trials(config, study, data, baseline, run, modules, label=f"w{run.index}" if worker else "")
    if worker is None:
        print(pareto_summary(study, modules), flush=True)
    ran = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("run_id") == run.run_id]
    return study, ran

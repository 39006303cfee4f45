"""The main job: prepare data and baseline, open the study, and run trials in it (see ``trial`` for one trial)."""

import warnings
from pathlib import Path

import optuna

from .baseline import Baseline, ensure_baseline, new_model
from .config import Config
from .data import DeviceData, device_data
from .errors import UserError
from .files import check_writable
from .models import rank_modules
from .progress import TrialProgress, ranks_text
from .study import check_data, create_or_load, find_study, record_setup
from .train import resolve_device, use_deterministic_kernels
from .trial import Objective, param_name, trial_bases
from .weights import WeightsStore


def make_sampler(config: Config, seed: int) -> optuna.samplers.BaseSampler:
    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def check_enqueued(modules: list[str], rank_vectors: list[list[float]]) -> None:
    for ranks in rank_vectors:
        if len(ranks) != len(modules):
            raise UserError(f"--ranks needs {len(modules)} values (one per module: {', '.join(modules)})")


def pareto_summary(study: optuna.Study, modules: list[str]) -> str:
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    lines = [f"Pareto front: {len(front)} of {len(study.trials)} trials (val accuracy vs MACs)"]
    for t in front:
        lines.append(
            f"  trial {t.number:>4}  ranks {ranks_text(t.params, modules)}  val {t.values[0]:7.2%}  "
            f"MACs {t.user_attrs['macs_ratio']:.3f}x ({int(t.values[1]):,})"
        )
    return "\n".join(lines)


def prepare_run(config: Config) -> tuple[optuna.Study | None, DeviceData, Baseline]:
    """Everything a run needs before its study may be written: the study it resumes (checked, not created),
    the data (checked against that study), the baseline (cached or pretrained). A failure here writes no study."""
    modules = list(rank_modules(new_model(config)))
    check_enqueued(modules, config.enqueue_ranks)
    device = resolve_device(config.device)
    existing = find_study(config)
    check_writable(config.weights_path(), "weights_dir")
    data = device_data(config, device)
    check_data(existing, data.identity)
    return existing, data, ensure_baseline(config, data)


def run_search(config: Config) -> tuple[optuna.Study, list[optuna.trial.FrozenTrial]]:
    """The main job: baseline (pretrained if needed), then ``config.trials`` more trials in the study.

    Returns the study and the trials this call ran (enqueued ones included).
    """
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by the progress lines instead
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    existing, data, baseline = prepare_run(config)
    use_deterministic_kernels(data.device)
    if config.storage is None:
        Path("studies").mkdir(exist_ok=True)
    study = existing or create_or_load(config)
    weights = WeightsStore(config.weights_path())
    record_setup(
        study, config, data=data.identity, baseline=baseline.metrics(), weights_dir=str(weights.directory),
        baseline_path=str(baseline.path.resolve()), data_dir=str(Path(config.data_dir).resolve()),
    )  # fmt: skip
    study.sampler = make_sampler(config, (config.seed + len(study.trials)) % 2**32)  # fresh draws when resuming
    modules = list(rank_modules(baseline.model))
    for ranks in config.enqueue_ranks:
        study.enqueue_trial({param_name(m): r for m, r in zip(modules, ranks, strict=True)}, skip_if_exists=True)
    finished: list[int] = []
    objective = Objective(config, data, baseline, weights, trial_bases(config, baseline))
    study.optimize(
        objective, n_trials=config.trials, catch=(Exception,),
        callbacks=[
            lambda _, trial: finished.append(trial.number),
            TrialProgress(config.trials, modules, baseline.macs),
            lambda study, _: weights.prune(study),
        ],
    )  # fmt: skip
    print(pareto_summary(study, modules), flush=True)
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    return study, [by_number[n] for n in finished]

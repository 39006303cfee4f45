"""The multi-objective Optuna search: one trial = one normalized rank per module -> (val accuracy, MACs)."""

import copy
import time
from pathlib import Path

import optuna
import torch
from torch import nn

from . import __version__
from .baseline import Baseline, baseline_path, cached_bases, ensure_baseline, new_model
from .config import Config, search_fields
from .data import DeviceData, device_data
from .decompose import Bases, decompose, should_decompose
from .errors import UserError
from .measure import count_macs
from .models import RANK_STEPS, rank_modules, set_ranks
from .train import evaluate, finetune, prepare, resolve_device, synchronize
from .weights import WeightsStore

DIRECTIONS = ["maximize", "minimize"]  # (validation accuracy, MACs)
_DIRECTIONS = [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]


def param_name(module: str) -> str:
    return f"rank_{module}"


def suggest_ranks(trial: optuna.Trial, modules: list[str], config: Config) -> dict[str, float]:
    """One normalized rank per module on the 1/32 grid, within [rank_min, rank_max]."""
    step = 1 / RANK_STEPS
    return {m: trial.suggest_float(param_name(m), config.rank_min, config.rank_max, step=step) for m in modules}


def conv_ranks(model: nn.Module) -> tuple[dict[str, int], list[str]]:
    """Integer Tucker-2 rank R of every conv (from its buffer), and the convs kept undecomposed."""
    ranks, kept = {}, []
    for layers in rank_modules(model).values():
        for name, layer in layers:
            rank = float(layer.rank)
            ranks[name] = max(1, round(rank * layer.out_channels))
            if isinstance(layer, nn.Conv2d) and not should_decompose(layer, rank):
                kept.append(name)
    return ranks, kept


def trial_seed(config: Config, number: int) -> int:
    """The seed of trial ``number``'s fine-tune: export re-runs a trial from it."""
    return config.seed * 1_000_003 + number


def _timed(fn, device: torch.device):
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def decomposed_model(
    baseline: nn.Module, ranks: dict[str, float], config: Config, device: torch.device,
    bases: dict[str, Bases] | None = None,
) -> nn.Module:  # fmt: skip
    """A copy of the baseline decomposed at ``ranks`` by the config's method, on ``device`` (not fine-tuned)."""
    model = set_ranks(copy.deepcopy(baseline), ranks)
    method, refine_iters = config.decompose_method, config.refine_iters
    return prepare(decompose(model, inplace=True, method=method, bases=bases, refine_iters=refine_iters), device)


def trial_model(
    baseline: nn.Module, ranks: dict[str, float], config: Config, data: DeviceData, seed: int,
    bases: dict[str, Bases] | None = None,
) -> tuple[nn.Module, dict[str, float]]:  # fmt: skip
    """A trial's model: the baseline decomposed at ``ranks`` and fine-tuned; also the seconds of each part.

    ``bases``: the baseline's cached channel bases (for the hosvd methods; computed when absent).
    """
    torch.manual_seed(seed)
    baseline.eval()  # the teacher, when distilling; the copy below is set to train mode by the fine-tune
    model, decompose_s = _timed(lambda: decomposed_model(baseline, ranks, config, data.device, bases), data.device)
    teacher = baseline if config.distill_weight > 0 else None
    _, finetune_s = _timed(lambda: finetune(model, data, config, seed, teacher), data.device)
    return model, {"decompose_s": decompose_s, "finetune_s": finetune_s}


class Objective:
    """Decompose the baseline at the trial's ranks, fine-tune, and measure (val accuracy, MACs)."""

    def __init__(
        self, config: Config, data: DeviceData, baseline: Baseline, weights: WeightsStore | None = None,
        bases: dict[str, Bases] | None = None,
    ):  # fmt: skip
        self.config, self.data, self.baseline, self.weights, self.bases = config, data, baseline, weights, bases
        self.modules = list(rank_modules(baseline.model))

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        try:
            return self._measure(trial)
        except Exception as error:
            trial.set_user_attr("fail_reason", f"{type(error).__name__}: {error}")
            raise

    def _measure(self, trial: optuna.Trial) -> tuple[float, float]:
        config, base, device = self.config, self.baseline, self.data.device
        ranks = suggest_ranks(trial, self.modules, config)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # peak_gpu_mib is this trial's peak
        seed = trial_seed(config, trial.number)
        model, seconds = trial_model(base.model, ranks, config, self.data, seed, self.bases)
        integer_ranks, kept = conv_ranks(model)
        accuracy, eval_s = _timed(lambda: evaluate(model, self.data, "val", config.eval_batch_size), device)
        (macs, params), count_s = _timed(lambda: count_macs(model), device)
        attrs = {
            "val_accuracy": accuracy,
            "macs": macs,
            "params": params,
            "macs_ratio": macs / base.macs,
            "params_ratio": params / base.params,
            "conv_ranks": integer_ranks,
            "kept_convs": kept,
            "seed": seed,
            **seconds,
            "eval_s": eval_s,
            "count_s": count_s,
        }
        if device.type == "cuda":
            attrs["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        if self.weights is not None:
            self.weights.save(trial, model)
        return accuracy, float(macs)


def trial_bases(config: Config, baseline: Baseline) -> dict[str, Bases] | None:
    """The baseline's channel bases when the method truncates them (cached on disk beside the baseline)."""
    if config.decompose_method == "hooi":
        return None
    return cached_bases(baseline.model, baseline_path(config))


def make_sampler(config: Config, seed: int) -> optuna.samplers.BaseSampler:
    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def _default_storage_dir(config: Config) -> None:
    if config.storage is None:
        Path("studies").mkdir(exist_ok=True)


def _storage(url: str) -> optuna.storages.BaseStorage:
    try:
        return optuna.storages.get_storage(url)
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot open storage {url!r} ({first_line}); pass an Optuna storage URL such as "
            "sqlite:///studies/NAME.db to --storage"
        ) from None


def load_existing_study(storage_url: str, study_name: str) -> optuna.Study:
    """A study that must already exist (for export, report, dashboard); a clear error otherwise."""
    if storage_url.startswith("sqlite:///") and not Path(storage_url.removeprefix("sqlite:///")).is_file():
        raise UserError(f"no study database {storage_url.removeprefix('sqlite:///')}; check --study-name / --storage")
    storage = _storage(storage_url)
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False))
    if study_name not in names:
        known = ", ".join(names) if names else "none"
        raise UserError(f"no study {study_name!r} in {storage_url} (studies there: {known}); check --study-name")
    return optuna.load_study(study_name=study_name, storage=storage)


def _check_compatible(study: optuna.Study, config: Config) -> None:
    """Refuse to add trials to a study made with other directions or another config."""
    if study.directions != _DIRECTIONS:
        raise UserError(
            f"study {study.study_name!r} exists with directions "
            f"{[d.name.lower() for d in study.directions]}, not {DIRECTIONS}; use another --study-name"
        )
    stored = study.user_attrs.get("config")
    wanted = search_fields(config)
    if stored is not None and stored != wanted:
        changed = sorted(k for k in set(stored) | set(wanted) if stored.get(k) != wanted.get(k))
        details = ", ".join(f"{k}: {stored.get(k)!r} -> {wanted.get(k)!r}" for k in changed[:4])
        raise UserError(
            f"study {config.study_name!r} was made with another config ({details}); "
            "use another --study-name or the study's config"
        )


def open_study(config: Config) -> optuna.Study:
    """Create the study, or load it to resume after checking it matches ``config``. Writes nothing else."""
    _default_storage_dir(config)
    storage = _storage(config.storage_url())
    names = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    if config.study_name in names:
        study = optuna.load_study(study_name=config.study_name, storage=storage)
        _check_compatible(study, config)
    else:
        study = optuna.create_study(storage=storage, study_name=config.study_name, directions=DIRECTIONS)
    study.sampler = make_sampler(config, config.seed + len(study.trials))  # fresh draws when resuming
    study.set_user_attr("config", search_fields(config))
    study.set_user_attr("ranksearch_version", __version__)
    return study


def check_enqueued(modules: list[str], rank_vectors: list[list[float]]) -> None:
    for ranks in rank_vectors:
        if len(ranks) != len(modules):
            raise UserError(f"--ranks needs {len(modules)} values (one per module: {', '.join(modules)})")


def _ranks_text(params: dict, modules: list[str]) -> str:
    return "/".join(str(round(params[param_name(m)] * RANK_STEPS)) for m in modules) + f" /{RANK_STEPS}"


def _seconds(trial: optuna.trial.FrozenTrial) -> float:
    if trial.datetime_complete and trial.datetime_start:
        return (trial.datetime_complete - trial.datetime_start).total_seconds()
    return 0.0


def report_trial(modules: list[str]):
    """Optuna callback: one console line per finished trial."""

    def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        head = f"trial {trial.number:>4}  ranks {_ranks_text(trial.params, modules)}"
        if trial.state == optuna.trial.TrialState.COMPLETE:
            attrs = trial.user_attrs
            print(
                f"{head}  val {trial.values[0]:7.2%}  MACs {attrs['macs_ratio']:.3f}x  {_seconds(trial):6.1f} s",
                flush=True,
            )
        else:
            print(f"{head}  {trial.state.name}: {trial.user_attrs.get('fail_reason', '')}", flush=True)

    return callback


def pareto_summary(study: optuna.Study, modules: list[str]) -> str:
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    lines = [f"Pareto front: {len(front)} of {len(study.trials)} trials (val accuracy vs MACs)"]
    for t in front:
        lines.append(
            f"  trial {t.number:>4}  ranks {_ranks_text(t.params, modules)}  val {t.values[0]:7.2%}  "
            f"MACs {t.user_attrs['macs_ratio']:.3f}x ({int(t.values[1]):,})"
        )
    return "\n".join(lines)


def run_search(config: Config) -> tuple[optuna.Study, list[optuna.trial.FrozenTrial]]:
    """The main job: baseline (pretrained if needed), then ``config.trials`` more trials in the study.

    Returns the study and the trials this call added.
    """
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # failures are reported by report_trial instead
    modules = list(rank_modules(new_model(config)))
    check_enqueued(modules, config.enqueue_ranks)
    device = resolve_device(config.device)
    study = open_study(config)
    data = device_data(config, device)
    baseline = ensure_baseline(config, data)
    weights = WeightsStore(config.weights_path())
    study.set_user_attr("baseline", baseline.metrics())
    study.set_user_attr("weights_dir", str(weights.directory))
    study.set_user_attr("baseline_path", str(baseline_path(config).resolve()))
    study.set_user_attr("data_dir", str(Path(config.data_dir).resolve()))
    for ranks in config.enqueue_ranks:
        study.enqueue_trial({param_name(m): r for m, r in zip(modules, ranks, strict=True)}, skip_if_exists=True)
    before = len(study.trials)
    objective = Objective(config, data, baseline, weights, trial_bases(config, baseline))
    study.optimize(
        objective, n_trials=config.trials, catch=(Exception,),
        callbacks=[report_trial(modules), lambda study, _: weights.prune(study)],
    )  # fmt: skip
    print(pareto_summary(study, modules), flush=True)
    return study, study.trials[before:]

"""The multi-objective Optuna search: one trial = one normalized rank per module -> (val accuracy, MACs)."""

import copy
import time
import warnings
from pathlib import Path

import optuna
import torch
from torch import nn

from .baseline import Baseline, cached_bases, ensure_baseline, new_model
from .config import Config
from .data import DeviceData, device_data
from .decompose import Bases, decompose, should_decompose
from .errors import UserError
from .files import check_writable
from .measure import count_macs
from .models import RANK_STEPS, rank_modules, set_ranks
from .progress import TrialProgress, ranks_text
from .study import check_data, create_or_load, find_study, record_setup
from .train import evaluate, finetune, precision, prepare, resolve_device, synchronize, use_deterministic_kernels
from .weights import WeightsStore


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
        attrs = {  # val accuracy and MACs are the trial's values, not repeated here
            "ranks": ranks_text(trial.params, self.modules),
            "params": params,
            "macs_ratio": macs / base.macs,
            "params_ratio": params / base.params,
            "conv_ranks": integer_ranks,
            "kept_convs": kept,
            "seed": seed,
            **seconds,
            "eval_s": eval_s,
            "count_s": count_s,
            **precision(device),
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
    return cached_bases(baseline.model, baseline.path)


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

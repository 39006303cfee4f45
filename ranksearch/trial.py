"""What one trial does: decompose the baseline at the trial's ranks, fine-tune briefly, measure (val accuracy, MACs).

Ranks that a COMPLETE trial of the study already has are not trained again: the trial copies that trial's result.
Export re-runs a trial through the same functions (``trial_model``, ``trial_seed``).
"""

import copy
import time

import optuna
import torch
from torch import nn

from .baseline import Baseline, cached_bases
from .config import Config
from .data import DeviceData
from .decompose import Bases, decompose, should_decompose
from .measure import count_macs
from .models import RANK_STEPS, rank_modules, set_ranks
from .progress import ranks_text
from .train import evaluate, finetune, precision, prepare, synchronize
from .weights import WEIGHTS_ATTR, WeightsStore

COMPLETE = optuna.trial.TrialState.COMPLETE
COPIED_FROM = "copied_from"  # user attr of a copied trial: the number of the trial it copied
# What a copy takes from its original: what was measured and how to rebuild it (the seed, the kept weights, which
# exist exactly while both are on the Pareto front, having the same values); not timings, nor the tags a run sets.
COPIED_ATTRS = (
    "ranks", "params", "macs_ratio", "params_ratio", "conv_ranks", "kept_convs", "seed",
    "device", "device_name", "eval_dtype", "torch_version", WEIGHTS_ATTR,
)  # fmt: skip


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


def completed_twin(trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    """The first COMPLETE trial of the study with exactly ``trial``'s params (so one that was trained), or None."""
    trials = trial.study.get_trials(deepcopy=False, states=(COMPLETE,))
    return next((t for t in trials if t.params == trial.params), None)


def copy_result(trial: optuna.Trial, original: optuna.trial.FrozenTrial) -> tuple[float, float]:
    """Record ``original``'s result (``COPIED_ATTRS``) as ``trial``'s, and return its values."""
    for key in COPIED_ATTRS:
        if key in original.user_attrs:
            trial.set_user_attr(key, original.user_attrs[key])
    trial.set_user_attr(COPIED_FROM, original.number)
    accuracy, macs = original.values
    return accuracy, macs


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
    """Decompose the baseline at the trial's ranks, fine-tune, and measure (val accuracy, MACs); or, for ranks a
    COMPLETE trial already has, copy its result (``copy_result``: a finite grid, on which TPE repeats itself late)."""

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
        original = completed_twin(trial)
        if original is not None:
            return copy_result(trial, original)
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

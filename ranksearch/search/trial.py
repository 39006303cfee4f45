"""What one trial does: decompose the baseline at the trial's ranks, fine-tune briefly, measure (val accuracy, MACs).
In budget mode the fine-tune goes on in rungs, the pruner deciding after each whether it goes on (``samplers``).

Ranks that a COMPLETE trial of the study already has are not trained again: the trial copies that trial's result.
Export re-runs a trial through the same functions (``trial_model``, ``trial_seed``).
"""

import copy
import sys

import optuna
import torch
from torch import nn

from ..data.datasets import DeviceData
from ..decompose import DECOMPOSITIONS, Bases, conv_ranks, data_aware_bases, decompose
from ..decompose.statistics import cached_statistics
from ..inspect.progress import trial_ranks_text
from ..models import RANK_STEPS, rank_modules, set_ranks
from ..models.measure import count_macs
from ..objectives.latency import LatencyMeter, record_conv_ranks, recorded_conv_ranks
from ..objectives.registry import COSTS, Metric
from ..study.attrs import COPIED_FROM, FAIL_REASON, WEIGHTS_ATTR, WEIGHTS_NOT_KEPT, param_name
from ..study.config import Config
from ..study.weights import WeightsStore
from ..train.baseline import Baseline, cached_bases
from ..train.loops import evaluate, finetune, prepare, recalibrate_batchnorm
from ..utils.device import precision, timed

COMPLETE = optuna.trial.TrialState.COMPLETE
TRAINED_STEPS = "trained_steps"  # a trial's SGD steps of fine-tune, every rung it ran (what the search cost)
# What a copy takes from its original: what was measured and how to rebuild it (the seed, the kept weights, which
# exist exactly while both are on the Pareto front, having the same values); not timings, nor the tags a run sets.
COPIED_ATTRS = (
    "ranks", "macs", "params", "macs_ratio", "params_ratio", "latency_ms", "latency_ratio", "seed", "device",
    "device_name", "eval_dtype", "torch_version", WEIGHTS_ATTR, WEIGHTS_NOT_KEPT,
)  # fmt: skip


def suggest_ranks(trial: optuna.Trial, modules: list[str], config: Config) -> dict[str, float]:
    """One normalized rank per module on the 1/32 grid, within [rank_min, rank_max].

    ``modules``: those of the config's ``search_space`` (``rank_modules(model, config.search_space)``): a model's
    grouping (``rank_block1``, ``rank_stage2``) or its eligible convs (``rank_stage1.0.conv1``).
    """
    step = 1 / RANK_STEPS
    return {m: trial.suggest_float(param_name(m), config.rank_min, config.rank_max, step=step) for m in modules}


def trial_seed(config: Config, number: int) -> int:
    """The seed of trial ``number``'s fine-tune: export re-runs a trial from it."""
    return config.seed * 1_000_003 + number


def completed_twin(trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    """The first COMPLETE trial of the study with exactly ``trial``'s params (so one that was trained), or None."""
    trials = trial.study.get_trials(deepcopy=False, states=(COMPLETE,))
    return next((t for t in trials if t.params == trial.params), None)


def copy_result(trial: optuna.Trial, original: optuna.trial.FrozenTrial) -> list[float]:
    """Record ``original``'s result (``COPIED_ATTRS``) as ``trial``'s, and return its values."""
    registered = [attr for m in COSTS.values() if m.measure is not None for attr in (m.attr, m.ratio_attr)]
    for key in (*COPIED_ATTRS, *registered):
        if key in original.user_attrs:
            trial.set_user_attr(key, original.user_attrs[key])
    if (recorded := recorded_conv_ranks(original)) is not None:
        record_conv_ranks(trial, *recorded)
    trial.set_user_attr(COPIED_FROM, original.number)
    trial.set_user_attr(TRAINED_STEPS, 0)  # what the search paid for it
    return list(original.values)


def with_fail_reason(trial: optuna.Trial, measure):
    """``measure(trial)``; an error other than pruning is recorded as the trial's ``FAIL_REASON``, then raised (the
    trial fails and the study goes on)."""
    try:
        return measure(trial)
    except optuna.TrialPruned:
        raise
    except Exception as error:
        trial.set_user_attr(FAIL_REASON, f"{type(error).__name__}: {error}")
        raise


def decomposed_model(
    baseline: nn.Module, ranks: dict[str, float], config: Config, device: torch.device,
    bases: dict[str, Bases] | None = None, only: set[str] | None = None,
) -> nn.Module:  # fmt: skip
    """A copy of the baseline decomposed at ``ranks`` by the config's method, on ``device`` (not fine-tuned);
    ``only``: the names of the layers that may be decomposed (None: all)."""
    model = set_ranks(copy.deepcopy(baseline), ranks, space=config.search_space)
    model = decompose(model, inplace=True, method=config.decompose_method, bases=bases,
                      refine_iters=config.refine_iters, decomposition=config.decomposition, only=only)  # fmt: skip
    return prepare(model, device)


def rung_seed(seed: int, rung: int) -> int:
    """The seed of rung ``rung``'s batches (the first rung's is the trial's own: as before rungs)."""
    return seed if rung == 0 else seed * 1_009 + rung


def tune(
    model: nn.Module, baseline: nn.Module, config: Config, data: DeviceData, seed: int, rung_done=None
) -> dict[str, float]:
    """What follows decomposition, in place: BatchNorm re-estimation (when configured), then the fine-tune (distilled
    from ``baseline`` when configured) in the config's rungs (``config.rung_steps``), each a cosine of its own from
    ``finetune_lr`` over its added steps; the seconds of each part (the rungs' evaluations not counted).

    ``rung_done(rung, steps)``: called after each rung but the last with the steps trained so far (a pruned trial
    reports there and may stop, raising ``optuna.TrialPruned``)."""
    batches = config.bn_recalibration_batches
    _, recalibrate_s = timed(
        lambda: recalibrate_batchnorm(model, data, batches, config.batch_size, seed), data.device
    )
    teacher = baseline if config.distill_weight > 0 else None
    marks = config.rung_steps()
    finetune_s = 0.0
    for rung, (before, after) in enumerate(zip([0, *marks], marks, strict=False)):
        train = lambda rung=rung, steps=after - before: finetune(model, data, config, rung_seed(seed, rung), teacher,
                                                                 steps=steps)  # noqa: E731
        finetune_s += timed(train, data.device)[1]
        if rung_done is not None and rung < len(marks) - 1:
            rung_done(rung, after)
    return {"recalibrate_s": recalibrate_s, "finetune_s": finetune_s}


def trial_model(
    baseline: nn.Module, ranks: dict[str, float], config: Config, data: DeviceData, seed: int,
    bases: dict[str, Bases] | None = None, after_decompose=None, only: set[str] | None = None, rung_done=None,
) -> tuple[nn.Module, dict[str, float]]:  # fmt: skip
    """A trial's model: the baseline decomposed at ``ranks`` and tuned (``tune``, every rung); also the seconds of
    each part.

    ``bases``: the baseline's cached channel bases (for the hosvd methods; computed when absent).
    ``after_decompose(model)``: called on the decomposed model before it is tuned (to measure its latency).
    ``only``: the layers that may be decomposed (``decompose``'s); ``rung_done``: ``tune``'s.
    """
    torch.manual_seed(seed)
    baseline.eval()  # the teacher, when distilling; the copy below is set to train mode by the fine-tune
    decomposed = lambda: decomposed_model(baseline, ranks, config, data.device, bases, only)  # noqa: E731
    model, decompose_s = timed(decomposed, data.device)
    if after_decompose is not None:
        after_decompose(model)
    return model, {"decompose_s": decompose_s, **tune(model, baseline, config, data, seed, rung_done)}


class RungReports:
    """A trial's rungs in a study that prunes (budget mode): after each rung but the last, its val accuracy (all of
    val) is reported at the steps trained so far, and the trial stops (``optuna.TrialPruned``) when the pruner says
    so; the steps it trained are recorded either way (``TRAINED_STEPS``)."""

    def __init__(self, trial: optuna.Trial, data: DeviceData, config: Config):
        self.trial, self.data, self.config, self.model = trial, data, config, None
        self.top = config.rung_steps()[-1]

    def __call__(self, rung: int, steps: int) -> None:
        accuracy = evaluate(self.model, self.data, "val", self.config.eval_batch_size)
        self.model.train()  # the next rung goes on
        self.trial.report(accuracy, steps)
        self.trial.set_user_attr(TRAINED_STEPS, steps)
        if self.trial.should_prune():
            where = f"val {accuracy:.2%} after rung {rung + 1} ({steps} of {self.top} fine-tune steps)"
            self.trial.set_user_attr("pruned_at", where)
            raise optuna.TrialPruned(where)


class Objective:
    """Decompose the baseline at the trial's ranks, fine-tune, and measure val accuracy and the config's costs
    (``objectives``); or, for ranks a COMPLETE trial already has, copy its result (``copy_result``: a finite grid,
    on which TPE repeats itself late)."""

    def __init__(
        self, config: Config, data: DeviceData, baseline: Baseline, weights: WeightsStore | None = None,
        bases: dict[str, Bases] | None = None,
    ):  # fmt: skip
        self.config, self.data, self.baseline, self.weights, self.bases = config, data, baseline, weights, bases
        self.modules = list(rank_modules(baseline.model, config.search_space))
        measures = "latency" in config.objectives
        self.latency = LatencyMeter(config.latency_batch, config.decomposition, data.device, baseline.model,
                                 data.spec.shape()) if measures else None
        self.registered = [COSTS[name] for name in config.objectives[1:] if COSTS[name].measure is not None]
        self.example = torch.zeros(data.spec.input_size(), device=data.device)  # what a registered cost measures on
        self.registered_baseline = {m.name: self.measure_cost(m, baseline.model) for m in self.registered}
        self.rungs = config.rung_steps()
        self.told_weights_not_kept = False  # ``keep_weights`` says it once per process

    def measure_cost(self, metric: Metric, model: nn.Module) -> float:
        """A registered cost's value for ``model`` (in eval mode, without gradients)."""
        training = model.training
        with torch.no_grad():
            value = float(metric.measure(model.eval(), self.example))
        model.train(training)
        return value

    def keep_weights(self, trial: optuna.Trial, model: nn.Module) -> None:
        """Save the trial's fine-tuned weights; when they cannot be (the weights folder became unwritable or full),
        the trial is still recorded with its values, with ``WEIGHTS_NOT_KEPT`` saying why (its note says it;
        export re-runs its fine-tune), and the run says so in one line, the first time only."""
        reason = self.weights.save(trial, model)
        if reason is None:
            return
        trial.set_user_attr(WEIGHTS_NOT_KEPT, reason)
        if not self.told_weights_not_kept:
            self.told_weights_not_kept = True
            print(f"note: cannot keep trial {trial.number}'s weights in {self.weights.directory} ({reason}): trials "
                  "go on and are recorded without their weights (export re-runs their fine-tune); make the folder "
                  "writable to keep those of later trials", file=sys.stderr, flush=True)  # fmt: skip

    def __call__(self, trial: optuna.Trial) -> list[float]:
        return with_fail_reason(trial, self._measure)

    def _measure(self, trial: optuna.Trial) -> list[float]:
        config, base, device = self.config, self.baseline, self.data.device
        ranks = suggest_ranks(trial, self.modules, config)
        original = completed_twin(trial)
        if original is not None:
            return copy_result(trial, original)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # peak_gpu_mib is this trial's peak
        seed = trial_seed(config, trial.number)
        costs: dict[str, float] = {}
        before = [m for m in self.registered if not m.after_finetune]
        measures_before = self.latency is not None or before

        def measure(decomposed: nn.Module) -> None:  # before the fine-tune: what depends on the layers only
            if self.latency is not None:
                costs["latency"], costs["latency_s"] = self.latency.latency(decomposed, trial.study)
            costs.update({m.name: self.measure_cost(m, decomposed) for m in before})

        reports = RungReports(trial, self.data, config) if len(self.rungs) > 1 else None

        def decomposed(model: nn.Module) -> None:
            if reports is not None:
                reports.model = model
            if measures_before:
                measure(model)

        model, seconds = trial_model(base.model, ranks, config, self.data, seed, self.bases, decomposed,
                                     rung_done=reports)  # fmt: skip
        costs.update({m.name: self.measure_cost(m, model) for m in self.registered if m.after_finetune})
        integer_ranks, kept = conv_ranks(model, config.decomposition)
        accuracy, eval_s = timed(lambda: evaluate(model, self.data, "val", config.eval_batch_size), device)
        (macs, params), count_s = timed(lambda: count_macs(model, self.data.spec.input_size()), device)
        if reports is not None:  # the top rung's value, the trial's own, on its curve too
            trial.report(accuracy, self.rungs[-1])
        attrs = {  # every measured cost (val accuracy, the first value, is not repeated here)
            "ranks": trial_ranks_text(trial.params, self.modules),
            "macs": macs,
            "params": params,
            "macs_ratio": macs / base.macs,
            "params_ratio": params / base.params,
            "seed": seed,
            TRAINED_STEPS: self.rungs[-1],
            **seconds,
            "eval_s": eval_s,
            "count_s": count_s,
            **precision(device),
        }
        if self.latency is not None:
            attrs |= {
                "latency_ms": costs["latency"],
                "latency_ratio": costs["latency"] / self.latency.baseline_ms,
                "latency_s": costs["latency_s"],
            }
        for metric in self.registered:
            attrs |= {metric.attr: costs[metric.name],
                      metric.ratio_attr: costs[metric.name] / self.registered_baseline[metric.name]}  # fmt: skip
        if device.type == "cuda":
            attrs["peak_gpu_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        record_conv_ranks(trial, integer_ranks, kept)
        if self.weights is not None:
            self.keep_weights(trial, model)
        if config.budget is not None:  # a single objective; the costs are the attrs above
            return [accuracy]
        measured = {**costs, "macs": float(macs), "params": float(params)}
        return [accuracy, *(measured[name] for name in config.objectives[1:])]


def trial_bases(config: Config, baseline: Baseline, data: DeviceData) -> dict | None:
    """What the config's method truncates, by layer name: for "activation", each layer's data-aware basis (from
    layer statistics cached beside the baseline); for the hosvd methods, the baseline's channel bases (cached too)."""
    if config.decompose_method == "activation":
        statistics = cached_statistics(baseline.model, baseline.path, data, config.activation_images)
        return data_aware_bases(baseline.model, statistics, config.decomposition)
    if not DECOMPOSITIONS[config.decomposition].uses_channel_bases(config.decompose_method):
        return None  # e.g. HOOI, or CP: their factors come from the weights alone
    return cached_bases(baseline.model, baseline.path)

"""Inference latency of a model, measured until its median settles: warm-up, then rounds of timed forward passes.

``measure_latency`` gives milliseconds per forward pass of a whole batch; ``latency_device`` says where it was
measured (latencies from different machines or thread counts do not compare). ``speed_against`` times a model
beside the baseline for an export or a delivery; ``LatencyMeter`` times each trial's architecture once, beside the
baseline, for the search.
"""

import contextlib
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna
import torch
from torch import nn

from ..data.inputs import CIFAR10_SHAPE
from ..decompose import conv_ranks
from ..models.fold import fold_batchnorm
from ..utils.device import cpu_name, timed
from ..utils.errors import first_line

CPU = torch.device("cpu")
MIN_TIMED_RUNS = 3  # timed passes a measurement makes even when one pass outlasts max_seconds (a large batch)
PAIRED_ROUNDS = 2  # a model and the baseline are timed in turn this many times each, the fastest of each kept
SPEED_BATCH = 32  # the second batch an export or a delivery times its model at (besides 1), unless told another
SPEED_SECONDS = 5.0  # each of those measurements' time limit (a settled median usually comes far sooner)
DEPLOYED_FORM = "BatchNorm folded, TorchScript"
PROGRESS_SECONDS = 10.0  # a longer measurement says how far it is this often (batch 4096 on a CPU: minutes)


@dataclass(frozen=True)
class LatencyResult:
    median_ms: float  # milliseconds per forward pass of the whole batch, median of all timed runs
    runs: int  # timed forward passes
    stable: bool  # False when max_seconds ran out before the median settled within rel_tol
    threads: int  # torch's intra-op threads during the measurement
    batch: int  # images per forward pass


def measure_latency(
    model: nn.Module, input_shape: tuple[int, ...] = CIFAR10_SHAPE, batch: int = 1,
    device: torch.device = CPU, threads: int | None = None, rel_tol: float = 0.02,
    min_rounds: int = 3, round_size: int = 10, max_seconds: float = 10.0, warmup: int = 5,
    progress: Callable[[str], None] | None = None,
) -> LatencyResult:  # fmt: skip
    """Median latency of ``model`` (already on ``device``) on one fixed random batch, under ``inference_mode``.

    After ``warmup`` untimed passes, rounds of ``round_size`` timed passes run until, from round ``min_rounds``
    on, the median of all timings so far moved less than ``rel_tol`` (relative) since the previous round, or
    ``max_seconds`` passed, warm-up included (then ``stable`` is False): a pass that outlasts it ends the warm-up
    after that pass and the timing after ``MIN_TIMED_RUNS`` passes. A measurement longer than
    ``PROGRESS_SECONDS`` passes a line to ``progress`` that often. ``threads`` sets torch's intra-op threads for
    the measurement. The model's training flag and torch's thread count are restored afterwards.
    """
    was_training, previous_threads = model.training, torch.get_num_threads()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn((batch, *input_shape), generator=generator).to(device)  # (B, C, H, W)
    on_gpu = device.type == "cuda"
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        model.eval()
        clock = _Clock(max_seconds, progress, batch)
        with torch.inference_mode(), torch.cuda.device(device) if on_gpu else contextlib.nullcontext():
            for _ in range(warmup):
                model(images)
                clock.warmed += 1
                if clock.tick(0):
                    break
            if on_gpu:
                torch.cuda.synchronize(device)
            timer = _cuda_ms if on_gpu else _cpu_ms
            timings, stable = _timed_rounds(lambda: timer(model, images), rel_tol, min_rounds, round_size, clock)
        return LatencyResult(statistics.median(timings), len(timings), stable, torch.get_num_threads(), batch)
    finally:
        model.train(was_training)
        torch.set_num_threads(previous_threads)


def _cpu_ms(model: nn.Module, images: torch.Tensor) -> float:
    start = time.perf_counter()
    model(images)
    return (time.perf_counter() - start) * 1000


def _cuda_ms(model: nn.Module, images: torch.Tensor) -> float:
    """One forward pass timed on the GPU itself: events on the current stream around it, then wait for the end."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    model(images)
    end.record()
    end.synchronize()
    return start.elapsed_time(end)  # milliseconds


class _Clock:
    """A measurement's time: whether ``max_seconds`` passed since it began, and a line to ``progress`` every
    ``PROGRESS_SECONDS``."""

    def __init__(self, max_seconds: float, progress: Callable[[str], None] | None, batch: int):
        self.start = self.said = time.perf_counter()
        self.max_seconds, self.progress, self.batch, self.warmed = max_seconds, progress, batch, 0

    def tick(self, timed: int) -> bool:
        """After a pass (``timed`` timed ones so far): True when the time is up."""
        now = time.perf_counter()
        if self.progress is not None and now - self.said >= PROGRESS_SECONDS:
            self.said = now
            self.progress(f"latency at batch {self.batch}: {self.warmed} warm-up and {timed} timed run(s) in "
                          f"{now - self.start:.0f} s (it stops after {self.max_seconds:g} s, with at least "
                          f"{MIN_TIMED_RUNS} timed runs)")  # fmt: skip
        return now - self.start >= self.max_seconds


def _timed_rounds(
    time_one: Callable[[], float], rel_tol: float, min_rounds: int, round_size: int, clock: _Clock
) -> tuple[list[float], bool]:
    """All timings (ms) and whether their median settled before the clock's time was up; see
    ``measure_latency``."""
    timings: list[float] = []
    rounds, previous_median = 0, None
    while True:
        for _ in range(round_size):
            timings.append(time_one())
            if clock.tick(len(timings)) and len(timings) >= MIN_TIMED_RUNS:
                return timings, False
        rounds, median = rounds + 1, statistics.median(timings)
        if rounds >= min_rounds and previous_median and abs(median - previous_median) < rel_tol * previous_median:
            return timings, True
        previous_median = median


def deployed_form(model: nn.Module, input_shape: tuple[int, ...] = CIFAR10_SHAPE, device: torch.device = CPU):
    """The form a user ships, as ``export --format torchscript`` writes it: BatchNorm folded, traced (at one image of
    ``input_shape``, (C, H, W)). Eager PyTorch would time Python's per-layer overhead, which hides most of a small
    decomposed model's gain."""
    example = torch.zeros(1, *input_shape, device=device)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        return torch.jit.trace(fold_batchnorm(model).to(device), example)


def latency_device(device: torch.device, threads: int) -> dict:
    """Where a latency was measured: device type, CPU model, torch threads and the GPU's name (None on the CPU)."""
    return {
        "device": device.type,
        "cpu": cpu_name(),
        "threads": threads,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }


def in_turns(median_ms: Callable[[nn.Module], float], mine: nn.Module, theirs: nn.Module) -> tuple[float, float]:
    """The fastest of ``PAIRED_ROUNDS`` medians of ``mine`` and of ``theirs``, timed in turns: the load of a shared
    machine moves both alike, so their ratio holds while it comes and goes."""
    fastest_mine = fastest_theirs = math.inf
    for _ in range(PAIRED_ROUNDS):
        fastest_mine = min(fastest_mine, median_ms(mine))
        fastest_theirs = min(fastest_theirs, median_ms(theirs))
    return fastest_mine, fastest_theirs


def speed_against(model: nn.Module, baseline: nn.Module, input_shape: tuple[int, ...], device: torch.device,
                  batches: list[int]) -> dict:  # fmt: skip
    """``model``'s speed against ``baseline``'s in the form a user ships (``deployed_form``), on this machine, at
    each of ``batches``, timed ``in_turns``. What an export records (plain values: loadable with weights_only)."""
    mine, theirs = (deployed_form(m, input_shape=input_shape, device=device) for m in (model, baseline))
    measured = {}
    for batch in batches:
        median = lambda form, batch=batch: measure_latency(form, input_shape=input_shape, batch=batch,  # noqa: E731
                                                           device=device, max_seconds=SPEED_SECONDS).median_ms
        ms, baseline_ms = in_turns(median, mine, theirs)
        measured[str(batch)] = {"ms": ms, "baseline_ms": baseline_ms, "speedup": baseline_ms / ms}
    return {"where": latency_device(device, torch.get_num_threads()), "form": DEPLOYED_FORM, "batches": measured}


def speedups_of(speed: dict | None) -> dict[str, float]:
    """Batch -> speed-up of a ``speed_against`` record (empty when nothing was measured)."""
    return {batch: row["speedup"] for batch, row in (speed or {}).get("batches", {}).items()}


def speedups_text(speedups: object) -> str:
    """", 4.47x as fast at batch 1, 2.79x at 32", or nothing when there is none. ``speedups`` may come from a
    stranger's study (a delivery's record): anything but batch -> number is left out."""
    if not isinstance(speedups, dict):
        return ""
    rows = sorted((int(batch), value) for batch, value in speedups.items()
                  if str(batch).isdigit() and isinstance(value, int | float) and math.isfinite(value))  # fmt: skip
    parts = [f"{value:.2f}x as fast at batch {batch}" if i == 0 else f"{value:.2f}x at {batch}"
             for i, (batch, value) in enumerate(rows)]  # fmt: skip
    return "".join(f", {part}" for part in parts)


def speed_text(speed: dict) -> str:
    """One line: the speed-up at each batch, where it was measured."""
    where = speed["where"]
    machine = where["gpu"] or f"{where['cpu']}, {where['threads']} thread(s)"
    parts = [f"batch {batch}: {row['ms']:.2f} ms against the baseline's {row['baseline_ms']:.2f} ms, "
             f"{row['speedup']:.2f}x as fast" for batch, row in speed["batches"].items()]  # fmt: skip
    return f"speed on this machine ({machine}; {speed['form']}): " + "; ".join(parts)


def measured_speed(model: nn.Module, baseline: nn.Module | None, input_shape: tuple[int, ...], device: torch.device,
                   batch: int) -> dict | None:  # fmt: skip
    """``speed_against`` at batch 1 and ``batch`` (none when 0 or 1), said in a line; None, said, when there is no
    baseline to time against or the model cannot take its deployed form."""
    if baseline is None:
        print("speed: not measured (the study's baseline file is gone)", flush=True)
        return None
    try:
        speed = speed_against(model, baseline, input_shape, device, sorted({1, batch} - {0}))
    except (ValueError, RuntimeError) as error:  # fx or TorchScript cannot follow the model
        print(f"speed: not measured ({first_line(error)})", flush=True)
        return None
    print(speed_text(speed), flush=True)
    return speed


# ----- the trials' latency: measured once per architecture, beside the baseline -----

COMPLETE = optuna.trial.TrialState.COMPLETE

# Trial system attrs (user attrs before 0.13.0): every conv's integer rank (conv name -> R) and the convs kept
# undecomposed. They are system attrs because optuna-dashboard lists a trial's user attrs one to a line, unwrapped:
# VGG16's 13 ranks made that line 330 characters, wider than a 1400-pixel window.
CONV_RANKS, KEPT_CONVS = "conv_ranks", "kept_convs"


def record_conv_ranks(trial: optuna.Trial, integer_ranks: dict[str, int], kept: list[str]) -> None:
    """Record a trial's ``conv_ranks`` (``CONV_RANKS``, ``KEPT_CONVS``) as its system attrs."""
    for key, value in ((CONV_RANKS, integer_ranks), (KEPT_CONVS, kept)):  # Optuna 5 has no Trial.set_system_attr
        trial.storage.set_trial_system_attr(trial._trial_id, key, value)


def recorded_conv_ranks(trial: optuna.trial.FrozenTrial) -> tuple[dict[str, int], list[str]] | None:
    """The ``conv_ranks`` a finished trial recorded: in its system attrs, or its user attrs (before 0.13.0); None
    if it recorded none (a failed trial). A stranger's study may hold anything there: it is only compared."""
    for attrs in (trial.system_attrs, trial.user_attrs):
        if CONV_RANKS in attrs:
            return attrs[CONV_RANKS], attrs.get(KEPT_CONVS)
    return None


def architecture(model: nn.Module, decomposition: str = "tucker2") -> str:
    """What a model's latency depends on: every conv's integer rank and which convs are kept (rank vectors that
    round to the same integer ranks give the same layers)."""
    return json.dumps(conv_ranks(model, decomposition), sort_keys=True)


def recorded_latency(study: optuna.Study | None, key: str) -> float | None:
    """The latency a COMPLETE trial of ``study`` (None: a study not written yet) measured for the architecture
    ``key``, or None."""
    if study is None:
        return None
    for t in study.get_trials(deepcopy=False, states=(COMPLETE,)):
        recorded = recorded_conv_ranks(t)
        if "latency_ms" in t.user_attrs and recorded is not None and json.dumps(recorded, sort_keys=True) == key:
            return t.user_attrs["latency_ms"]
    return None


def _say(line: str) -> None:
    print(line, flush=True)


class LatencyMeter:
    """Median latency (ms) at ``latency_batch`` on the trial device of a model's deployed form (BatchNorm folded,
    TorchScript), measured once per architecture (in this process or by an earlier trial of the study).

    The baseline's is measured first, in this process (``baseline_ms``). Each architecture is then timed beside
    the baseline, in turns, and its latency is ``baseline_ms`` times that side-by-side ratio: the load of a shared
    machine moves both alike, so it cancels. (Timed alone, two architectures that differ in one rank of block4 read
    0.52x and 0.99x of the baseline while tests shared the cores.)"""

    def __init__(self, batch: int, decomposition: str, device: torch.device, baseline: nn.Module,
                 shape=CIFAR10_SHAPE):  # fmt: skip
        self.batch, self.device, self.decomposition = batch, device, decomposition
        self.shape = shape  # one image's (C, H, W): the data's
        self.known: dict[str, float] = {}
        self.baseline = deployed_form(baseline, input_shape=shape, device=device)
        self.baseline_ms = self._median_ms(self.baseline)

    def _median_ms(self, deployed: nn.Module) -> float:
        """One measurement; a long one (a large ``latency_batch``) prints a progress line every 10 s."""
        return measure_latency(deployed, input_shape=self.shape, batch=self.batch, device=self.device,
                               progress=_say).median_ms  # fmt: skip

    def measure(self, model: nn.Module) -> float:
        """``model``'s latency at the load ``baseline_ms`` was measured under (see the class)."""
        mine, theirs = in_turns(self._median_ms, deployed_form(model, input_shape=self.shape, device=self.device),
                                self.baseline)  # fmt: skip
        return self.baseline_ms * mine / theirs

    def latency(self, model: nn.Module, study: optuna.Study) -> tuple[float, float]:
        """The model's latency, and the seconds this call spent measuring it (0 when it was known)."""
        key = architecture(model, self.decomposition)
        if key in self.known:
            return self.known[key], 0.0
        recorded = recorded_latency(study, key)
        if recorded is not None:
            self.known[key] = recorded
            return recorded, 0.0
        self.known[key], seconds = timed(lambda: self.measure(model), self.device)
        return self.known[key], seconds

"""Device policy, in one place: which device a run uses, the precision it measures at (bf16 autocast on CUDA),
deterministic kernels, and how a trial records where it was measured."""

import contextlib
import functools
import platform
import time
from pathlib import Path

import torch

from .errors import UserError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or auto")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def precision(device: torch.device) -> dict[str, str]:
    """Where and at what precision a trial was measured (recorded with each trial and each export)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "device": device.type,
        "device_name": name,
        "eval_dtype": "bf16" if device.type == "cuda" else "fp32",  # see ``autocast``
        "torch_version": str(torch.__version__),  # a plain str: TorchVersion does not load with weights_only
    }


def use_deterministic_kernels(device: torch.device, deterministic: bool = True) -> None:
    """Deterministic cuDNN convolutions, so that export can re-run a trial's fine-tune to the same weights; or,
    ``deterministic`` false (``config.deterministic``), the algorithms cuDNN's autotuner finds fastest."""
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = deterministic
        torch.backends.cudnn.benchmark = not deterministic


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock timings mean something."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """``fn()`` and the seconds it took, queued GPU work included."""
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start

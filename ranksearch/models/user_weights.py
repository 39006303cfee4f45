"""A user's trained weights (``--weights FILE``): read safely, fitted to the model, recorded by content.

The file holds the ``state_dict`` of the config's ``--model`` (``torch.save(model.state_dict(), path)``), or a
checkpoint dict holding one under a usual key (``CHECKPOINT_KEYS``); torchvision's own checkpoint files load into
``torchvision:<name>`` as they are. It is read with ``weights_only=True``: a file whose loading would run code is
refused, never run. With it there is no pretraining: the baseline is these weights, measured on the data
(``baseline.measure_weights``), and a study records the file's SHA-256 (``weights_record``), refusing other weights.
"""

import functools
import hashlib
import pickle
import warnings
from pathlib import Path

import torch
from torch import nn

from ..utils.errors import UserError, first_line
from .torchvision_models import modern_keys

CHECKPOINT_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")  # where checkpoints keep weights
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DistributedDataParallel, torch.compile
DIGEST_SHOWN = 12  # hex digits of a SHA-256 a message shows
SAVE_HINT = "save your model's weights with torch.save(model.state_dict(), path)"


@functools.lru_cache(maxsize=8)
def _digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_digest(path: str | Path) -> str:
    """The SHA-256 of the file at ``path`` (computed once per file version in a process)."""
    try:
        path = Path(path).expanduser()
        status = path.stat()
        return _digest(str(path.resolve()), status.st_size, status.st_mtime_ns)
    except OSError as error:
        raise UserError(f"cannot read --weights {path} ({first_line(error)}); pass the file of your model's "
                        "trained weights") from None  # fmt: skip


def weights_record(weights: str | dict) -> dict:
    """How a study records ``weights`` (a path): ``{"sha256": ...}``, the content and not the name (a moved or
    renamed file is the same weights); a record stays as it is."""
    return weights if isinstance(weights, dict) else {"sha256": weights_digest(weights)}


def digest_text(record: dict | None) -> str:
    return f"sha256 {str((record or {}).get('sha256', '?'))[:DIGEST_SHOWN]}"


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def _unwrapped(saved, path: Path) -> dict[str, torch.Tensor]:
    """The state_dict in ``saved``: itself, or the one under a ``CHECKPOINT_KEYS`` key; the prefix a wrapper adds to
    every key (``module.``, ``_orig_mod.``) removed."""
    found = saved if _is_state_dict(saved) else None
    if found is None and isinstance(saved, dict):
        found = next((saved[key] for key in CHECKPOINT_KEYS if _is_state_dict(saved.get(key))), None)
    if found is None:
        held = f"a dict with keys {', '.join(map(str, list(saved)[:5]))}" if isinstance(saved, dict) else (
            f"a {type(saved).__name__}")  # fmt: skip
        raise UserError(f"--weights {path} holds {held}, not a state_dict (nor one under {', '.join(CHECKPOINT_KEYS)})"
                        f"; {SAVE_HINT}")  # fmt: skip
    state = dict(found)
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict in the file at ``path``, read with ``weights_only=True`` (once per file version in a process:
    a run checks it before the data, then measures it); a one-line UserError for a missing, damaged or foreign
    file, and for one whose loading would run code (it is not run)."""
    path = Path(path).expanduser()
    if not path.is_file():
        why = "no such file" if not path.exists() else "not a regular file"
        raise UserError(f"cannot read --weights {path} ({why}); pass the file of your model's trained weights")
    status = path.stat()
    return dict(_read(path, status.st_size, status.st_mtime_ns))


@functools.lru_cache(maxsize=2)
def _read(path: Path, size: int, mtime_ns: int) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # torch's warnings about a foreign pickle: the error below says it
            warnings.simplefilter("ignore")
            saved = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "weights only" in str(error).lower() or "weights_only" in str(error):
            raise UserError(f"--weights {path} holds Python objects besides tensors, which loading would have to run "
                            f"as code (refused, not run: {_unsafe_global(error)}); {SAVE_HINT}") from None  # fmt: skip
        raise UserError(f"--weights {path} is not a PyTorch file ({first_line(error)}); {SAVE_HINT}") from None
    except Exception as error:  # truncated, not a zip, foreign bytes (a KeyError deep in the unpickler...)
        why = first_line(error).partition(". ")[0]  # torch's message goes on for several sentences
        raise UserError(f"--weights {path} is damaged or not a PyTorch file ({type(error).__name__}: {why}); save "
                        "the weights again") from None  # fmt: skip
    return _unwrapped(saved, path)


def _unsafe_global(error: Exception) -> str:
    """What a refused pickle wanted to run, from torch's message (``GLOBAL builtins.exec``...)."""
    for line in str(error).splitlines():
        if "GLOBAL" in line or "Unsupported" in line:
            return line.strip().rstrip(".")[:120]
    return first_line(error)[:120]


def _shape(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "a scalar"


def first_mismatch(model: nn.Module, state: dict[str, torch.Tensor]) -> str | None:
    """The first way ``state`` does not fit ``model``, in the model's order: a weight the file lacks or holds at
    another shape, then a weight the model has not; None when it fits. Rank buffers (ranksearch's own) and
    BatchNorm's batch counters may be absent."""
    expected = model.state_dict()
    for key, tensor in expected.items():
        if key.endswith(".rank") or key.endswith("num_batches_tracked"):
            continue
        if key not in state:
            return f"the file has no {key} ({_shape(tensor)} in the model)"
        if state[key].shape != tensor.shape:
            return f"{key} is {_shape(state[key])} in the file, {_shape(tensor)} in the model"
    extra = [key for key in state if key not in expected]
    return f"the file has {extra[0]}, which the model has not" if extra else None


def fitted(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path, what: str) -> nn.Module:
    """``model`` holding ``state``; a one-line UserError naming the first mismatch (``what``: the model as the
    user named it, with its class count) when the weights are another architecture's or class count's."""
    state = modern_keys(state, model.state_dict())
    mismatch = first_mismatch(model, state)
    if mismatch is not None:
        raise UserError(f"--weights {path} does not fit {what}: {mismatch}; pass weights of this --model trained "
                        "on the data's classes (or the --model they were trained as)")  # fmt: skip
    expected = model.state_dict()
    filled = {key: tensor for key, tensor in expected.items() if key not in state}  # rank buffers, batch counters
    model.load_state_dict({**filled, **state})
    return model


def check_weights(config, model: nn.Module) -> nn.Module:
    """``model`` (``config``'s, untrained) with the weights of ``config.weights`` loaded: read and fitted, or a
    one-line UserError before any other work."""
    what = f"{config.model} with {config.num_classes} classes" + (f" at width {config.width:g}" if config.width != 1
                                                                   else "")  # fmt: skip
    return fitted(model, read_weights(config.weights), config.weights, what)

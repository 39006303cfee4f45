"""Reading an exported model back: ``load_model`` rebuilds it (its decomposed form read from the saved tensors)
with its weights, from the ``.pt`` that ``ranksearch export`` writes. Needs torch, not the search stack (optuna).
"""

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..data.inputs import CIFAR10_INPUT
from ..decompose import decomposed_from_state_dict
from ..decompose.layer import by_code
from ..models import build_model, check_model_name
from ..utils.errors import UserError, first_line
from ..utils.plugins import load_recorded

FILE_KIND = "ranksearch-model"
# 1: ranksearch 0.1.0; 2: adds input, classes, device, eval_dtype, measured_with; 3 (0.5.0): each decomposed layer
# records its method (a ``decomposition`` buffer: Tucker-2, CP or SVD), where 1 and 2 had Tucker-2 only; 4 (0.8.0):
# ``input`` is the data's (any image size, its mean/std), ``config.plugins`` the paths of the files registering its
# model or layers; 5 (0.9.0): ``config.plugins`` as {"name", "sha256"} records, the content that the plugins passed to
# load_model must have (a 0.8.0 reader would have taken them for paths to import)
FILE_VERSION = 5
# CIFAR-10's input (``inputs.InputSpec.record``: (uint8 pixel / 255 - mean) / std per RGB channel, NCHW, 3x32x32)
# and classes: what a file written by 0.1.0, which recorded neither, takes. Later files record their data's.
INPUT_SPEC = CIFAR10_INPUT.record()
CIFAR10_CLASSES = list(CIFAR10_INPUT.classes)


def read_export(path: str | Path) -> dict:
    """The payload of a ``.pt`` export (file version 1 to 4), checked; a one-line UserError for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no file {path}; pass the .pt written by `ranksearch export`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{path} is unreadable or truncated ({type(error).__name__}); export it again") from None
    if not isinstance(payload, dict) or payload.get("kind") != FILE_KIND:
        raise UserError(f"{path} is not a ranksearch export (no '{FILE_KIND}' marker)")
    version = payload.get("file_version")
    if not isinstance(version, int) or version < 1:
        raise UserError(f"{path} is a damaged ranksearch export (file_version {version!r}); export it again")
    if version > FILE_VERSION:
        raise UserError(
            f"{path} was written by ranksearch {payload.get('ranksearch_version', '?')} (file version {version}); "
            f"upgrade ranksearch (this is {__version__}, which reads file versions up to {FILE_VERSION})"
        )
    _check_contents(payload, path)
    return payload


def _check_contents(payload: dict, path: Path) -> None:
    required = {"config": dict, "state_dict": dict}
    if payload["file_version"] > 1:
        required |= {"input": dict, "classes": list}
    wrong = [key for key, kind in required.items() if not isinstance(payload.get(key), kind)]
    if not wrong and not {"model", "num_classes", "width"} <= payload["config"].keys():
        wrong = ["config (model, num_classes, width)"]
    if not wrong and not all(isinstance(v, torch.Tensor) for v in payload["state_dict"].values()):
        wrong = ["state_dict (tensors)"]
    if wrong:
        raise UserError(f"{path} is a damaged ranksearch export ({', '.join(wrong)}: missing or wrong); export again")


def _unregistered(payload: dict) -> list[str]:
    """What the export names that nothing in this process registers: its model, its layers' decompositions."""
    names = []
    try:
        check_model_name(str(payload["config"]["model"]))
    except ValueError:
        names.append(f"model {payload['config']['model']!r}")
    records = [v for k, v in payload["state_dict"].items() if k.endswith(".decomposition") and v.numel() == 1]
    codes = sorted({int(record) for record in records})
    return names + [f"decomposition code {code}" for code in codes if by_code(code) is None]


def _rebuild(payload: dict, path: Path, plugins: Sequence[str]) -> nn.Module:
    config = payload["config"]
    load_recorded(str(path), config.get("plugins"), plugins, lambda: _unregistered(payload), api=True)
    try:
        model = build_model(config["model"], num_classes=config["num_classes"], width=config["width"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{path}: its config describes no model ({first_line(error)}); export it again") from None
    try:
        return decomposed_from_state_dict(model, payload["state_dict"])
    except ValueError as error:
        raise UserError(f"{path}: {first_line(error)}; export it again") from None


def load_model(path: str | Path, plugins: Sequence[str | Path] = ()) -> nn.Module:
    """Rebuild an exported model (its decomposed form read from the saved tensors) with its weights, in eval mode.

    ``plugins``: the plugin files (or modules) the export was made with, imported first when its model or layers
    come from them, each checked against the file's record by content (they may lie elsewhere now). A file's
    recorded plugins are never imported unless passed: without them, a one-line UserError names what to pass.

    The model carries ``input_spec`` (how images become its input: the size, mean and std of the data it was
    trained on, as ``InputSpec.record`` writes them) and ``classes`` (the name of each output); CIFAR-10's
    (``INPUT_SPEC``, ``CIFAR10_CLASSES``) for files written by 0.1.0, which recorded neither.
    ``InputSpec.from_record(model.input_spec, model.classes)`` gives them as an ``InputSpec``.
    """
    payload = read_export(path)
    plugins = [plugins] if isinstance(plugins, str | Path) else plugins  # one plugin, not its characters
    model = _rebuild(payload, Path(path), [str(plugin) for plugin in plugins])
    described = payload if payload["file_version"] > 1 else _version1_defaults(payload["config"])
    model.input_spec, model.classes = described["input"], described["classes"]
    return model.eval()


def _version1_defaults(config: dict) -> dict:
    """What a file from 0.1.0 (made for CIFAR-10 only) did not record."""
    classes = list(CIFAR10_CLASSES) if config["num_classes"] == len(CIFAR10_CLASSES) else None
    return {"input": copy.deepcopy(INPUT_SPEC), "classes": classes}

"""Take a trial's model out of a study: pick it, rebuild it exactly, verify it, and write deployable files.

The ``.pt`` file describes itself (weights with rank buffers, config, MACs, params, accuracies, provenance);
``load_model`` rebuilds the decomposed architecture from its rank buffers alone.
"""

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from torch import nn

from . import __version__
from .baseline import cached_bases, load_baseline, new_model
from .config import Config
from .data import DeviceData, load_dataset
from .decompose import decomposed_from_state_dict
from .errors import UserError
from .measure import count_macs
from .models import build_model
from .search import trial_model, trial_seed
from .train import evaluate, finetune, steps_per_epoch
from .weights import WeightsStore

FILE_KIND = "ranksearch-model"
FILE_VERSION = 1
FORMATS = ("pt", "onnx", "torchscript")
SUFFIXES = {"pt": ".pt", "onnx": ".onnx", "torchscript": ".ts"}
ACCURACY_TOLERANCE = 0.001  # 0.1 percentage point, as a fraction


def study_config(study: optuna.Study) -> Config:
    """The config a study was run with (its ``config`` user attr)."""
    fields = study.user_attrs.get("config")
    if fields is None or "baseline" not in study.user_attrs:
        raise UserError(f"study {study.study_name!r} has no ranksearch config or baseline: was it made by ranksearch?")
    return Config(**fields)


# ----- picking a trial -------------------------------------------------------------------------------------------


@dataclass
class Pick:
    trial: optuna.trial.FrozenTrial
    reason: str
    alternatives: list[optuna.trial.FrozenTrial]


def pick_best(study: optuna.Study, max_drop_pp: float) -> Pick:
    """Among Pareto trials within ``max_drop_pp`` points of the baseline's val accuracy, the one with fewest MACs."""
    floor = study.user_attrs["baseline"]["val_accuracy"] - max_drop_pp / 100
    front = sorted(study.best_trials, key=lambda t: t.values[1])
    qualified = [t for t in front if t.values[0] >= floor - 1e-12]
    if not qualified:
        listing = "; ".join(f"trial {t.number}: val {t.values[0]:.2%}, MACs {_ratio(t):.3f}x" for t in front)
        raise UserError(
            f"no Pareto trial is within {max_drop_pp} pp of the baseline's val accuracy "
            f"({floor + max_drop_pp / 100:.2%}); front: {listing or 'empty'}; "
            "raise --max-drop or pick one with --trial N"
        )
    best = qualified[0]
    reason = (
        f"fewest MACs ({_ratio(best):.3f}x the baseline) among {len(qualified)} Pareto trials with val accuracy "
        f">= {floor:.2%} (baseline - {max_drop_pp} pp)"
    )
    return Pick(best, reason, qualified[1:4])


def _ratio(trial: optuna.trial.FrozenTrial) -> float:
    return trial.user_attrs.get("macs_ratio", math.nan)


def get_trial(study: optuna.Study, number: int) -> optuna.trial.FrozenTrial:
    trials = study.get_trials(deepcopy=False)
    if not 0 <= number < len(trials) or trials[number].state != optuna.trial.TrialState.COMPLETE:
        raise UserError(f"study {study.study_name!r} has no complete trial {number}; see `ranksearch report`")
    return trials[number]


# ----- rebuilding a trial's model --------------------------------------------------------------------------------


def rebuild_trial(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, config: Config, data: DeviceData
) -> tuple[nn.Module, str]:
    """The trial's model with the weights it was evaluated with, and where they came from."""
    state = WeightsStore(study.user_attrs["weights_dir"]).load(trial) if "weights_dir" in study.user_attrs else None
    if state is not None:
        model = decomposed_from_state_dict(new_model(config), state).to(data.device)
        return model, "weights kept with the study"
    path = Path(study.user_attrs.get("baseline_path", ""))
    if not path.is_file():
        raise UserError(
            f"trial {trial.number}'s weights were not kept (it left the Pareto front) and the baseline {path} "
            "needed to re-run its fine-tune is gone; pick a Pareto trial"
        )
    baseline = load_baseline(path, config, data.device)
    ranks = {name.removeprefix("rank_"): value for name, value in trial.params.items()}
    seed = trial.user_attrs.get("seed", trial_seed(config, trial.number))
    bases = cached_bases(baseline.model, path) if config.decompose_method != "hooi" else None
    model, _ = trial_model(baseline.model, ranks, config, data, seed, bases)
    return model, f"fine-tune re-run from seed {seed}"


def verify(model: nn.Module, trial: optuna.trial.FrozenTrial, config: Config, data: DeviceData) -> float:
    """Check the rebuilt model against the trial's record; return its val accuracy."""
    accuracy = evaluate(model, data, "val", config.eval_batch_size)
    recorded = trial.values[0]
    if abs(accuracy - recorded) > ACCURACY_TOLERANCE:
        raise UserError(
            f"rebuilt trial {trial.number} scores {accuracy:.2%} on val, not its recorded {recorded:.2%}; "
            "nothing written (is --data-dir the data the study used?)"
        )
    macs, params = count_macs(model)
    if (macs, params) != (trial.user_attrs["macs"], trial.user_attrs["params"]):
        raise UserError(f"rebuilt trial {trial.number} has {macs:,} MACs / {params:,} params, not the recorded ones")
    return accuracy


def finetune_longer(model: nn.Module, config: Config, data: DeviceData, epochs: int, seed: int) -> None:
    """The usual last step after a search: ``epochs`` more epochs of the trial's fine-tune recipe."""
    longer = dataclasses.replace(config, finetune_steps=epochs * steps_per_epoch(data, config.batch_size))
    finetune(model, data, longer, seed)


# ----- files -----------------------------------------------------------------------------------------------------


def save_pt(model: nn.Module, path: Path, metadata: dict) -> None:
    payload = {
        "kind": FILE_KIND,
        "file_version": FILE_VERSION,
        "ranksearch_version": __version__,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **metadata,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)


def read_export(path: str | Path) -> dict:
    """The payload of a ``.pt`` export; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no file {path}; pass the .pt written by `ranksearch export`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{path} is unreadable or truncated ({type(error).__name__}); export it again") from None
    if not isinstance(payload, dict) or payload.get("kind") != FILE_KIND:
        raise UserError(f"{path} is not a ranksearch export (no '{FILE_KIND}' marker)")
    return payload


def load_model(path: str | Path) -> nn.Module:
    """Rebuild an exported model (decomposed architecture from its rank buffers) with its weights, in eval mode."""
    payload = read_export(path)
    config = payload["config"]
    model = build_model(config["model"], num_classes=config["num_classes"], width=config["width"])
    return decomposed_from_state_dict(model, payload["state_dict"]).eval()


def save_onnx(model: nn.Module, path: Path) -> float:
    """Write ONNX and check it with onnxruntime; returns the largest output difference to PyTorch."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxruntime: pip install 'ranksearch[deploy]'") from None
    model = model.cpu().eval()
    images = torch.randn(4, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated but needs no onnxscript
        torch.onnx.export(
            model, (images,), str(path), dynamo=False, input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        return float((torch.from_numpy(logits) - model(images)).abs().max())


def save_torchscript(model: nn.Module, path: Path) -> float:
    model = model.cpu().eval()
    images = torch.randn(4, 3, 32, 32)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        traced = torch.jit.trace(model, images)
        traced.save(str(path))
        return float((torch.jit.load(str(path))(images) - model(images)).abs().max())


def output_paths(out: Path, formats: list[str]) -> dict[str, Path]:
    """The .pt always; other formats beside it with their own suffix."""
    base = out.with_suffix("") if out.suffix == ".pt" else out
    return {fmt: base.with_name(base.name + SUFFIXES[fmt]) for fmt in ["pt", *[f for f in formats if f != "pt"]]}


def parse_formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"--format {text!r}: choose from {', '.join(FORMATS)} (comma-separated)")
    return formats


def _describe(trial: optuna.trial.FrozenTrial) -> str:
    ranks = "/".join(str(round(v * 32)) for _, v in sorted(trial.params.items()))
    return f"trial {trial.number} (ranks {ranks} /32, val {trial.values[0]:.2%}, MACs {_ratio(trial):.3f}x)"


def choose_trial(study: optuna.Study, which: str, max_drop_pp: float) -> optuna.trial.FrozenTrial:
    """``which`` is "best" or a trial number; prints why a "best" trial was picked."""
    if which != "best":
        if not which.isdigit():
            raise UserError(f"--trial {which!r}: give a trial number or 'best'")
        return get_trial(study, int(which))
    pick = pick_best(study, max_drop_pp)
    print(f"picked {_describe(pick.trial)}: {pick.reason}")
    for alternative in pick.alternatives:
        print(f"  runner-up: {_describe(alternative)}")
    return pick.trial


def _scores(model: nn.Module, data: DeviceData, config: Config) -> dict[str, float]:
    return {f"{split}_accuracy": evaluate(model, data, split, config.eval_batch_size) for split in ("val", "test")}


def export_trial(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, data_dir: str | None, device: torch.device,
    out: Path, formats: list[str], finetune_epochs: int = 0,
) -> dict[str, Path]:  # fmt: skip
    """Rebuild and verify ``trial``'s model, optionally fine-tune it longer, and write it in ``formats``."""
    config = study_config(study)
    data_dir = data_dir or study.user_attrs.get("data_dir")
    if data_dir is None:
        raise UserError("the study does not record its data: pass --data-dir")
    data = DeviceData(load_dataset(data_dir, download=False), config.val_size, config.split_seed, device)
    model, source = rebuild_trial(study, trial, config, data)
    verify(model, trial, config, data)
    scores = _scores(model, data, config)
    print(f"trial {trial.number} rebuilt ({source}): val {scores['val_accuracy']:.2%} "
          f"(recorded {trial.values[0]:.2%}), test {scores['test_accuracy']:.2%}")  # fmt: skip
    before = dict(scores)
    if finetune_epochs > 0:
        finetune_longer(model, config, data, finetune_epochs, trial_seed(config, trial.number) + 1)
        scores = _scores(model, data, config)
        print(f"after {finetune_epochs} more epochs: val {before['val_accuracy']:.2%} -> "
              f"{scores['val_accuracy']:.2%}, test {before['test_accuracy']:.2%} -> "
              f"{scores['test_accuracy']:.2%}")  # fmt: skip
    baseline = study.user_attrs["baseline"]
    macs, params = count_macs(model)
    metadata = {
        "config": config.to_dict(), "study_name": study.study_name, "trial_number": trial.number,
        "ranks": {k.removeprefix("rank_"): v for k, v in trial.params.items()},
        "macs": macs, "params": params,
        "macs_ratio": macs / baseline["macs"], "params_ratio": params / baseline["params"], **scores,
        "finetune_epochs": finetune_epochs, "before_finetune": before, "baseline": baseline, "source": source,
    }  # fmt: skip
    paths = output_paths(out, formats)
    save_pt(model, paths["pt"], metadata)
    print(f"wrote {paths['pt']}  (MACs {macs:,} = {metadata['macs_ratio']:.3f}x, params {params:,})")
    if "onnx" in paths:
        print(f"wrote {paths['onnx']}  (onnxruntime vs PyTorch: max |diff| {save_onnx(model, paths['onnx']):.2e})")
    if "torchscript" in paths:
        print(f"wrote {paths['torchscript']}  (max |diff| {save_torchscript(model, paths['torchscript']):.2e})")
    return paths

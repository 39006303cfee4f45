"""Take a trial's model out of a study: pick it, rebuild it exactly, verify it, and write deployable files.

The ``.pt`` file describes itself (weights, config, MACs, params, accuracies, provenance, the input it expects
and its class names); ``load_model`` rebuilds the decomposed architecture from the saved tensors alone.
"""

import copy
import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from torch import nn

from . import __version__
from .baseline import load_baseline, new_model
from .config import Config
from .data import CIFAR_MEAN, CIFAR_STD, DeviceData, device_data
from .decompose import decomposed_from_state_dict
from .errors import UserError, first_line
from .files import atomic_save, check_writable
from .fold import fold_batchnorm
from .measure import count_macs
from .models import build_model
from .objectives import COSTS, DEFAULT_OBJECTIVES, cost, costs_text, study_objectives
from .refine import RefineRecipe, from_scratch, refine
from .train import evaluate, precision, resolve_device, steps_per_epoch, use_deterministic_kernels
from .trial import trial_bases, trial_model, trial_seed
from .weights import WeightsStore

FILE_KIND = "ranksearch-model"
# 1: ranksearch 0.1.0; 2: adds input, classes, device, eval_dtype, measured_with; 3 (0.5.0): each decomposed layer
# records its method (a ``decomposition`` buffer: Tucker-2, CP or SVD), where 1 and 2 had Tucker-2 only
FILE_VERSION = 3
FORMATS = ("pt", "onnx", "torchscript")
SUFFIXES = {"pt": ".pt", "onnx": ".onnx", "torchscript": ".ts"}
ACCURACY_TOLERANCE = 0.001  # 0.1 percentage point, as a fraction
INPUT_SPEC = {  # what the model takes: (uint8 pixel / 255 - mean) / std per RGB channel, NCHW
    "size": [3, 32, 32], "channel_order": "RGB", "scale": "uint8 pixel / 255",
    "mean": list(CIFAR_MEAN), "std": list(CIFAR_STD), "layout": "NCHW",
}  # fmt: skip
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# Search fields that ranksearch's first release did not have, with what it did instead, so that a study made
# then re-runs exactly as made: TensorLy HOOI every trial, no refinement, no distillation, no torch.compile, no
# BatchNorm re-estimation, objectives val accuracy and MACs.
BEFORE_FIELD_EXISTED = {
    "decompose_method": "hooi", "refine_iters": 0, "distill_weight": 0.0, "distill_temperature": 4.0,
    "compile": False, "bn_recalibration_batches": 0, "objectives": DEFAULT_OBJECTIVES, "latency_batch": 1,
    "search_space": "module", "decomposition": "tucker2", "svd_layers": False, "activation_images": 512,
    "budget": None, "pruner": "none",
}  # fmt: skip


def study_config(study: optuna.Study) -> Config:
    """The config a study was run with (its ``config`` user attr); fields it predates take their old values."""
    fields = study.user_attrs.get("config")
    if fields is None or "baseline" not in study.user_attrs:
        raise UserError(f"study {study.study_name!r} has no ranksearch config or baseline: was it made by ranksearch?")
    unknown = sorted(set(fields) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        made_by = study.user_attrs.get("ranksearch_version", "unknown")
        raise UserError(
            f"study {study.study_name!r} was made by ranksearch {made_by} with config fields this version "
            f"({__version__}) does not know ({', '.join(unknown)}); upgrade ranksearch"
        )
    return Config(**copy.deepcopy({**BEFORE_FIELD_EXISTED, **fields}))


# ----- picking a trial -------------------------------------------------------------------------------------------


@dataclass
class Pick:
    trial: optuna.trial.FrozenTrial
    reason: str
    alternatives: list[optuna.trial.FrozenTrial]


def pick_best(study: optuna.Study, max_drop_pp: float, objective: str | None = None) -> Pick:
    """Among Pareto trials within ``max_drop_pp`` points of the baseline's val accuracy, the one with the lowest
    ``objective`` (a cost: macs, params, latency; default the study's first cost)."""
    costs = study_objectives(study)[1:]
    objective = objective or costs[0]
    if len(study.directions) == 1:  # a budget study: every trial meets its budget
        return best_in_budget(study, costs)
    floor = study.user_attrs["baseline"]["val_accuracy"] - max_drop_pp / 100
    front = study.best_trials
    check_measured(front, objective, costs)
    front = sorted(front, key=lambda t: (cost(t, objective), -t.values[0], t.number))
    qualified = [t for t in front if t.values[0] >= floor - 1e-12]
    if not qualified:
        listing = "; ".join(f"trial {t.number}: val {t.values[0]:.2%}, {costs_text(t, costs)}" for t in front)
        raise UserError(
            f"no Pareto trial is within {max_drop_pp} pp of the baseline's val accuracy "
            f"({floor + max_drop_pp / 100:.2%}); front: {listing or 'empty'}; "
            "raise --max-drop or pick one with --trial N"
        )
    best = qualified[0]
    reason = (
        f"lowest {COSTS[objective].label} ({costs_text(best, [objective])} the baseline) among {len(qualified)} "
        f"Pareto trials with val accuracy >= {floor:.2%} (baseline - {max_drop_pp} pp)"
    )
    return Pick(best, reason, qualified[1:4])


def best_in_budget(study: optuna.Study, costs: list[str]) -> Pick:
    """A budget study's pick: its best val accuracy (every trial meets the budget)."""
    ranked = sorted(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)),
                    key=lambda t: (-t.values[0], t.number))  # fmt: skip
    if not ranked:
        raise UserError(f"study {study.study_name!r} has no complete trial yet; run it first")
    budget = study.user_attrs.get("config", {}).get("budget")
    return Pick(ranked[0], f"the best val accuracy of {len(ranked)} trials within budget {budget}", ranked[1:4])


def check_measured(trials: list[optuna.trial.FrozenTrial], objective: str, costs: list[str]) -> None:
    if objective not in COSTS:
        raise UserError(f"--objective {objective!r}: choose one of {', '.join(COSTS)}")
    if any(cost(t, objective) is None for t in trials):
        raise UserError(
            f"--objective {objective}: this study did not measure {COSTS[objective].label}; its costs are "
            f"{', '.join(costs)} (and macs, params)"
        )


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
    bases = trial_bases(config, baseline, data)  # what the search truncated: the same cached files
    use_deterministic_kernels(data.device)  # as the search ran
    model, _ = trial_model(baseline.model, ranks, config, data, seed, bases)
    return model, f"fine-tune re-run from seed {seed}"


def verify(model: nn.Module, trial: optuna.trial.FrozenTrial, config: Config, data: DeviceData) -> float:
    """Check the rebuilt model against the trial's val accuracy, MACs and params; return its val accuracy."""
    accuracy = evaluate(model, data, "val", config.eval_batch_size)
    recorded = trial.values[0]
    if abs(accuracy - recorded) > ACCURACY_TOLERANCE:
        ran_on = trial.user_attrs.get("device")
        hint = (
            f"the trial ran on {ran_on}, this on {data.device.type}: pass --device {ran_on}"
            if ran_on not in (None, data.device.type)
            else "is --data-dir the data the study used?"
        )
        raise UserError(
            f"rebuilt trial {trial.number} scores {accuracy:.2%} on val, not its recorded {recorded:.2%}; "
            f"nothing written ({hint})"
        )
    macs, params = count_macs(model)
    if (macs, params) != (round(cost(trial, "macs")), trial.user_attrs["params"]):
        raise UserError(f"rebuilt trial {trial.number} has {macs:,} MACs / {params:,} params, not the recorded ones")
    return accuracy


def export_device(trial: optuna.trial.FrozenTrial, requested: str | None) -> torch.device:
    """``requested`` (--device), else the device type the trial ran on ("auto" for trials that did not record it)."""
    if requested not in (None, "auto", "cpu", "cuda"):
        raise UserError(f"--device {requested!r}: choose auto, cpu or cuda")
    ran_on = trial.user_attrs.get("device")
    if requested is None and ran_on == "cuda" and not torch.cuda.is_available():
        raise UserError(
            f"trial {trial.number} ran on cuda but no CUDA GPU is visible; pass --device cpu to rebuild it on the "
            "CPU (its accuracies may then differ slightly from the recorded ones, measured in bf16)"
        )
    return resolve_device(requested or ran_on or "auto")


def check_same_data(study: optuna.Study, data: DeviceData, data_dir: str) -> None:
    """Refuse data other than the study's (studies made before 0.2.0 recorded none: not checked)."""
    recorded = study.user_attrs.get("data")
    if recorded is None:
        return
    differs = [key for key in data.identity if recorded.get(key) != data.identity[key]]
    if differs:
        raise UserError(
            f"--data-dir {data_dir} holds other data than study {study.study_name!r} was run on "
            f"({', '.join(differs)} differs); pass the study's data (recorded: {study.user_attrs.get('data_dir')})"
        )


# ----- refining it -----------------------------------------------------------------------------------------------


def refine_checkpoint(pt: Path) -> Path:
    """Where the refine of an export keeps its per-epoch checkpoint: ``<pt>.refine.pt`` beside the .pt."""
    return pt.with_name(pt.name + ".refine.pt")


def study_teacher(study: optuna.Study, config: Config, device: torch.device) -> nn.Module:
    """The study's baseline, the teacher of a distilled refine; a one-line UserError when its file is gone."""
    recorded = study.user_attrs.get("baseline_path")
    if not recorded or not Path(recorded).is_file():
        raise UserError(
            f"the study's baseline {recorded or '(not recorded)'}, the teacher of the refine's distillation, is "
            "gone; pass --refine-distill 0 to refine without distillation"
        )
    return load_baseline(Path(recorded), config, device).model


def check_from_scratch(
    model: nn.Module, data: DeviceData, config: Config, epochs: int, seed: int, scores: dict[str, float]
) -> dict:
    """Train ``model``'s architecture from new weights for as many steps as the trial's fine-tune and the refine
    took together; print its accuracies beside ``scores`` (the exported model's) and return them with the steps."""
    steps = config.finetune_steps + epochs * steps_per_epoch(data, config.batch_size)
    found = {"steps": steps, **_scores(from_scratch(model, data, config, steps, seed), data, config)}
    label = "refined" if epochs > 0 else "exported"
    print(f"from scratch, same architecture and steps ({steps:,}): val {found['val_accuracy']:.2%}, "
          f"test {found['test_accuracy']:.2%}  ({label}: val {scores['val_accuracy']:.2%}, "
          f"test {scores['test_accuracy']:.2%})")  # fmt: skip
    return found


# ----- files -----------------------------------------------------------------------------------------------------


def save_pt(model: nn.Module, path: Path, metadata: dict) -> None:
    payload = {
        "kind": FILE_KIND,
        "file_version": FILE_VERSION,
        "ranksearch_version": __version__,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **metadata,
    }
    atomic_save(payload, path)


def read_export(path: str | Path) -> dict:
    """The payload of a ``.pt`` export (file version 1 to 3), checked; a one-line UserError for anything else."""
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


def _rebuild(payload: dict, path: Path) -> nn.Module:
    config = payload["config"]
    try:
        model = build_model(config["model"], num_classes=config["num_classes"], width=config["width"])
    except (TypeError, ValueError, RuntimeError) as error:
        raise UserError(f"{path}: its config describes no model ({first_line(error)}); export it again") from None
    try:
        return decomposed_from_state_dict(model, payload["state_dict"])
    except ValueError as error:
        raise UserError(f"{path}: {first_line(error)}; export it again") from None


def load_model(path: str | Path) -> nn.Module:
    """Rebuild an exported model (its decomposed form read from the saved tensors) with its weights, in eval mode.

    The model carries ``input_spec`` (how images become its input: ``INPUT_SPEC``) and ``classes`` (the name of
    each output; CIFAR-10's for files written by 0.1.0, which recorded neither).
    """
    payload = read_export(path)
    model = _rebuild(payload, Path(path))
    described = payload if payload["file_version"] > 1 else _version1_defaults(payload["config"])
    model.input_spec, model.classes = described["input"], described["classes"]
    return model.eval()


def _version1_defaults(config: dict) -> dict:
    """What a file from 0.1.0 (made for CIFAR-10 only) did not record."""
    classes = list(CIFAR10_CLASSES) if config["num_classes"] == len(CIFAR10_CLASSES) else None
    return {"input": copy.deepcopy(INPUT_SPEC), "classes": classes}


def save_onnx(model: nn.Module, path: Path) -> float:
    """Write ONNX of ``model`` with its BatchNorms folded into its convs and check it with onnxruntime; returns the
    largest output difference to the unfolded PyTorch model (so the check covers the folding too)."""
    try:
        import onnxruntime
    except ImportError:
        raise UserError("ONNX export needs onnx and onnxruntime: pip install 'ranksearch[deploy]'") from None

    model = model.cpu().eval()
    images = torch.randn(4, 3, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated but needs no onnxscript
        torch.onnx.export(
            fold_batchnorm(model), (images,), str(path), dynamo=False, input_names=["images"], output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
        )  # fmt: skip
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": images.numpy()})
    with torch.no_grad():
        return float((torch.from_numpy(logits) - model(images)).abs().max())


def save_torchscript(model: nn.Module, path: Path) -> float:
    """Write TorchScript (traced) of ``model`` with its BatchNorms folded into its convs; returns the largest output
    difference of the saved file to the unfolded PyTorch model (so the check covers the folding too)."""

    model = model.cpu().eval()
    images = torch.randn(4, 3, 32, 32)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        traced = torch.jit.trace(fold_batchnorm(model), images)
        traced.save(str(path))
        return float((torch.jit.load(str(path))(images) - model(images)).abs().max())


def output_paths(out: Path, formats: list[str]) -> dict[str, Path]:
    """Each format's file: ``out`` less a format suffix, plus the format's suffix. The .pt is always written (it is
    the file ``load_model`` reads): ``best.onnx`` with ``onnx`` gives best.onnx and best.pt."""
    named = {suffix: fmt for fmt, suffix in SUFFIXES.items()}.get(out.suffix)
    if named is not None and named not in ("pt", *formats):
        raise UserError(f"--out {out} names a {named} file but --format has no {named}; add it or change --out")
    base = out.with_suffix("") if named else out
    return {fmt: base.with_name(base.name + SUFFIXES[fmt]) for fmt in ["pt", *[f for f in formats if f != "pt"]]}


def check_out(out: Path, formats: list[str]) -> dict[str, Path]:
    """The output files of ``--out``, checked before any slow work: no folder in their place, a writable folder."""
    for path in (out, *output_paths(out, formats).values()):
        if path.is_dir():
            raise UserError(f"--out {path} is a folder; give a file name, such as {path / 'best.pt'}")
    check_writable(out.parent, "the --out folder")
    return output_paths(out, formats)


def parse_formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"--format {text!r}: choose from {', '.join(FORMATS)} (comma-separated)")
    return formats


def _describe(trial: optuna.trial.FrozenTrial, costs: list[str]) -> str:
    ranks = "/".join(str(round(v * 32)) for v in trial.params.values())  # in module order, as drawn
    return f"trial {trial.number} (ranks {ranks} /32, val {trial.values[0]:.2%}, {costs_text(trial, costs)})"


def choose_trial(
    study: optuna.Study, which: str, max_drop_pp: float, objective: str | None = None
) -> optuna.trial.FrozenTrial:
    """``which`` is "best" or a trial number; prints why a "best" trial was picked (the lowest ``objective``)."""
    if which != "best":
        if not which.isdigit():
            raise UserError(f"--trial {which!r}: give a trial number or 'best'")
        return get_trial(study, int(which))
    pick = pick_best(study, max_drop_pp, objective)
    costs = study_objectives(study)[1:]
    print(f"picked {_describe(pick.trial, costs)}: {pick.reason}")
    for alternative in pick.alternatives:
        print(f"  runner-up: {_describe(alternative, costs)}")
    return pick.trial


def _scores(model: nn.Module, data: DeviceData, config: Config) -> dict[str, float]:
    return {f"{split}_accuracy": evaluate(model, data, split, config.eval_batch_size) for split in ("val", "test")}


def export_trial(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, data_dir: str | None, device: torch.device,
    paths: dict[str, Path], finetune_epochs: int = 0, recipe: RefineRecipe | None = None,
    from_scratch_check: bool = False,
) -> dict[str, Path]:  # fmt: skip
    """Rebuild and verify ``trial``'s model, optionally refine it ``finetune_epochs`` epochs by ``recipe`` (resuming
    a killed export's checkpoint) and compare it with its architecture trained from scratch, and write it to
    ``paths`` (format -> file, from ``check_out``). ``recipe``: default ``RefineRecipe()``."""
    config, recipe = study_config(study), recipe or RefineRecipe()
    distilled = finetune_epochs > 0 and recipe.distill_weight > 0
    teacher = study_teacher(study, config, device) if distilled else None
    data_dir = data_dir or study.user_attrs.get("data_dir")
    if data_dir is None:
        raise UserError("the study does not record its data: pass --data-dir")
    data = device_data(dataclasses.replace(config, data_dir=data_dir, download=False), device)
    check_same_data(study, data, data_dir)
    model, source = rebuild_trial(study, trial, config, data)
    verify(model, trial, config, data)
    scores = _scores(model, data, config)
    print(f"trial {trial.number} rebuilt ({source}): val {scores['val_accuracy']:.2%} "
          f"(recorded {trial.values[0]:.2%}), test {scores['test_accuracy']:.2%}")  # fmt: skip
    before, seed, extra = dict(scores), trial_seed(config, trial.number) + 1, {}
    if finetune_epochs > 0:
        use_deterministic_kernels(data.device)  # so that a resumed refine is as close as the device allows
        history = refine(model, data, config, finetune_epochs, seed, recipe, teacher, refine_checkpoint(paths["pt"]))
        scores = _scores(model, data, config)
        print(f"after {finetune_epochs} epochs of refine (lr {recipe.lr:g}, warm-up {recipe.warmup_epochs:g} epochs, "
              f"distill {recipe.distill_weight:g}): val {before['val_accuracy']:.2%} -> {scores['val_accuracy']:.2%}, "
              f"test {before['test_accuracy']:.2%} -> {scores['test_accuracy']:.2%}")  # fmt: skip
        extra["refine"] = {"recipe": dataclasses.asdict(recipe), "epochs": finetune_epochs, "history": history}
    if from_scratch_check:
        extra["from_scratch"] = check_from_scratch(model, data, config, finetune_epochs, seed, scores)
    baseline = study.user_attrs["baseline"]
    macs, params = count_macs(model)
    metadata = {
        "config": config.to_dict(), "study_name": study.study_name, "trial_number": trial.number,
        "ranks": {k.removeprefix("rank_"): v for k, v in trial.params.items()},
        "macs": macs, "params": params,
        "macs_ratio": macs / baseline["macs"], "params_ratio": params / baseline["params"], **scores,
        "finetune_epochs": finetune_epochs, "before_finetune": before, "baseline": baseline, "source": source,
        "input": INPUT_SPEC, "classes": list(data.classes),
        "device": trial.user_attrs.get("device"), "eval_dtype": trial.user_attrs.get("eval_dtype"),  # the trial's
        # where val_accuracy and test_accuracy above were measured (str: torch.__version__ is no plain str)
        "measured_with": {key: str(value) for key, value in precision(data.device).items()},
        **extra,  # refine: recipe, epochs, history; from_scratch: steps, val_accuracy, test_accuracy
    }  # fmt: skip
    save_pt(model, paths["pt"], metadata)
    print(f"wrote {paths['pt']}  (MACs {macs:,} = {metadata['macs_ratio']:.3f}x, params {params:,})")
    if "onnx" in paths:
        print(f"wrote {paths['onnx']}  (onnxruntime vs PyTorch: max |diff| {save_onnx(model, paths['onnx']):.2e})")
    if "torchscript" in paths:
        print(f"wrote {paths['torchscript']}  (max |diff| {save_torchscript(model, paths['torchscript']):.2e})")
    if finetune_epochs > 0:
        refine_checkpoint(paths["pt"]).unlink(missing_ok=True)  # the export is complete: nothing left to resume
    return paths

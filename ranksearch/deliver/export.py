"""Take a trial's model out of a study: pick it, rebuild it exactly, verify it, and write deployable files.

The ``.pt`` file describes itself (weights, config, MACs, params, accuracies, provenance, the input it expects
and its class names); ``load_model`` (in ``ranksearch.deliver.load``) rebuilds the decomposed architecture from
the saved tensors alone.
"""

import copy
import dataclasses
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
from torch import nn

from .. import __version__
from ..data.datasets import DeviceData, device_data
from ..data.inputs import CIFAR10_SHAPE
from ..decompose import decomposed_from_state_dict
from ..models import ranks_text
from ..models.fold import fold_batchnorm
from ..models.measure import count_macs
from ..objectives.latency import SPEED_BATCH, measured_speed
from ..objectives.registry import COSTS, DEFAULT_OBJECTIVES, cost, costs_text, study_objectives
from ..search.trial import trial_bases, trial_model, trial_seed
from ..study.attrs import WEIGHTS_NOT_KEPT, module_of
from ..study.config import Config
from ..study.storage import check_data
from ..study.weights import DamagedWeights, WeightsStore
from ..train.baseline import load_baseline, new_model
from ..train.loops import TrainingDiverged, evaluate, steps_per_epoch
from ..utils.device import precision, resolve_device, use_deterministic_kernels
from ..utils.errors import UserError, first_line
from ..utils.files import atomic_write, atomic_write_set, check_writable, clear_stale_partials, folder_lock
from .load import FILE_KIND, FILE_VERSION
from .refine import RefineRecipe, from_scratch, refine

FORMATS = ("pt", "onnx", "torchscript")
SUFFIXES = {"pt": ".pt", "onnx": ".onnx", "torchscript": ".ts"}
DEFAULT_MAX_DROP = 1.0  # --max-drop: percentage points of val accuracy below the baseline's that 'best' may lose
ACCURACY_TOLERANCE = 0.001  # 0.1 percentage point, as a fraction
OUTPUT_TOLERANCE = 1e-3  # an ONNX / TorchScript file's largest logit difference to PyTorch, times max(1, max |logit|)
# Search fields that ranksearch's first release did not have, with what it did instead, so that a study made
# then re-runs exactly as made: TensorLy HOOI every trial, no refinement, no distillation, no torch.compile, no
# BatchNorm re-estimation, objectives val accuracy and MACs.
BEFORE_FIELD_EXISTED = {
    "decompose_method": "hooi", "refine_iters": 0, "distill_weight": 0.0, "distill_temperature": 4.0,
    "compile": False, "bn_recalibration_batches": 0, "objectives": DEFAULT_OBJECTIVES, "latency_batch": 1,
    "search_space": "module", "decomposition": "tucker2", "svd_layers": False, "activation_images": 512,
    "budget": None, "pruner": "none", "plugins": [], "max_finetune_steps": 0, "reduction_factor": 3,
    "rank_spread": 32, "normalize": "auto",
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
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        raise UserError(f"study {study.study_name!r} has no complete trial yet; run it first")
    floor = study.user_attrs["baseline"]["val_accuracy"] - max_drop_pp / 100
    front = study.best_trials
    check_measured(front, objective, costs)
    front = sorted(front, key=lambda t: (cost(t, objective), -t.values[0], t.number))
    qualified = [t for t in front if t.values[0] >= floor - 1e-12]
    if not qualified:
        listing = "; ".join(f"trial {t.number}: val {t.values[0]:.2%}, {costs_text(t, costs)}" for t in front)
        nearest = max(front, key=lambda t: (t.values[0], -t.number))
        needed = math.ceil((floor + max_drop_pp / 100 - nearest.values[0]) * 1000 - 1e-9) / 10  # pp, rounded up
        raise UserError(
            f"no Pareto trial is within {max_drop_pp} pp of the baseline's val accuracy "
            f"({floor + max_drop_pp / 100:.2%}); front: {listing or 'empty'}; --max-drop {needed:g} takes trial "
            f"{nearest.number} (a short fine-tune's val: export's refine, --finetune-epochs, wins most of it back), "
            "or pick one with --trial N"
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
    study: optuna.Study, trial: optuna.trial.FrozenTrial, config: Config, data: DeviceData, weights: Path | None
) -> tuple[nn.Module, str]:
    """The trial's model with the weights it was evaluated with (kept in ``weights``, the study's weights folder,
    or re-run), and where they came from."""
    model = kept_model(trial, config, data, weights)
    if model is not None:
        return model, "weights kept with the study"
    path = Path(study.user_attrs.get("baseline_path", ""))
    if not path.is_file():
        why = "its weights folder could not be written" if WEIGHTS_NOT_KEPT in trial.user_attrs else (
            "it left the Pareto front")  # fmt: skip
        raise UserError(
            f"trial {trial.number}'s weights were not kept ({why}) and the baseline {path} "
            "needed to re-run its fine-tune is gone; pick a Pareto trial"
        )
    baseline = load_baseline(path, config, data.device)
    ranks = {module_of(name): value for name, value in trial.params.items()}
    seed = trial.user_attrs.get("seed", trial_seed(config, trial.number))
    bases = trial_bases(config, baseline, data)  # what the search truncated: the same cached files
    use_deterministic_kernels(data.device, config.deterministic)  # as the search ran
    model, _ = trial_model(baseline.model, ranks, config, data, seed, bases)
    return model, f"fine-tune re-run from seed {seed}"


def kept_model(trial: optuna.trial.FrozenTrial, config: Config, data: DeviceData, weights: Path | None):
    """The trial's model from its weights kept in ``weights`` (the folder ``storage.weights_folder`` derives from the
    storage, never the path the study records), or None when none were kept or they are damaged (said in a line:
    the fine-tune is then re-run)."""
    if weights is None:
        return None
    try:
        state = WeightsStore(weights).load(trial)
        if state is None:
            return None
        return decomposed_from_state_dict(new_model(config), state).to(data.device)
    except Exception as error:  # unreadable, not a state_dict, or not this trial's shapes
        why = str(error) if isinstance(error, DamagedWeights) else f"{type(error).__name__}: {first_line(error)}"
        print(f"note: trial {trial.number}'s kept weights are damaged ({why}); re-running its fine-tune instead",
              file=sys.stderr)  # fmt: skip
        return None


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
    macs, params = count_macs(model, data.spec.input_size())  # at the data's size, as the trial counted
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


# ----- refining it -----------------------------------------------------------------------------------------------


def refine_checkpoint(pt: Path) -> Path:
    """Where the refine of an export keeps its per-epoch checkpoint: ``<pt>.refine.pt`` beside the .pt."""
    return pt.with_name(pt.name + ".refine.pt")


def study_baseline(study: optuna.Study, config: Config, device: torch.device) -> nn.Module | None:
    """The study's baseline model, or None when its file is gone."""
    recorded = study.user_attrs.get("baseline_path")
    if not recorded or not Path(recorded).is_file():
        return None
    return load_baseline(Path(recorded), config, device).model


def study_teacher(study: optuna.Study, config: Config, device: torch.device) -> nn.Module:
    """The study's baseline, the teacher of a distilled refine; a one-line UserError when its file is gone."""
    baseline = study_baseline(study, config, device)
    if baseline is None:
        raise UserError(
            f"the study's baseline {study.user_attrs.get('baseline_path') or '(not recorded)'}, the teacher of the "
            "refine's distillation, is gone; pass --refine-distill 0 to refine without distillation"
        )
    return baseline


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


def pt_writer(model: nn.Module, metadata: dict) -> Callable[[Path], None]:
    """What writes the self-describing .pt of ``model`` to a file it is given."""
    payload = {
        "kind": FILE_KIND,
        "file_version": FILE_VERSION,
        "ranksearch_version": __version__,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **metadata,
    }
    return lambda partial: torch.save(payload, partial)


def onnx_writer(model: nn.Module, path: Path, input_shape: tuple[int, ...] = CIFAR10_SHAPE) -> Callable[[Path], float]:
    """What writes ONNX of ``model`` with its BatchNorms folded into its convs to a file it is given and checks it
    with onnxruntime on random images of ``input_shape`` (C, H, W: the data's), returning the largest output
    difference to the unfolded PyTorch model (so the check covers the folding too); ``path`` names the file in
    messages."""
    require_onnx()
    import onnxruntime

    model = model.cpu().eval()
    images = torch.randn(4, *input_shape)

    def write(partial: Path) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter is deprecated but needs no onnxscript
            torch.onnx.export(
                fold_batchnorm(model), (images,), str(partial), dynamo=False, input_names=["images"],
                output_names=["logits"], dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            )  # fmt: skip
        session = onnxruntime.InferenceSession(str(partial), providers=["CPUExecutionProvider"])
        (logits,) = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            return check_outputs(torch.from_numpy(logits), model(images), f"ONNX file {path}")

    return write


def save_onnx(model: nn.Module, path: Path, input_shape: tuple[int, ...] = CIFAR10_SHAPE) -> float:
    """Write and check ONNX of ``model`` at ``path`` (``onnx_writer``); returns the largest output difference."""
    return atomic_write(path, onnx_writer(model, path, input_shape))


def torchscript_writer(
    model: nn.Module, path: Path, input_shape: tuple[int, ...] = CIFAR10_SHAPE
) -> Callable[[Path], float]:
    """What writes TorchScript (traced on random images of ``input_shape``, C, H, W: the data's) of ``model`` with
    its BatchNorms folded into its convs to a file it is given, returning the largest output difference of the
    saved file to the unfolded PyTorch model (so the check covers the folding too); ``path`` names the file in
    messages."""
    model = model.cpu().eval()
    images = torch.randn(4, *input_shape)

    def write(partial: Path) -> float:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
            torch.jit.trace(fold_batchnorm(model), images).save(str(partial))
            return check_outputs(torch.jit.load(str(partial))(images), model(images), f"TorchScript file {path}")

    return write


def save_torchscript(model: nn.Module, path: Path, input_shape: tuple[int, ...] = CIFAR10_SHAPE) -> float:
    """Write and check TorchScript of ``model`` at ``path`` (``torchscript_writer``); returns the largest output
    difference."""
    return atomic_write(path, torchscript_writer(model, path, input_shape))


def check_outputs(theirs: torch.Tensor, ours: torch.Tensor, what: str) -> float:
    """The largest |difference| of a written file's logits (``theirs``) to the PyTorch model's (``ours``); a
    UserError (and no file under its name) when it exceeds ``OUTPUT_TOLERANCE`` of the logits' scale."""
    difference = float((theirs - ours).abs().max())
    scale = max(1.0, float(ours.abs().max()))
    if not difference <= OUTPUT_TOLERANCE * scale:  # NaN too
        raise UserError(f"{what} differs from the PyTorch model by {difference:.2e} (more than "
                        f"{OUTPUT_TOLERANCE:g} x {scale:.3g}, the logits' scale); not written: export --format pt, "
                        "and report this")  # fmt: skip
    return difference


def output_paths(out: Path, formats: list[str]) -> dict[str, Path]:
    """Each format's file: ``out`` less a format suffix, plus the format's suffix. The .pt is always written (it is
    the file ``load_model`` reads): ``best.onnx`` with ``onnx`` gives best.onnx and best.pt."""
    named = {suffix: fmt for fmt, suffix in SUFFIXES.items()}.get(out.suffix)
    if named is not None and named not in ("pt", *formats):
        raise UserError(f"--out {out} names a {named} file but --format has no {named}; add it or change --out")
    base = out.with_suffix("") if named else out
    return {fmt: base.with_name(base.name + SUFFIXES[fmt]) for fmt in ["pt", *[f for f in formats if f != "pt"]]}


def check_out(out: Path, formats: list[str], refine: bool = False) -> dict[str, Path]:
    """The output files of ``--out``, checked before any slow work: a file name, no folder in their place (nor in
    the refine's checkpoint's, with ``refine``), no file of another format at that name (it would stay beside
    this export's files, of another trial), a writable folder."""
    if not out.name or out.name == "..":
        raise UserError(f"--out {str(out)!r} names no file; give a file name, such as {out / 'best.pt'}")
    paths = output_paths(out, formats)
    for path in (out, *paths.values()):
        if path.is_dir():
            raise UserError(f"--out {path} is a folder; give a file name, such as {path / 'best.pt'}")
    if refine and refine_checkpoint(paths["pt"]).is_dir():
        raise UserError(f"--out {out}: {refine_checkpoint(paths['pt'])}, where the refine keeps its checkpoint, is "
                        "a folder; remove it or give another --out")  # fmt: skip
    others = [path for fmt, path in sibling_paths(paths["pt"]).items() if fmt not in paths and path.exists()]
    if others:
        formats_text = ",".join(fmt for fmt, path in sibling_paths(paths["pt"]).items() if path in others)
        raise UserError(f"--out {out}: {', '.join(map(str, others))} (an earlier export's?) would stay beside this "
                        f"export's files, of another trial; add {formats_text} to --format, or remove it")  # fmt: skip
    check_writable(out.parent, "the --out folder")
    return paths


def parse_formats(text: str) -> list[str]:
    formats = [f.strip() for f in text.split(",") if f.strip()]
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise UserError(f"--format {text!r}: choose from {', '.join(FORMATS)} (comma-separated)")
    if "onnx" in formats:
        require_onnx()  # before any rebuild, and before any file is written
    return formats


def require_onnx() -> None:
    """A one-line UserError unless onnx and onnxruntime (the ``deploy`` extra) are installed."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise UserError("--format onnx needs onnx and onnxruntime: pip install -e \".[deploy]\" (or "
                        "pip install 'ranksearch[deploy]'), then export again") from None  # fmt: skip


def _describe(trial: optuna.trial.FrozenTrial, costs: list[str]) -> str:
    ranks = ranks_text(trial.params.values())  # in module order, as drawn
    return f"trial {trial.number} (ranks {ranks}, val {trial.values[0]:.2%}, {costs_text(trial, costs)})"


def trial_number(which: str, study: optuna.Study) -> int:
    """``--trial``'s number; a one-line UserError for anything else (a number too long for ``int`` too)."""
    if not (which.isascii() and which.isdigit()):  # "³" is a digit to str.isdigit, not to int()
        raise UserError(f"--trial {which!r}: give a trial number or 'best'")
    digits = which.lstrip("0") or "0"
    if len(digits) > 18:  # no study holds 10**18 trials; int() refuses 4,300 digits and more
        raise UserError(f"--trial {which[:12]}... ({len(digits):,} digits): study {study.study_name!r} has no such "
                        "trial; see `ranksearch report`")  # fmt: skip
    return int(digits)


def choose_trial(
    study: optuna.Study, which: str, max_drop_pp: float | None = None, objective: str | None = None
) -> optuna.trial.FrozenTrial:
    """``which`` is "best" or a trial number; prints why a "best" trial was picked (the lowest ``objective`` within
    ``max_drop_pp``, default ``DEFAULT_MAX_DROP``). Either given where it has no say is refused."""
    chooses = [flag for flag, value in (("--max-drop", max_drop_pp), ("--objective", objective)) if value is not None]
    if which != "best":
        number = trial_number(which, study)
        if chooses:
            they = "they choose" if len(chooses) > 1 else "it chooses"
            raise UserError(f"{' and '.join(chooses)}: {they} the 'best' trial, and do nothing with --trial {number}; "
                            "drop it")  # fmt: skip
        return get_trial(study, number)
    if chooses and len(study.directions) == 1:
        budget = study.user_attrs.get("config", {}).get("budget")
        raise UserError(f"{' and '.join(chooses)}: study {study.study_name!r} is a budget study ({budget}), whose "
                        "'best' trial is its best val accuracy within the budget; drop it")  # fmt: skip
    pick = pick_best(study, DEFAULT_MAX_DROP if max_drop_pp is None else max_drop_pp, objective)
    costs = study_objectives(study)[1:]
    print(f"picked {_describe(pick.trial, costs)}: {pick.reason}")
    for alternative in pick.alternatives:
        print(f"  runner-up: {_describe(alternative, costs)}")
    return pick.trial


def sibling_paths(pt: Path) -> dict[str, Path]:
    """Every format's file of the export whose .pt is ``pt``: the set an export writes (some of) at one name."""
    return output_paths(pt, list(FORMATS))


def clear_litter(pt: Path) -> None:
    """Remove the temporaries that exports to ``pt`` killed mid-write left (of every format, and of the refine's
    checkpoint), saying so."""
    removed = clear_stale_partials([*sibling_paths(pt).values(), refine_checkpoint(pt)])
    if removed:
        names = ", ".join(path.name for path in removed)
        print(f"export: removed what a killed export left: {names}", file=sys.stderr)


def write_files(model: nn.Module, paths: dict[str, Path], metadata: dict, shape: tuple[int, ...]) -> None:
    """Each format's file, as one set (``atomic_write_set``: each written and checked aside, then the earlier
    export's files at this name removed, all of its formats, then these renamed into place): a reader, or a kill,
    never finds one trial's .pt beside another's .onnx. ``shape``: one input image's, for the ONNX and TorchScript
    checks."""
    clear_litter(paths["pt"])
    writers = {paths["pt"]: pt_writer(model, metadata)}
    if "onnx" in paths:
        writers[paths["onnx"]] = onnx_writer(model, paths["onnx"], shape)
    if "torchscript" in paths:
        writers[paths["torchscript"]] = torchscript_writer(model, paths["torchscript"], shape)
    earlier = tuple(path for fmt, path in sibling_paths(paths["pt"]).items() if fmt not in paths)
    differences = atomic_write_set(writers, earlier)
    print(f"wrote {paths['pt']}  (MACs {metadata['macs']:,} = {metadata['macs_ratio']:.3f}x, params "
          f"{metadata['params']:,})")  # fmt: skip
    if "onnx" in paths:
        print(f"wrote {paths['onnx']}  (onnxruntime vs PyTorch: max |diff| {differences[paths['onnx']]:.2e}, "
              f"within {OUTPUT_TOLERANCE:g} x max(1, max |logit|))")  # fmt: skip
    if "torchscript" in paths:
        print(f"wrote {paths['torchscript']}  (max |diff| {differences[paths['torchscript']]:.2e}, within "
              f"{OUTPUT_TOLERANCE:g} x max(1, max |logit|))")  # fmt: skip


def _scores(model: nn.Module, data: DeviceData, config: Config) -> dict[str, float]:
    return {f"{split}_accuracy": evaluate(model, data, split, config.eval_batch_size) for split in ("val", "test")}


def study_data(study: optuna.Study, config: Config, data_dir: str | None, device: torch.device) -> DeviceData:
    """The study's data (``data_dir``, else the folder it records), checked to be what its trials measured."""
    data_dir = data_dir or study.user_attrs.get("data_dir")
    if data_dir is None:
        raise UserError("the study does not record its data: pass --data-dir")
    data = device_data(dataclasses.replace(config, data_dir=data_dir, download=False), device)
    check_data(study, data.identity)
    return data


def rebuilt_and_verified(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, config: Config, data: DeviceData, weights: Path | None
) -> tuple[nn.Module, str, dict[str, float]]:
    """``trial``'s model rebuilt (``rebuild_trial``) and verified against its records, where it came from, and its
    val and test accuracy (said in a line)."""
    model, source = rebuild_trial(study, trial, config, data, weights)
    verify(model, trial, config, data)
    scores = _scores(model, data, config)
    print(f"trial {trial.number} rebuilt ({source}): val {scores['val_accuracy']:.2%} "
          f"(recorded {trial.values[0]:.2%}), test {scores['test_accuracy']:.2%}", flush=True)  # fmt: skip
    return model, source, scores


def refined(
    model: nn.Module, data: DeviceData, config: Config, epochs: int, seed: int, recipe: RefineRecipe,
    teacher: nn.Module | None, checkpoint: Path, before: dict[str, float], hint: str = "pass a --refine-lr below",
) -> tuple[dict[str, float], dict]:  # fmt: skip
    """``model`` refined in place ``epochs`` epochs (resuming ``checkpoint``), its val and test accuracy after (said
    beside ``before``'s), and the record a file keeps of the refine; a refine that diverges is a UserError that
    ends with ``hint`` and the recipe's rate."""
    use_deterministic_kernels(data.device, config.deterministic)  # a resumed refine as close as the device allows
    try:
        history = refine(model, data, config, epochs, seed, recipe, teacher, checkpoint)
    except TrainingDiverged as error:
        raise UserError(f"the refine diverged ({error}); nothing written: {hint} {recipe.lr:g}") from None
    scores = _scores(model, data, config)
    print(f"after {epochs} epochs of refine (lr {recipe.lr:g}, warm-up {recipe.warmup_epochs:g} epochs, "
          f"distill {recipe.distill_weight:g}): val {before['val_accuracy']:.2%} -> {scores['val_accuracy']:.2%}, "
          f"test {before['test_accuracy']:.2%} -> {scores['test_accuracy']:.2%}", flush=True)  # fmt: skip
    return scores, {"recipe": dataclasses.asdict(recipe), "epochs": epochs, "history": history}


def model_metadata(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, config: Config, model: nn.Module, data: DeviceData,
    scores: dict[str, float], before: dict[str, float], source: str, epochs: int, extra: dict,
) -> dict:  # fmt: skip
    """What a written .pt says of its model besides its weights: its config, trial, costs, accuracies (``scores``;
    ``before`` the refine of ``epochs`` epochs), provenance, input and classes, and ``extra`` (refine, ...)."""
    baseline = study.user_attrs["baseline"]
    macs, params = count_macs(model, data.spec.input_size())
    return {
        "config": config.to_dict(), "study_name": study.study_name, "trial_number": trial.number,
        "ranks": {module_of(k): v for k, v in trial.params.items()},
        "macs": macs, "params": params,
        "macs_ratio": macs / baseline["macs"], "params_ratio": params / baseline["params"], **scores,
        "finetune_epochs": epochs, "before_finetune": before, "baseline": baseline, "source": source,
        "input": data.spec.record(), "classes": list(data.spec.classes),  # what the model takes and gives
        "device": trial.user_attrs.get("device"), "eval_dtype": trial.user_attrs.get("eval_dtype"),  # the trial's
        # where val_accuracy and test_accuracy above were measured (str: torch.__version__ is no plain str)
        "measured_with": {key: str(value) for key, value in precision(data.device).items()},
        **extra,  # refine: recipe, epochs, history; from_scratch: steps, val_accuracy, test_accuracy; delivered
    }  # fmt: skip


def write_locked(model: nn.Module, paths: dict[str, Path], metadata: dict, shape: tuple[int, ...]) -> None:
    """``write_files``, one writer at a time per folder: never one trial's .pt beside another's .ts."""
    waiting = f"export: another export is writing into {paths['pt'].parent}; waiting for it (its files, then these)"
    with folder_lock(paths["pt"].parent, waiting):
        write_files(model, paths, metadata, shape)


def export_trial(
    study: optuna.Study, trial: optuna.trial.FrozenTrial, data_dir: str | None, device: torch.device,
    paths: dict[str, Path], finetune_epochs: int = 0, recipe: RefineRecipe | None = None,
    from_scratch_check: bool = False, weights: Path | None = None, speed_batch: int = SPEED_BATCH,
) -> dict[str, Path]:  # fmt: skip
    """Rebuild and verify ``trial``'s model (from its weights kept in the folder ``weights``, or re-run), optionally
    refine it ``finetune_epochs`` epochs by ``recipe`` (resuming a killed export's checkpoint) and compare it with its
    architecture trained from scratch, and write it to ``paths`` (format -> file, from ``check_out``), with its
    speed against the baseline's at batch 1 and ``speed_batch`` measured here. ``recipe``: default
    ``RefineRecipe()``."""
    config, recipe = study_config(study), recipe or RefineRecipe()
    distilled = finetune_epochs > 0 and recipe.distill_weight > 0
    teacher = study_teacher(study, config, device) if distilled else None
    data = study_data(study, config, data_dir, device)
    model, source, scores = rebuilt_and_verified(study, trial, config, data, weights)
    before, seed, extra = dict(scores), trial_seed(config, trial.number) + 1, {}
    if finetune_epochs > 0:
        checkpoint = refine_checkpoint(paths["pt"])
        scores, extra["refine"] = refined(model, data, config, finetune_epochs, seed, recipe, teacher, checkpoint,
                                          before)  # fmt: skip
    if from_scratch_check:
        extra["from_scratch"] = check_from_scratch(model, data, config, finetune_epochs, seed, scores)
    baseline = teacher if teacher is not None else study_baseline(study, config, device)
    extra["speed"] = measured_speed(model, baseline, data.spec.shape(), device, speed_batch)
    metadata = model_metadata(study, trial, config, model, data, scores, before, source, finetune_epochs, extra)
    write_locked(model, paths, metadata, data.spec.shape())
    if finetune_epochs > 0:
        refine_checkpoint(paths["pt"]).unlink(missing_ok=True)  # the export is complete: nothing left to resume
    return paths

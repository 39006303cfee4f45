"""One typed config, resolved once from a YAML file plus command-line flags and passed down."""

import dataclasses
import hashlib
import json
import math
import re
import reprlib
import stat
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..data.inputs import CIFAR10_CLASSES, parse_normalize
from ..decompose import conv_decompositions, factor_methods
from ..models import RANK_STEPS, SEARCH_SPACES, check_model_name, check_rank, check_width
from ..models.user_weights import weights_record
from ..objectives.budget import canonical_budget, parse_budget, rungs
from ..objectives.registry import COSTS, DEFAULT_OBJECTIVES, check_objectives
from ..utils.errors import UserError
from ..utils.plugins import load_plugins, plugin_records, resolved

WORKER_STORAGE_ENV = "RANKSEARCH_WORKER_STORAGE"  # a worker's --storage, set by its parent off its command line (ps)


def default_storage_url(study_name: str) -> str:
    """Where a study lives unless --storage says otherwise."""
    return f"sqlite:///studies/{study_name}.db"


@dataclass
class Config:
    # model
    model: str = "vgg16"  # the model registry's name: vgg11, vgg16, resnet20, resnet56, resnet18, torchvision:<name>
    width: float = 1.0  # channel multiplier (1.0 = the standard 64..512 channels)
    num_classes: int = 10  # classes in the dataset; unset in the file and flags: the data's own count
    # data
    data_dir: str = "data"  # an ImageFolder tree (train/, test/; any size, any classes) or torchvision's CIFAR-10
    download: bool = True  # fetch torchvision's CIFAR-10 into data_dir when it holds none
    val_size: int = 5000  # images held out of the training set; the search measures these
    split_seed: int = 0  # seed of the train / val split
    normalize: str = "auto"  # per-channel mean/std of the inputs (of pixel / 255): "auto" (CIFAR-10's at 32x32,
    # else the training images' own), "data" (their own), "cifar10", "imagenet" (torchvision's pretrained models'),
    # or "M1,M2,M3/S1,S2,S3"; with --weights, what they were trained with
    batch_size: int = 128  # training images per step
    eval_batch_size: int = 1000  # images per evaluation forward pass
    data_memory_share: float = 0.25  # decoded images up to this share of the RAM (and of a GPU's memory), over all
    # the workers' copies, are held in memory; larger datasets are streamed in batches from a memory-mapped file
    # beside the images (ranksearch.data.stream), with the same batches; 0: always streamed
    # the baseline: the user's trained weights, or pretrained here
    weights: str | None = None  # the model's trained weights (a state_dict file, or a checkpoint holding one): the
    # baseline, measured on the data, with no pretraining (ranksearch.models.user_weights); a study records its SHA-256
    pretrain_epochs: int = 30  # epochs over the training split
    min_baseline_accuracy: float | None = None  # a run stops when the baseline's val accuracy is under this (None:
    # chance + 10 points, 1 / num_classes + 0.1; 0: never), since its compressed models would be measured on noise
    pretrain_lr: float = 0.1  # peak learning rate of the one-cycle schedule, per batch of batch_size
    momentum: float = 0.9  # SGD (Nesterov) momentum, pretraining and fine-tuning
    weight_decay: float = 5e-4  # L2 penalty on all weights
    label_smoothing: float = 0.1  # cross-entropy label smoothing, pretraining and fine-tuning
    baseline_dir: str = "studies/baselines"  # cached baselines, one file per config hash
    # trials
    finetune_steps: int = 200  # SGD steps after decomposition in each trial
    finetune_lr: float = 0.01  # initial fine-tune learning rate
    finetune_schedule: str = "cosine"  # "cosine" (to 0) or "constant"
    decomposition: str = "tucker2"  # what k x k convs become: "tucker2" (Kim et al.) or "cp" (Lebedev et al.)
    svd_layers: bool = False  # also search ranks of 1x1 convs and linear layers, decomposed by truncated SVD
    decompose_method: str = "hosvd"  # "hosvd" (cached bases, truncated), "hosvd+refine", "hooi" (partial_tucker), or
    # "activation": factors that reproduce each layer's outputs on real training images (every decomposition); better
    # right after decomposition, worse after a 1-epoch refine at 10x (BENCHMARKS.md, "Data-aware factors")
    activation_images: int = 512  # training images whose layer statistics the "activation" method uses (cached)
    refine_iters: int = 2  # HOOI sweeps after the HOSVD start, for "hosvd+refine"
    distill_weight: float = 0.0  # knowledge distillation from the baseline in the fine-tune: 0 = off, 1 = KD only
    distill_temperature: float = 4.0  # softmax temperature of the distillation loss
    bn_recalibration_batches: int = 0  # training batches that re-estimate BatchNorm statistics after decomposition
    compile: bool = False  # torch.compile the fine-tuned model (pays a compile per trial: for GPUs)
    deterministic: bool = True  # GPU only: deterministic cuDNN convolutions in trials and exports, so that export
    # can re-run a trial's fine-tune to its weights; false: cuDNN's autotuned (fastest, not bit-reproducible) ones,
    # pretraining included (benchmarks/gpu.sh measures the difference)
    rank_min: float = 1 / RANK_STEPS  # smallest normalized rank the search may pick (on the 1/32 grid)
    rank_max: float = 1.0  # largest normalized rank the search may pick (on the 1/32 grid)
    rank_spread: int = 4  # each module's rank is at least 1/rank_spread of the vector's largest (rounded up to the
    # grid): no module starved at 1-2/32 while the others are high, where half the sampler's draws went (issue 25,
    # BENCHMARKS.md); 32: no limit
    search_space: str = "module"  # one rank per module of the model's grouping ("module") or per eligible conv
    # search
    objectives: list[str] = field(default_factory=lambda: list(DEFAULT_OBJECTIVES))  # accuracy, then 1-2 costs
    latency_batch: int = 1  # images per forward pass when latency (median ms on the trial's device) is measured
    sampler: str = "gp"  # "gp" (Optuna's Gaussian process: ahead of TPE at 40 trials, BENCHMARKS.md), "tpe"
    # (independent TPE), "tpe-multivariate", "nsga2" (its population a fifth of --trials, 8..50) or "random"
    budget: str | None = None  # "COST=FRACTION" (e.g. macs=0.1): maximise val accuracy with that cost at or under
    # FRACTION of the baseline's, a single-objective study whose every vector meets the budget
    # (ranksearch.search.samplers)
    pruner: str = "halving"  # budget mode only: a trial's fine-tune goes on in rungs (finetune_steps, x3, x9: see
    # max_finetune_steps) and "halving" (successive halving) lets about the best 1/reduction_factor of the trials at
    # each rung go on, "hyperband" runs brackets of it, "none" runs every trial to the top rung
    # (ranksearch.search.samplers)
    max_finetune_steps: int | None = None  # budget mode: the top rung's fine-tune steps (None: finetune_steps x
    # reduction_factor^2; 0: the fine-tune alone, no rungs); the study's best is chosen there
    reduction_factor: int = 3  # budget mode: each rung has this many times the steps of the one before
    seed: int = 0  # seeds the sampler, the pretraining and each trial's fine-tune
    trials: int = 200  # trials a `run` adds to the study
    study_name: str = "vgg16-cifar10"  # Optuna study name; unset, "<model>-cifar10" or "<model>-<data folder>"
    storage: str | None = None  # Optuna storage URL; default sqlite:///studies/<study_name>.db
    device: str = "auto"  # "auto" (cuda when available), "cpu" or "cuda"
    enqueue_ranks: list[list[float]] = field(default_factory=list)  # rank vectors to try first
    # then these before the sampler's draws (WARM_STARTS: "vbmf", "uniform", "sensitivity"; [] for none), see
    # warmstart and sensitivity (allocations from single-module curves, measured first when missing): the uniform
    # sweep first, then TPE, beat TPE alone at every budget in BENCHMARKS.md ("Samplers at equal budget")
    warm_start: list[str] = field(default_factory=lambda: ["uniform"])
    weights_dir: str | None = None  # server storages only: the Pareto trials' weights (default
    # studies/<study_name>-weights); a SQLite study keeps them beside its database, <db folder>/<study_name>-weights
    # workers
    workers: int = 1  # processes on this machine adding trials to the study (GPU i mod G; CPU cores split)
    threads: int = 0  # torch (OpenMP) threads of each process; 0: torch's default for one process, the cores split
    # among workers (a machine shared with other work: lower it, or every process slows 10-20x)
    heartbeat_seconds: int = 60  # a trial whose worker is silent for 2x this is failed and retried (RDB storage)
    # delivery: the refined model a run hands over (ranksearch.deliver)
    deliver: str | None = None  # "COST=F1,F2,...": a multi-objective run delivers its best trial at or under each
    # fraction F of the baseline's COST; a budget run delivers at its budget unless "none"; unset: no delivery
    # without a budget
    deliver_top: int = 1  # the best trials (by val at the top rung) the delivery refines; the best refined val wins.
    # 1: in issue 25's three deliveries the top-rung best won each time, and a longer refine paid more than a second
    # candidate (BENCHMARKS.md, "The delivered model")
    deliver_epochs: int = 10  # epochs of the refine (export's recipe: rewind+kd) each of them gets; 0: none
    deliver_out: str | None = None  # the delivered .pt (default <the study's folder>/<study_name>-delivered.pt)
    deliver_formats: list[str] = field(default_factory=lambda: ["pt"])  # and "onnx", "torchscript", as export
    # extensions
    plugins: list[str] = field(default_factory=list)  # Python files (or modules) imported first, each registering
    # a model, a decomposition or a cost (ranksearch.utils.plugins); a study and an export record each by content
    # ({"name": "x.py", "sha256": ...}), and later commands import one only when it is passed again
    ranks_source = "config key enqueue_ranks"  # not a field: what set enqueue_ranks, as errors name it ("--ranks")

    def storage_url(self) -> str:
        return self.storage or default_storage_url(self.study_name)

    def weights_path(self) -> Path:
        """The folder of the study's kept weights (``storage.weights_folder``: beside a SQLite database)."""
        from .storage import weights_folder  # the storage's module, which imports this one

        return weights_folder(self.storage_url(), self.study_name, self.weights_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def budget_cost(self) -> str:
        """The cost the budget limits (macs, params, latency); budget mode only."""
        return parse_budget(self.budget)[0]

    def rung_steps(self) -> list[int]:
        """The fine-tune's step counts at the end of each rung (``objectives.budget.rungs``): budget mode's rungs, else
        the fine-tune alone."""
        if self.budget is None:
            return [self.finetune_steps]
        return rungs(self.finetune_steps, self.max_finetune_steps, self.reduction_factor)

    def budget_ratio(self) -> float:
        """The budget as a fraction of the baseline's cost; budget mode only."""
        return parse_budget(self.budget)[1]


# Fields that change what a trial measures; a resumed study must agree on all of them.
RUN_CONTROL = {
    "data_dir", "download", "trials", "study_name", "storage", "device", "enqueue_ranks", "baseline_dir",
    "weights_dir", "workers", "threads", "heartbeat_seconds", "warm_start", "data_memory_share", "weights",
    "deterministic", "min_baseline_accuracy",
    "deliver", "deliver_top", "deliver_epochs", "deliver_out", "deliver_formats",
}  # fmt: skip
RUNG_FIELDS = ("max_finetune_steps", "reduction_factor")  # budget mode's: a study without a budget records neither
PRETRAIN_FIELDS = ("pretrain_epochs", "pretrain_lr")  # pretraining's alone: a study from --weights records neither
BASELINE_FIELDS = (
    "model", "width", "num_classes", "val_size", "split_seed", "batch_size",
    "pretrain_epochs", "pretrain_lr", "momentum", "weight_decay", "label_smoothing", "seed",
)  # fmt: skip
MEASURED_WEIGHTS_FIELDS = ("model", "width", "num_classes", "val_size", "split_seed")  # the user's weights' baseline
WARM_STARTS = ("vbmf", "uniform", "sensitivity")  # rank vectors a run may queue first (ranksearch.search.warmstart)
SAMPLERS = ("tpe", "tpe-multivariate", "gp", "nsga2", "random")
CHOICES = {
    "finetune_schedule": ("cosine", "constant"),
    "sampler": SAMPLERS,
    "pruner": ("halving", "hyperband", "none"),
    "device": ("auto", "cpu", "cuda"),
    "decompose_method": factor_methods,  # a callable: read from the registry when checked (plugins add to it)
    "decomposition": conv_decompositions,
    "search_space": SEARCH_SPACES,
}


def search_fields(config: Config) -> dict:
    """The config values that define a study: everything but run control; plugins as their records (by content,
    so that a plugin file moved elsewhere is the same study)."""
    fields = {k: v for k, v in config.to_dict().items() if k not in RUN_CONTROL}
    if config.budget is None:  # they change nothing then (and 0.9.0's multi-objective studies resume)
        fields = {k: v for k, v in fields.items() if k not in RUNG_FIELDS}
    if config.normalize == "auto":  # what every study before it did: unrecorded, so that they resume
        fields.pop("normalize")
    if config.weights is not None:  # the baseline is the user's: its digest, and no pretraining
        fields = {k: v for k, v in fields.items() if k not in PRETRAIN_FIELDS} | {
            "weights": weights_record(config.weights)
        }
    return fields | {"plugins": plugin_records(config.plugins)}


def unregistered(fields: dict, uses: tuple[str, ...] = ("model", "decomposition", "costs")) -> list[str]:
    """What a recorded config (a study's) names that nothing in this process registers, among its ``uses``:
    ``model 'x'``, ``decomposition 'y'`` (or its method), ``cost 'z'`` (its objectives'): a plugin's, not passed."""
    names = []
    if "model" in uses and "model" in fields:
        try:
            check_model_name(str(fields.get("model")))
        except ValueError:
            names.append(f"model {fields.get('model')!r}")
    if "decomposition" in uses:
        if fields.get("decomposition", "tucker2") not in conv_decompositions():
            names.append(f"decomposition {fields.get('decomposition')!r}")
        if fields.get("decompose_method", "hooi") not in factor_methods():
            names.append(f"decompose method {fields.get('decompose_method')!r}")
    if "costs" in uses:
        names += [f"cost {name!r}" for name in fields.get("objectives", DEFAULT_OBJECTIVES)[1:] if name not in COSTS]
    return names


def baseline_key(config: Config, data_identity: dict) -> str:
    """Hash of the fields that define the pretrained baseline, and of the data and split it is trained on; for the
    user's weights, of the model, the data and split it is measured on, and the file's digest."""
    values = {k: getattr(config, k) for k in BASELINE_FIELDS} | {"data": data_identity}
    if config.weights is not None:
        values = {k: getattr(config, k) for k in MEASURED_WEIGHTS_FIELDS} | {
            "data": data_identity, "weights": weights_record(config.weights),
        }  # fmt: skip
    if config.normalize != "auto":  # the keys of baselines made before it existed stay theirs
        values["normalize"] = config.normalize
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:12]


def _coerce(name: str, value, kind):
    """Check a file or flag value against the field's type."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise UserError(f"config key {name!r} must be a finite float, got {reprlib.repr(value)}") from None
    what = getattr(kind, "__name__", None)
    if kind == int | None:
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise UserError(f"config key {name!r} must be int or null, got {reprlib.repr(value)}")
        return value
    if kind == float | None:
        if value is None:
            return None
        return _coerce(name, value, float)
    if kind == str | None:
        kind, what = (str, type(None)), "text or null"
    elif kind == list[str]:
        if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
            raise UserError(f"config key {name!r} must be a list of names, got {reprlib.repr(value)}")
        return value
    elif kind == list[list[float]]:
        if not (isinstance(value, list) and all(isinstance(r, list) for r in value)):
            raise UserError(f"config key {name!r} must be a list of rank lists, got {reprlib.repr(value)}")
        try:
            return [[float(v) for v in ranks] for ranks in value]
        except (TypeError, ValueError, OverflowError):
            raise UserError(f"config key {name!r} must hold numbers, got {reprlib.repr(value)}") from None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        quoted = " (text: write the number without quotes)" if kind in (int, float) and isinstance(value, str) else ""
        raise UserError(f"config key {name!r} must be {what}, got {reprlib.repr(value)}{quoted}")
    return value


CONFIG_MAX_BYTES = 1 << 20  # a config is a few dozen lines; a larger file is not one (/dev/zero filled the memory)


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats (``1e30``, ``1e-3``: PyYAML's YAML 1.1 reads a float without a
    dot as text) and duplicate keys refused (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_lines: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    seen = first_lines.get(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if seen is not None:
                    where = f"line {line}" if seen == line else f"lines {seen} and {line}"
                    raise DuplicateKey(f"key {reprlib.repr(key)} is set twice ({where}); keep one")
                first_lines[key] = line
        return super().construct_mapping(node, deep)


_EXPONENT_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")  # 1e30, 1.0e30
_ConfigLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789."))


class DuplicateKey(yaml.YAMLError):
    """A mapping that sets one key twice."""


def read_config_file(path: str | Path) -> dict:
    """The mapping in the YAML file ``path``: a regular file of at most ``CONFIG_MAX_BYTES``, UTF-8, each key once;
    a one-line UserError otherwise."""
    try:
        status = Path(path).stat()
        if not stat.S_ISREG(status.st_mode):
            raise UserError(f"config {path} is not a regular file; pass a YAML file")
        if status.st_size > CONFIG_MAX_BYTES:
            raise UserError(f"config {path} has {status.st_size:,} bytes, over the {CONFIG_MAX_BYTES:,} a config may "
                            "have; pass a YAML file of keys and values")  # fmt: skip
        with open(path, "rb") as file:
            text = file.read(CONFIG_MAX_BYTES + 1).decode("utf-8-sig")
        values = yaml.load(text, Loader=_ConfigLoader) or {}
    except OSError as error:
        raise UserError(f"cannot read config {path}: {error.strerror}; pass an existing --config file") from None
    except UnicodeDecodeError as error:
        raise UserError(f"config {path} is not UTF-8 text (byte {error.start}); pass a YAML file") from None
    except yaml.YAMLError as error:
        first_line = str(error).partition("\n")[0]
        raise UserError(f"config {path} is not valid YAML: {first_line}") from None
    except RecursionError:
        raise UserError(f"config {path} nests too deeply; pass a flat YAML mapping of keys to values") from None
    if not isinstance(values, dict):
        raise UserError(f"config {path} must be a mapping of keys to values")
    return values


def load_config(path: str | Path | None, overrides: dict | None = None) -> Config:
    """Config from a YAML file (or the defaults), then ``overrides`` (flags set on the command line)."""
    values = read_config_file(path) if path is not None else {}
    flags = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(flags)
    fields = {f.name: f.type for f in dataclasses.fields(Config)}
    unknown = sorted(reprlib.repr(k) for k in values if k not in fields)  # quoted: a YAML key may be any text
    if unknown:
        raise UserError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {', '.join(fields)}")
    config = Config(**{k: _coerce(k, v, fields[k]) for k, v in values.items()})
    if "enqueue_ranks" in flags:
        config.ranks_source = "--ranks"
    config.plugins = [resolved(p) for p in config.plugins]
    load_plugins(config.plugins)  # before the checks: a plugin's model, decomposition or cost is a valid choice
    classes = data_class_names(config.data_dir)
    if "study_name" not in values:  # a study per model and dataset unless named: resnet20-cifar10, vgg16-flowers
        config.study_name = default_study_name(config.model, config.data_dir, classes)
    if "num_classes" not in values:  # the data's (an explicit num_classes is checked against the data instead)
        config.num_classes = len(classes)
    validate(config)
    _check_given(config, set(values), set(flags))
    return config


def _given_as(key: str, flags: set[str]) -> str:
    """How the user set ``key``: its flag, or its config file key."""
    return f"--{key.replace('_', '-')}" if key in flags else f"config key {key}"


def _check_given(config: Config, given: set[str], flags: set[str]) -> None:
    """Refuse a key the user set (by flag or config file) that this config does not use: a study records it, and it
    would refuse every later run without it."""
    if "pruner" in given and config.budget is None:
        raise UserError(f"{_given_as('pruner', flags)} applies to budget mode only (--budget COST=FRACTION); "
                        "drop it or set a budget")  # fmt: skip
    for key in ("max_finetune_steps", "reduction_factor"):
        if key in given and config.budget is None:
            raise UserError(f"{_given_as(key, flags)} applies to budget mode only (its rungs; --budget "
                            "COST=FRACTION); drop it or set a budget")  # fmt: skip
    delivers = config.deliver != "none" and (config.budget is not None or config.deliver is not None)
    flags_of = {"deliver_out": "--out", "deliver_formats": "--format", "deliver_top": "--deliver-top",
                "deliver_epochs": "--deliver-epochs"}  # fmt: skip
    unused = [flags_of[key] if key in flags else f"config key {key}" for key in flags_of if key in given]
    if unused and not delivers:
        raise UserError(f"{', '.join(unused)}: this run delivers no model (it does with --budget COST=FRACTION, or "
                        "--deliver COST=F1,F2 with objectives); drop it or ask for a delivery")  # fmt: skip
    pretraining = [_given_as(key, flags) for key in PRETRAIN_FIELDS if key in flags]
    if pretraining and config.weights is not None:
        raise UserError(f"{', '.join(pretraining)}: with --weights the baseline is your weights, not pretrained; "
                        "drop it")  # fmt: skip
    if "latency_batch" in given and "latency" not in config.objectives:
        raise UserError(f"{_given_as('latency_batch', flags)} applies when latency is measured (--objectives "
                        "accuracy,latency or --budget latency=FRACTION); drop it or measure latency")  # fmt: skip


def data_class_names(data_dir: str) -> list[str]:
    """The class names of the data in ``data_dir`` (its class folders), read without decoding it; CIFAR-10's when
    it holds no data yet (what --download fetches)."""
    from ..data.datasets import data_classes  # torch and numpy, loaded by the models anyway

    return data_classes(data_dir) or list(CIFAR10_CLASSES)


def default_study_name(model: str, data_dir: str, classes: list[str]) -> str:
    """``<model>-cifar10`` for CIFAR-10 (its classes), else ``<model>-<data folder>``: a study per model and dataset
    (``torchvision:resnet18`` as ``torchvision-resnet18``; characters a study name cannot hold as ``-``)."""
    data = "cifar10" if sorted(classes) == sorted(CIFAR10_CLASSES) else Path(data_dir).expanduser().resolve().name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{model}-{data}").strip("-._")
    return name[:STUDY_NAME_MAX].rstrip("-._") if name else "study"


def _on_grid(name: str, value: float) -> float:
    try:
        return check_rank(value)
    except ValueError as error:
        raise UserError(f"{name}: {error}") from None


SEED_MAX = 2**32 - 1  # numpy and Optuna's samplers take seeds in 0..2**32-1
COUNT_MAX = 2**31 - 1  # a larger size or count is a typo (and overflows 32-bit indices)
LATENCY_BATCH_MAX = 4096  # images per timed forward pass: more times the memory, not the deployment
LR_MAX = 10.0  # a learning rate above is a typo: SGD diverges far below it (and 1e30 overflowed into a traceback)
WEIGHT_DECAY_MAX = 1.0  # at 1, each step at lr 0.1 shrinks every weight by a tenth; 1e300 overflowed float32
TEMPERATURE_MAX = 100.0  # softmax temperature: above, every softened output is uniform and T^2 scales the loss up


@dataclass(frozen=True)
class Interval:
    """The values a numeric field allows: low..high, each end included unless it is open."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"


RANGES = {
    "width": Interval(0, 16, low_open=True),  # 16: 8,192 channels in VGG's widest conv
    "num_classes": Interval(1, COUNT_MAX),
    "val_size": Interval(1, COUNT_MAX),
    "split_seed": Interval(0, SEED_MAX),
    "batch_size": Interval(1, COUNT_MAX),
    "eval_batch_size": Interval(1, COUNT_MAX),
    "pretrain_epochs": Interval(0, COUNT_MAX),
    "pretrain_lr": Interval(0, LR_MAX, low_open=True),
    "momentum": Interval(0, 1, high_open=True),
    "weight_decay": Interval(0, WEIGHT_DECAY_MAX),
    "data_memory_share": Interval(0, 1),
    "min_baseline_accuracy": Interval(0, 1),
    "label_smoothing": Interval(0, 1, high_open=True),
    "finetune_steps": Interval(0, COUNT_MAX),
    "reduction_factor": Interval(2, 100),
    "rank_spread": Interval(1, RANK_STEPS),
    "deliver_top": Interval(1, 100),
    "deliver_epochs": Interval(0, 1000),  # as export's --finetune-epochs
    "finetune_lr": Interval(0, LR_MAX, low_open=True),
    "refine_iters": Interval(0, COUNT_MAX),
    "activation_images": Interval(1, COUNT_MAX),
    "bn_recalibration_batches": Interval(0, COUNT_MAX),
    "latency_batch": Interval(1, LATENCY_BATCH_MAX),
    "distill_weight": Interval(0, 1),
    "distill_temperature": Interval(0, TEMPERATURE_MAX, low_open=True),
    "seed": Interval(0, SEED_MAX),
    "trials": Interval(1, COUNT_MAX),
    "workers": Interval(1, 256),
    "threads": Interval(0, 1024),
    "heartbeat_seconds": Interval(1, 3600),
}


STUDY_NAME_MAX = 100  # a study name names files: studies/<name>.db, <name>-weights/
STUDY_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{STUDY_NAME_MAX - 1}}}")


def check_study_name(name: str) -> str:
    """``name`` when it is a name: letters, digits, ``.``, ``_``, ``-``, starting with a letter or digit, at most 100
    characters (it becomes file names, so no ``/``, ``..``, hidden or empty names); a one-line UserError otherwise."""
    if not isinstance(name, str) or not STUDY_NAME.fullmatch(name):
        raise UserError(f"study name {reprlib.repr(name)} is not a name: use 1-100 letters, digits, '.', '_' or '-', "
                        "starting with a letter or digit (it names studies/<name>.db)")  # fmt: skip
    return name


def validate(config: Config) -> None:
    check_study_name(config.study_name)
    if config.weights_dir is not None:
        config.weights_path()  # a weights_dir is for server storages only (study.weights_folder refuses it)
    for name, choices in CHOICES.items():
        choices = choices() if callable(choices) else choices
        if getattr(config, name) not in choices:
            raise UserError(f"{name} must be one of {', '.join(choices)}, got {reprlib.repr(getattr(config, name))}")
    try:
        check_width(check_model_name(config.model), config.width)
    except ValueError as error:
        raise UserError(str(error)) from None
    for name, value in config.to_dict().items():
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{name} must be a finite number, got {value}")
    if not all(math.isfinite(r) for ranks in config.enqueue_ranks for r in ranks):
        raise UserError(f"enqueue_ranks must hold ranks k/{RANK_STEPS}, got {reprlib.repr(config.enqueue_ranks)}")
    if config.trials < 1:
        raise UserError(f"--trials must be at least 1, got {config.trials}")
    for name, allowed in RANGES.items():
        if getattr(config, name) is not None and getattr(config, name) not in allowed:
            raise UserError(f"{name} must be {allowed}, got {getattr(config, name)}")
    config.objectives = check_objectives(config.objectives)
    try:
        parse_normalize(config.normalize)
    except ValueError as error:
        raise UserError(str(error)) from None
    config.rank_min = _on_grid("rank_min", config.rank_min)
    config.rank_max = _on_grid("rank_max", config.rank_max)
    if config.rank_min > config.rank_max:
        raise UserError(f"rank_min {config.rank_min} is above rank_max {config.rank_max}")
    config.enqueue_ranks = [[_on_grid(config.ranks_source, r) for r in ranks] for ranks in config.enqueue_ranks]
    _check_warm_start(config)
    _check_budget(config)
    _check_rungs(config)
    _check_delivery(config)


def _check_rungs(config: Config) -> None:
    top = config.max_finetune_steps
    if top is not None and top != 0 and not config.finetune_steps <= top <= COUNT_MAX:
        raise UserError(f"max_finetune_steps must be 0 (no rungs), null (finetune_steps x reduction_factor^2) or "
                        f"from finetune_steps ({config.finetune_steps}) to {COUNT_MAX}, got {top}")  # fmt: skip


DELIVER_FORMATS = ("pt", "onnx", "torchscript")  # export's


def parse_deliver(text: str) -> tuple[str, list[float]]:
    """``macs=0.2,0.1`` as ("macs", [0.2, 0.1]): a cost and fractions of the baseline's, each in (0, 1]."""
    name, sep, values = text.partition("=")
    try:
        fractions = [float(v) for v in values.split(",")]
    except ValueError:
        fractions = []
    if not sep or not fractions or not all(0 < f <= 1 for f in fractions):
        raise UserError(f"--deliver must be COST=F1,F2,... with fractions in (0, 1] of the baseline's cost (e.g. "
                        f"--deliver macs=0.2,0.1), or none; got {text!r}")  # fmt: skip
    return name.strip(), sorted(set(fractions), reverse=True)


def _check_delivery(config: Config) -> None:
    """What a run delivers: at its budget (budget mode), at ``deliver``'s fractions of one of its costs, or nothing."""
    unknown = [f for f in config.deliver_formats if f not in DELIVER_FORMATS]
    if unknown or not config.deliver_formats:
        raise UserError(f"--format must name {', '.join(DELIVER_FORMATS)} (comma-separated), got "
                        f"{reprlib.repr(config.deliver_formats)}")  # fmt: skip
    if config.deliver in (None, "none"):
        return
    if config.budget is not None:
        raise UserError(f"--deliver {config.deliver}: a budget run delivers its best model at its budget "
                        f"({config.budget}); drop --deliver (or pass --deliver none for no delivery)")  # fmt: skip
    cost, _ = parse_deliver(config.deliver)
    if cost not in config.objectives[1:]:
        raise UserError(f"--deliver {config.deliver}: {cost} is none of this run's costs "
                        f"({', '.join(config.objectives[1:])}); deliver at one of them")  # fmt: skip


def _check_budget(config: Config) -> None:
    """A budget names a cost and a fraction (checked); its cost is measured, so it joins the objectives."""
    if config.budget is None:
        return
    config.budget = canonical_budget(config.budget)
    cost = config.budget_cost()
    if cost not in config.objectives:
        if len(config.objectives) == 3:
            objectives = ",".join(config.objectives)
            raise UserError(f"budget {config.budget}: {cost} must be one of the objectives {objectives}")
        config.objectives = [*config.objectives, cost]


def _check_warm_start(config: Config) -> None:
    unknown = [kind for kind in config.warm_start if kind not in WARM_STARTS]
    if unknown:
        valid, got = " or ".join(WARM_STARTS), reprlib.repr(unknown[0])
        raise UserError(f"warm_start must name {valid} (e.g. --warm-start vbmf,uniform; --warm-start none for none), "
                        f"got {got}")  # fmt: skip
    if "vbmf" in config.warm_start and config.decomposition != "tucker2":
        raise UserError(f"warm start vbmf estimates Tucker-2 ranks, not {config.decomposition}'s; use uniform")

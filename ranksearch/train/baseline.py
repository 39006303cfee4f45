"""The pretrained baseline: trained once per config, cached on disk, reused by every trial."""

import hashlib
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.datasets import DeviceData
from ..decompose import Bases, model_bases
from ..models import build_model
from ..models.measure import count_macs
from ..models.user_weights import check_weights, digest_text, weights_record
from ..study.config import Config, baseline_key
from ..utils.device import use_deterministic_kernels
from ..utils.errors import UserError, first_line
from ..utils.files import atomic_save, check_writable, keyed_cache, lock_path, read_or_make
from ..utils.interrupts import Interrupted
from ..utils.steps import CPU_CONFIG, PaceNote, clock_text, step_progress
from .loops import TrainingDiverged, evaluate, prepare, pretrain, steps_per_epoch


@dataclass
class Baseline:
    model: nn.Module
    val_accuracy: float  # fraction of the validation split
    test_accuracy: float  # fraction of the test split
    macs: int  # at one input of the data's size (``DeviceData.spec``)
    params: int  # conv and linear weights and biases
    pretrain_seconds: float  # 0 when read from the cache
    path: Path = Path()  # its checkpoint (the cache file)

    def metrics(self) -> dict:
        return {
            "val_accuracy": self.val_accuracy,
            "test_accuracy": self.test_accuracy,
            "macs": self.macs,
            "params": self.params,
        }


def baseline_path(config: Config, data_identity: dict) -> Path:
    """The cached baseline of ``config`` trained on the data (and split) of ``data_identity``."""
    model = config.model.replace(":", "-")  # torchvision:resnet18 -> torchvision-resnet18
    kind = "-weights" if config.weights is not None else ""  # the user's weights, measured
    return Path(config.baseline_dir) / f"{model}-w{config.width:g}{kind}-{baseline_key(config, data_identity)}.pt"


def new_model(config: Config) -> nn.Module:
    return build_model(config.model, num_classes=config.num_classes, width=config.width, svd_layers=config.svd_layers)


def _as_ranked_by(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A baseline's ``state_dict`` with ``model``'s rank buffers: a baseline is shared by configs with and without
    the SVD switch (which ranks 1x1 convs and linear layers), and an undecomposed layer's rank is 1.0."""
    expected = model.state_dict()
    kept = {k: v for k, v in state_dict.items() if k in expected or not k.endswith(".rank")}
    return {**{k: torch.ones(()) for k in expected if k.endswith(".rank") and k not in kept}, **kept}


def load_baseline(path: Path, config: Config, device: torch.device, data_identity: dict | None = None) -> Baseline:
    """The checkpoint at ``path``; with ``data_identity``, it must have been trained on that data."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        model = new_model(config)
        model.load_state_dict(_as_ranked_by(model, saved["state_dict"]))
        metrics = saved["metrics"]
        trained_on = saved.get("data")
    except Exception as error:
        raise UserError(
            f"baseline checkpoint {path} is unreadable ({type(error).__name__}); delete it to pretrain again"
        ) from None
    if data_identity is not None and trained_on != data_identity:
        raise UserError(
            f"baseline checkpoint {path} was trained on other data ({trained_on} vs {data_identity}); "
            "delete it to pretrain again"
        )
    return Baseline(prepare(model, device), **metrics, pretrain_seconds=0.0, path=path)


def _save(path: Path, baseline: Baseline, config: Config, data_identity: dict) -> None:
    payload = {
        "state_dict": {k: v.cpu() for k, v in baseline.model.state_dict().items()},
        "metrics": baseline.metrics(),
        "config": config.to_dict(),
        "data": data_identity,  # what it was trained and measured on
        "weights": None if config.weights is None else weights_record(config.weights),  # the user's, or pretrained
    }
    atomic_save(payload, path)  # never a half-written checkpoint under the real name


def check_input(model: nn.Module, config: Config, data: DeviceData) -> None:
    """``model`` takes one image of the data's size (a forward pass on zeros); a one-line UserError if not."""
    shape = "x".join(map(str, data.spec.shape()))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(data.spec.input_size(), device=next(model.parameters()).device))
    except RuntimeError as error:
        raise UserError(
            f"model {config.model} cannot take the data's {shape} images ({first_line(error)}); use larger "
            "images or another model (vgg needs at least 32x32)"
        ) from None
    finally:
        model.train()


PRETRAINING_KIND = "ranksearch-pretraining"
PRETRAINING_KEYS = {"model", "epochs_done", "optimizer", "scheduler", "generator", "torch_rng"}  # what resumes it
CHECKPOINT_SECONDS = 60.0  # a pretraining's state is saved after an epoch once this long has passed since the last
# save (and after the first epoch): a GPU's 3-s epochs do not each pay a 120-MB write


def pretraining_checkpoint(path: Path) -> Path:
    """Where the pretraining of the baseline ``path`` keeps its state between epochs, until the baseline is saved."""
    return path.with_name(path.stem + ".pretraining")


def read_pretraining(checkpoint: Path) -> dict | None:
    """The state kept at ``checkpoint`` (weights, optimizer, schedule, generators, epochs done), or None: none there,
    or one that cannot be read (said in a line; the pretraining starts from the first epoch)."""
    if not checkpoint.is_file():
        return None
    try:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if saved.get("kind") != PRETRAINING_KIND or saved.get("name") != checkpoint.name:
            raise ValueError("not this baseline's pretraining")
        if not PRETRAINING_KEYS <= saved.keys():
            raise KeyError(f"missing {sorted(PRETRAINING_KEYS - saved.keys())}")
    except Exception as error:
        print(f"baseline: ignoring the unreadable pretraining checkpoint {checkpoint} ({type(error).__name__}); "
              "pretraining from the first epoch", file=sys.stderr, flush=True)  # fmt: skip
        return None
    return saved


class EpochCheckpoints:
    """``pretrain``'s ``after_epoch``: the state after an epoch saved to ``checkpoint`` (atomically), after the
    first epoch and then once ``CHECKPOINT_SECONDS`` have passed since the last save; ``epochs_kept`` says how many
    epochs the file holds."""

    def __init__(self, checkpoint: Path):
        self.checkpoint, self.model, self.epochs_kept = checkpoint, None, 0  # the model: set by ``train_baseline``
        self.last = -math.inf

    def __call__(self, state: dict) -> None:
        if time.monotonic() - self.last < CHECKPOINT_SECONDS:
            return
        weights = {name: tensor.detach().cpu() for name, tensor in self.model.state_dict().items()}
        atomic_save({"kind": PRETRAINING_KIND, "name": self.checkpoint.name, "model": weights, **state},
                    self.checkpoint)  # fmt: skip
        self.last, self.epochs_kept = time.monotonic(), state["epochs_done"]


def train_baseline(config: Config, data: DeviceData, checkpoints: EpochCheckpoints | None = None) -> Baseline:
    """The baseline pretrained; ``checkpoints``: its state kept after epochs, and resumed from when there is one."""
    torch.manual_seed(config.seed)
    if not config.deterministic:  # else cuDNN's default choice of algorithms, as the baseline always had
        use_deterministic_kernels(data.device, deterministic=False)
    model = prepare(new_model(config), data.device)
    check_input(model, config, data)  # before any training
    per_epoch = steps_per_epoch(data, config.batch_size)
    total = config.pretrain_epochs * per_epoch
    saved = None
    if checkpoints is not None:
        checkpoints.model = model
        saved = read_pretraining(checkpoints.checkpoint)
    if saved is not None:
        model.load_state_dict(saved["model"])
        checkpoints.epochs_kept = saved["epochs_done"]
        print(f"baseline: resuming its pretraining at epoch {saved['epochs_done'] + 1}/{config.pretrain_epochs} from "
              f"{checkpoints.checkpoint}", file=sys.stderr, flush=True)  # fmt: skip
    else:
        print(f"baseline: pretraining {config.pretrain_epochs} epochs ({total:,} steps) on {data.device.type}; "
              "cached for later runs", file=sys.stderr, flush=True)  # fmt: skip
    start = time.perf_counter()
    first = saved["epochs_done"] * per_epoch if saved is not None else 0
    progress = step_progress("baseline: pretraining", total, first)  # a bar on a terminal, else a line every 30 s
    if data.device.type == "cpu":
        progress = PaceNote(progress, total - first, pretraining_pace_text)
    try:
        pretrain(model, data, config, progress=progress, resume=saved, after_epoch=checkpoints)
    except TrainingDiverged as error:  # the config's rates: a user's choice, one line
        raise UserError(f"baseline pretraining diverged: {error}; pretrain_lr is {config.pretrain_lr} "
                        f"(weight_decay {config.weight_decay})") from None  # fmt: skip
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    macs, params = count_macs(model, data.spec.input_size())
    return Baseline(
        model,
        evaluate(model, data, "val", config.eval_batch_size),
        evaluate(model, data, "test", config.eval_batch_size),
        macs,
        params,
        seconds,
    )


def check_baseline_source(config: Config) -> None:
    """Where the baseline will come from is usable, before any other work (else a one-line UserError): the user's
    ``--weights`` fit ``config``'s model, or pretraining has an epoch (0 would search an untrained network)."""
    if config.weights is not None:
        check_weights(config, new_model(config))
    elif config.pretrain_epochs == 0:
        raise UserError("--pretrain-epochs 0 would search an untrained network; pretrain at least 1 epoch, or pass "
                        "--weights FILE with your trained model")  # fmt: skip


CHANCE_MARGIN = 0.10  # a baseline under chance + this (10 points) has learnt too little to compress


def check_baseline_worth(config: Config, baseline: Baseline) -> None:
    """A one-line UserError when the baseline's val accuracy is under ``config.min_baseline_accuracy`` (default:
    chance + ``CHANCE_MARGIN``): every compressed model of it would measure noise. 0 goes on whatever it is."""
    chance = 1 / config.num_classes
    floor = config.min_baseline_accuracy
    floor = chance + CHANCE_MARGIN if floor is None else floor
    if baseline.val_accuracy >= floor:
        return
    where = ("check --normalize (what the weights were trained with) and the data" if config.weights is not None
             else "train it longer (--pretrain-epochs) or check the data")  # fmt: skip
    against = (f"within {CHANCE_MARGIN * 100:.0f} points of chance ({chance:.2%} for {config.num_classes} classes)"
               if config.min_baseline_accuracy is None else f"under --min-baseline-accuracy {floor:g}")  # fmt: skip
    raise UserError(f"the baseline's val accuracy {baseline.val_accuracy:.2%} is {against}: its compressed models "
                    f"would be measured on noise; {where}, or pass --min-baseline-accuracy 0 to go on")  # fmt: skip


def measure_weights(config: Config, data: DeviceData) -> Baseline:
    """The baseline of the user's weights (``config.weights``): loaded into the model, measured on val and test."""
    model = prepare(check_weights(config, new_model(config)), data.device)
    check_input(model, config, data)
    print(f"baseline: your weights {config.weights} ({digest_text(weights_record(config.weights))}), no pretraining; "
          "measuring them on val and test", file=sys.stderr, flush=True)  # fmt: skip
    macs, params = count_macs(model, data.spec.input_size())
    val = evaluate(model, data, "val", config.eval_batch_size)
    return Baseline(model, val, evaluate(model, data, "test", config.eval_batch_size), macs, params, 0.0)


def _weights_key(model: nn.Module) -> str:
    """A digest of the conv weights: the bases cache belongs to exactly these weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.endswith(".weight") and tensor.dim() == 4:
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cached_bases(model: nn.Module, checkpoint: Path) -> dict[str, Bases]:
    """The channel bases of the baseline's convs, computed once and cached beside its checkpoint (by one process
    when several start at once: the others wait for its file)."""
    device = next(model.parameters()).device
    return keyed_cache(
        checkpoint.with_suffix(".bases.pt"), _weights_key(model), "bases", lambda: model_bases(model),
        encode=lambda bases: {name: (u_out.cpu(), u_in.cpu()) for name, (u_out, u_in) in bases.items()},
        decode=lambda saved: {name: (u_out.to(device), u_in.to(device)) for name, (u_out, u_in) in saved.items()},
        what="channel bases",
    )  # fmt: skip


def pretraining_interrupted(checkpoints: EpochCheckpoints) -> str:
    """What Ctrl-C during pretraining kept, and what the next command does."""
    if checkpoints.epochs_kept:
        kept = "epoch is" if checkpoints.epochs_kept == 1 else f"{checkpoints.epochs_kept} epochs are"
        return (f"interrupted while pretraining the baseline; its first {kept} kept in {checkpoints.checkpoint}, and "
                "the next command that needs it resumes from there; no trial ran")
    return ("interrupted while pretraining the baseline: no epoch of it was kept, and no trial ran; the next command "
            "that needs it pretrains it from the first epoch")


def pretraining_pace_text(seconds: float) -> str:
    """The line a CPU pretraining that would take over an hour says once, after its first steps."""
    return (f"note: at this pace the pretraining takes about {clock_text(seconds)} on this CPU; {CPU_CONFIG} is "
            "sized for a CPU (--config configs/cpu.yaml), and Ctrl-C keeps the epochs done for the next command")


def ensure_baseline(config: Config, data: DeviceData, quiet: bool = False) -> Baseline:
    """The cached baseline for ``config`` and ``data``, pretraining it first when there is none; ``quiet``: no
    lines about it (a worker, whose parent said them).

    The baseline folder's write-ability is checked before pretraining, so no training is lost to a failed save.
    Processes started together pretrain it once: one holds ``<checkpoint>.lock`` while it trains and saves, the
    others wait, then load its checkpoint.
    """
    path = baseline_path(config, data.identity)

    def read() -> Baseline | None:
        if not path.exists():
            return None
        baseline = load_baseline(path, config, data.device, data.identity)
        if not quiet:
            print(f"baseline: {path} (cached)", file=sys.stderr)
        return baseline

    def save(baseline: Baseline) -> None:
        try:
            _save(path, baseline, config, data.identity)
        except (OSError, RuntimeError) as error:
            raise UserError(
                f"cannot save the baseline to {path} ({first_line(error)}); free space or fix baseline_dir"
            ) from None

    def make() -> Baseline:
        check_writable(path.parent, "baseline_dir")
        if config.weights is not None:
            baseline = measure_weights(config, data)
            save(baseline)
            baseline.path = path
            print(f"baseline: your weights measured, cached as {path}", file=sys.stderr)
            return baseline
        checkpoints = EpochCheckpoints(pretraining_checkpoint(path))
        try:
            baseline = train_baseline(config, data, checkpoints)
            save(baseline)
        except KeyboardInterrupt:  # from its first line on (a Ctrl-C just after it was said too)
            raise Interrupted(pretraining_interrupted(checkpoints)) from None
        checkpoints.checkpoint.unlink(missing_ok=True)  # the baseline is saved: its epochs are not needed
        baseline.path = path
        print(f"baseline: pretrained in {baseline.pretrain_seconds:.0f} s, saved to {path}", file=sys.stderr)
        return baseline

    waiting = f"baseline: another process is pretraining it (holds {lock_path(path)}); waiting for its checkpoint"
    baseline = read_or_make(path, read, make, waiting)
    if not quiet:
        print(f"baseline: val {baseline.val_accuracy:.2%}  test {baseline.test_accuracy:.2%}  "
              f"MACs {baseline.macs:,}  params {baseline.params:,}", file=sys.stderr)  # fmt: skip
    return baseline

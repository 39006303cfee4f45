"""Refining an exported model: epochs of fine-tuning with learning-rate rewinding and distillation, a checkpoint per
epoch (a killed refine resumes to the same weights), and the from-scratch check of what the baseline was worth.

A refine's rate is a pure function of the global step (``lr_factor``) and each epoch draws its batches from a
generator of its own (``epoch_seed``), so a checkpoint needs only the weights, the optimizer state and the number
of epochs done.
"""

import copy
import dataclasses
import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..data.datasets import DeviceData
from ..study.config import Config
from ..train.loops import evaluate, one_cycle, sgd, steps_per_epoch, train_steps
from ..utils.files import atomic_save
from ..utils.steps import draws_bars, step_progress

CHECKPOINT_KIND = "ranksearch-refine"
WARMUP_START = 0.1  # the warm-up starts at this fraction of the peak rate


@dataclass(frozen=True)
class RefineRecipe:
    lr: float = 0.05  # peak learning rate per batch of batch_size (SGD Nesterov, the config's momentum and decay)
    warmup_epochs: float = 0.3  # linear warm-up from lr/10 to lr ("learning-rate rewinding"), then cosine to 0
    distill_weight: float = 0.9  # logit distillation from the baseline (config.distill_temperature); 0 = off


RECIPES = {
    "short": RefineRecipe(lr=0.01, warmup_epochs=0, distill_weight=0.0),  # export before refine.py: the trial's
    "rewind": RefineRecipe(distill_weight=0.0),  # fine-tune recipe (cosine from finetune_lr), longer
    "rewind+kd": RefineRecipe(),
}


# ----- the schedule and the batches ------------------------------------------------------------------------------


def warmup_steps(recipe: RefineRecipe, per_epoch: int, total: int) -> int:
    """Steps of warm-up: ``recipe.warmup_epochs`` of epochs, rounded, leaving at least one step of cosine."""
    return max(0, min(round(recipe.warmup_epochs * per_epoch), total - 1))


def lr_factor(step: int, total: int, warmup: int) -> float:
    """The fraction of the peak rate at global step ``step`` (0-based) of ``total``: a linear rise from
    ``WARMUP_START`` over ``warmup`` steps, then a half cosine from 1 that would reach 0 at step ``total``."""
    if step < warmup:
        return WARMUP_START + (1 - WARMUP_START) * step / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s batches (0-based), so that a resumed refine draws an uninterrupted one's."""
    digest = hashlib.sha256(json.dumps(["refine", seed, epoch]).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: manual_seed takes it


# ----- the checkpoint --------------------------------------------------------------------------------------------


def refine_key(model: nn.Module, config: Config, epochs: int, seed: int, recipe: RefineRecipe, per_epoch: int) -> str:
    """A digest of what makes one refine: the starting weights, epochs, seed, recipe and the config's training
    fields. A checkpoint resumes only a refine with the same key."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    fields = ("batch_size", "momentum", "weight_decay", "label_smoothing", "distill_temperature")
    setting = {
        "epochs": epochs, "seed": seed, "recipe": dataclasses.asdict(recipe), "steps_per_epoch": per_epoch,
        **{name: getattr(config, name) for name in fields},
    }  # fmt: skip
    digest.update(json.dumps(setting, sort_keys=True).encode())
    return digest.hexdigest()


def _note(text: str) -> None:
    print(f"refine: {text}", file=sys.stderr, flush=True)


def read_checkpoint(path: Path, key: str) -> dict | None:
    """The checkpoint at ``path`` when it belongs to the refine of ``key``; else None, saying why (one line)."""
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("kind") != CHECKPOINT_KIND:
            raise ValueError("not a refine checkpoint")
        found = saved["key"], saved["epochs_done"], saved["history"], saved["model"], saved["optimizer"]
    except Exception as error:
        _note(f"ignoring the unreadable checkpoint {path} ({type(error).__name__}); starting from epoch 1")
        return None
    if found[0] != key:
        _note(f"ignoring the checkpoint {path}: it is of another refine (other weights, epochs, seed or recipe); "
              "starting from epoch 1 and overwriting it")  # fmt: skip
        return None
    return saved


def _save_checkpoint(
    path: Path, key: str, done: int, history: list[dict], model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    payload = {"kind": CHECKPOINT_KIND, "key": key, "epochs_done": done, "history": history, "model": state,
               "optimizer": optimizer.state_dict()}  # fmt: skip
    atomic_save(payload, path)


# ----- progress --------------------------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar over steps on a terminal; otherwise a line every 30 s (``StepLines``) and one per epoch with its
    val accuracy; nothing when ``show`` is False."""

    def __init__(self, show: bool, epochs: int, per_epoch: int, first: int):
        self.epochs, self.first, self.start = epochs, first, time.perf_counter()
        self.lines = show and not draws_bars()  # and a line per epoch, with its val accuracy
        self.bar = step_progress("refine", epochs * per_epoch, first * per_epoch) if show else None

    def epoch_started(self, epoch: int) -> None:
        if self.bar is not None and not self.lines:
            self.bar.set_description(f"refine epoch {epoch + 1}/{self.epochs}")

    def epoch_done(self, record: dict) -> None:
        val = record["val_accuracy"]
        measured = f"val {val:.2%}" if val is not None else f"loss {record['loss']:.4f}"
        if self.bar is not None and not self.lines:
            self.bar.set_postfix_str(measured)
        if self.lines:
            done = record["epoch"]
            elapsed = time.perf_counter() - self.start
            left = elapsed / (done - self.first) * (self.epochs - done)
            _note(f"epoch {done}/{self.epochs}, {measured}, {elapsed / 60:.1f} min, {left / 60:.1f} min left")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ----- refine and the from-scratch check -------------------------------------------------------------------------


def _resume(checkpoint: Path, key: str, epochs: int, model: nn.Module, optimizer: torch.optim.Optimizer) -> list[dict]:
    """The history of this refine's checkpoint, its weights and optimizer state loaded; [] when there is none."""
    saved = read_checkpoint(checkpoint, key)
    if saved is None:
        return []
    model.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    done = len(saved["history"])
    if done < epochs:
        _note(f"resuming at epoch {done + 1}/{epochs} from {checkpoint}")
    else:
        _note(f"all {epochs} epochs were done: the weights are {checkpoint}'s")
    return saved["history"]


def refine(
    model: nn.Module, data: DeviceData, config: Config, epochs: int, seed: int,
    recipe: RefineRecipe = RefineRecipe(), teacher: nn.Module | None = None, checkpoint: Path | None = None,
    progress: bool | None = None, evaluate_each_epoch: bool = True,
) -> list[dict]:  # fmt: skip
    """Train ``model`` in place for ``epochs`` epochs of ``recipe``; returns one record per epoch,
    ``{"epoch": k, "loss": mean loss of its last <= 50 steps, "val_accuracy": fraction or None}``.

    ``teacher`` (the baseline) is needed when ``recipe.distill_weight`` > 0. ``checkpoint``: a file saved after
    each epoch; one of this refine (same starting weights, epochs, seed, recipe) is resumed after its last epoch,
    bit for bit on the CPU; the caller deletes it when done. ``progress``: False for silence; else a bar on a
    terminal, a line per epoch on stderr otherwise.
    """
    if recipe.distill_weight > 0 and teacher is None:
        raise ValueError(f"distill_weight {recipe.distill_weight} needs a teacher (the baseline); pass one or use 0")
    if recipe.distill_weight > 0:
        teacher.eval()
    per_epoch = steps_per_epoch(data, config.batch_size)
    total, config = epochs * per_epoch, dataclasses.replace(config, distill_weight=recipe.distill_weight)
    warmup = warmup_steps(recipe, per_epoch, total)
    optimizer = sgd(model, recipe.lr, config)
    key = refine_key(model, config, epochs, seed, recipe, per_epoch) if checkpoint is not None else ""
    history = _resume(checkpoint, key, epochs, model, optimizer) if checkpoint is not None else []
    shown = _Progress(progress is not False, epochs, per_epoch, len(history))
    try:
        for epoch in range(len(history), epochs):
            shown.epoch_started(epoch)
            offset = epoch * per_epoch  # the global step of the epoch's first
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s, offset=offset: lr_factor(offset + s, total, warmup)
            )
            generator = torch.Generator().manual_seed(epoch_seed(seed, epoch))
            loss = train_steps(model, data, optimizer, scheduler, per_epoch, config, generator,
                               progress=shown.bar, teacher=teacher if recipe.distill_weight > 0 else None)  # fmt: skip
            val = evaluate(model, data, "val", config.eval_batch_size) if evaluate_each_epoch else None
            history.append({"epoch": epoch + 1, "loss": loss, "val_accuracy": val})
            if checkpoint is not None:
                _save_checkpoint(checkpoint, key, epoch + 1, history, model, optimizer)
            shown.epoch_done(history[-1])
    finally:
        shown.close()
    return history


def reinitialised(model: nn.Module, seed: int) -> nn.Module:
    """A deep copy of ``model`` with every parameter drawn afresh (``reset_parameters`` of each submodule, seeded)
    and BatchNorm running statistics reset; buffers such as ranks are kept."""
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, module in fresh.named_modules():
            if hasattr(module, "reset_parameters"):  # a BatchNorm's also resets its running statistics
                module.reset_parameters()
            elif any(True for _ in module.parameters(recurse=False)):
                raise ValueError(f"cannot re-initialise {name or 'the model'} ({type(module).__name__}): it holds "
                                 "parameters but has no reset_parameters()")  # fmt: skip
    return fresh


def from_scratch(model: nn.Module, data: DeviceData, config: Config, steps: int, seed: int) -> nn.Module:
    """The from-scratch check: ``model``'s architecture with new weights, trained ``steps`` steps with the baseline's
    recipe (one-cycle at ``config.pretrain_lr``, no teacher). A compressed model that does not beat it gains
    nothing from its baseline. ``model`` is untouched."""
    fresh = reinitialised(model, seed)
    print(f"from scratch: training the same architecture from new weights for {steps:,} steps", file=sys.stderr,
          flush=True)  # fmt: skip
    progress = step_progress("from scratch", steps)  # a bar on a terminal, else a line every 30 s
    try:
        one_cycle(fresh, data, config, steps, seed, progress=progress)
    finally:
        progress.close()
    return fresh

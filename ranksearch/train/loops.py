"""Training loops: baseline pretraining (one-cycle) and the brief per-trial fine-tune (cosine / constant)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..data.datasets import DeviceData
from ..models.measure import predict_correct
from ..study.config import Config
from ..utils.device import autocast
from ..utils.interrupts import interruption_point


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def sgd(model: nn.Module, lr: float, config: Config) -> torch.optim.SGD:
    """The optimizer of every training loop here: SGD with Nesterov momentum and weight decay from ``config``."""
    return torch.optim.SGD(
        model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay, nesterov=True
    )


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s KD term: T^2 * KL(teacher || student) on temperature-softened logits."""
    log_student = F.log_softmax(student.float() / temperature, dim=1)
    log_teacher = F.log_softmax(teacher.float() / temperature, dim=1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature**2


def train_steps(
    model: nn.Module,
    data: DeviceData,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    steps: int,
    config: Config,
    generator: torch.Generator,
    progress=None,
    teacher: nn.Module | None = None,
) -> float:
    """Run ``steps`` SGD steps; return the mean loss of the last ones. No host sync inside the loop.

    With a ``teacher`` (in eval mode), the loss mixes in distillation by ``config.distill_weight``.
    """
    model.train()
    forward = torch.compile(model) if config.compile else model
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    batches = data.train_batches(config.batch_size, generator)
    recent = torch.zeros((), device=data.device)
    window = max(1, min(50, steps))
    alpha = config.distill_weight if teacher is not None else 0.0
    for step in range(steps):
        interruption_point()  # Ctrl-C / SIGTERM during a trial stops it here
        images, labels = next(batches)
        with autocast(data.device):
            logits = forward(images)
            loss = criterion(logits, labels)
            if alpha > 0:
                with torch.no_grad():
                    target = teacher(images)
                kd = distillation_loss(logits, target, config.distill_temperature)
                loss = (1 - alpha) * loss + alpha * kd
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step >= steps - window:
            recent = recent + loss.detach().float()
        if getattr(progress, "takes_loss", False):  # StepLines (or a PaceNote around it)
            progress.update(1, loss.detach())  # read only when it prints a line
        elif progress is not None:
            progress.update(1)
    mean_loss = float(recent) / window if steps else 0.0
    if not math.isfinite(mean_loss):
        raise TrainingDiverged(f"training loss became {mean_loss} (try a lower learning rate)")
    return mean_loss


def steps_per_epoch(data: DeviceData, batch_size: int) -> int:
    return max(1, data.size("train") // batch_size)


def one_cycle(model: nn.Module, data: DeviceData, config: Config, steps: int, seed: int, progress=None,
              resume: dict | None = None, after_epoch=None) -> float:  # fmt: skip
    """The baseline's recipe for ``steps`` steps: one-cycle to ``config.pretrain_lr``, batches drawn from ``seed``;
    returns the final loss. It runs epoch by epoch, the same batches as in one go (an epoch's draws all come from
    the generator after the one before's).

    ``after_epoch(state)``: called after each whole epoch with what resumes the training after it
    (``pretrain_state``); ``resume``: such a state (its model weights already loaded), from which the training goes
    on as it would have.
    """
    if steps == 0:
        return 0.0
    optimizer = sgd(model, config.pretrain_lr, config)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.pretrain_lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    per_epoch, done, loss = steps_per_epoch(data, config.batch_size), 0, 0.0
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        generator.set_state(resume["generator"])
        torch.set_rng_state(resume["torch_rng"])
        done = resume["epochs_done"] * per_epoch
    while done < steps:
        count = min(per_epoch, steps - done)
        loss = train_steps(model, data, optimizer, scheduler, count, config, generator, progress)
        done += count
        if after_epoch is not None and count == per_epoch:
            after_epoch(pretrain_state(done // per_epoch, optimizer, scheduler, generator))
    return loss


def pretrain(model: nn.Module, data: DeviceData, config: Config, progress=None, resume: dict | None = None,
             after_epoch=None) -> float:  # fmt: skip
    """Train the baseline for ``pretrain_epochs`` with a one-cycle schedule (``one_cycle``: ``resume`` and
    ``after_epoch`` as there); returns the final loss."""
    steps = config.pretrain_epochs * steps_per_epoch(data, config.batch_size)
    return one_cycle(model, data, config, steps, config.seed, progress, resume, after_epoch)


def pretrain_state(epochs_done: int, optimizer, scheduler, generator: torch.Generator) -> dict:
    """What resumes a pretraining after ``epochs_done`` epochs, with the model's weights: the optimizer's and the
    schedule's states, the batches' generator and torch's global one (dropout), all loadable with weights_only."""
    return {"epochs_done": epochs_done, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "generator": generator.get_state(), "torch_rng": torch.get_rng_state()}  # fmt: skip


def finetune(
    model: nn.Module, data: DeviceData, config: Config, seed: int, teacher: nn.Module | None = None, progress=None,
    steps: int | None = None,
) -> float:  # fmt: skip
    """The brief fine-tune of a decomposed model: ``steps`` (default ``finetune_steps``) of SGD, cosine or constant
    rate from ``finetune_lr``.

    ``teacher`` (the baseline, in eval mode) is used when ``config.distill_weight`` > 0; ``progress.update(1)`` is
    called after each step.
    """
    steps = config.finetune_steps if steps is None else steps
    if steps == 0:
        return 0.0
    optimizer = sgd(model, config.finetune_lr, config)
    if config.finetune_schedule == "cosine":
        factor = lambda step: 0.5 * (1 + math.cos(math.pi * step / steps))  # noqa: E731
    else:
        factor = lambda step: 1.0  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    generator = torch.Generator().manual_seed(seed)
    return train_steps(model, data, optimizer, scheduler, steps, config, generator, progress, teacher)


def recalibrate_batchnorm(model: nn.Module, data: DeviceData, batches: int, batch_size: int, seed: int) -> None:
    """Re-estimate every BatchNorm's running mean and variance as a plain average over ``batches`` augmented
    training batches, weights untouched: a decomposed layer's outputs no longer have the statistics the baseline's
    BatchNorm layers recorded."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if batches == 0 or not norms:
        return
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average of the batches seen
    model.train()
    source = data.train_batches(batch_size, torch.Generator().manual_seed(seed))
    with torch.no_grad(), autocast(data.device):
        for _ in range(batches):
            model(next(source)[0])
    for norm, momentum in zip(norms, momenta, strict=True):
        norm.momentum = momentum


def evaluate(model: nn.Module, data: DeviceData, split: str, batch_size: int, every: int = 1) -> float:
    """Top-1 accuracy (fraction) on ``split`` ("val" or "test"); ``every`` > 1: on every that-many-th image."""
    with autocast(data.device):
        return predict_correct(model, data.eval_batches(split, batch_size, every))

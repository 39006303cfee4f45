import copy
import dataclasses
import math

import pytest
import torch
from torch import nn

from ranksearch.data.datasets import DeviceData, load_dataset
from ranksearch.study.config import CHOICES, Config
from ranksearch.train import loops as train_module
from ranksearch.train.loops import distillation_loss, finetune, recalibrate_batchnorm


def test_distillation_loss_is_zero_for_identical_logits_and_positive_otherwise():
    logits = torch.randn(8, 10)
    assert float(distillation_loss(logits, logits, 4.0)) < 1e-6
    assert float(distillation_loss(logits, torch.randn(8, 10), 4.0)) > 0


def test_distillation_loss_is_finite_and_decreases_on_a_tiny_model():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    student = nn.Linear(16, 10)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    inputs = torch.randn(256, 16)
    with torch.no_grad():
        targets = teacher(inputs)
    losses = []
    for _ in range(100):
        loss = distillation_loss(student(inputs), targets, Config().distill_temperature)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]


# ----- BatchNorm recalibration, distillation and the schedules of the fine-tune ----------------------------------


@pytest.fixture(scope="module")
def tiny_data(tiny_imagefolder) -> DeviceData:
    return DeviceData(load_dataset(tiny_imagefolder), val_size=20, split_seed=0, device=torch.device("cpu"))


def conv_bn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(6, 10))  # fmt: skip


def test_batchnorm_recalibration_takes_the_statistics_of_the_batches_it_runs_on(tiny_data):
    model = conv_bn(seed=0)
    conv, norm = model[0], model[1]
    norm.running_mean.fill_(5.0)  # statistics of other data, as a decomposed layer's BatchNorm has them
    norm.running_var.fill_(0.01)
    weights = {k: v.clone() for k, v in model.state_dict().items() if "running" not in k and "batches" not in k}
    batches, batch_size, seed = 4, 16, 7
    recalibrate_batchnorm(model, tiny_data, batches, batch_size, seed)

    source = tiny_data.train_batches(batch_size, torch.Generator().manual_seed(seed))  # the same batches again
    with torch.no_grad():
        features = [conv(next(source)[0]) for _ in range(batches)]  # (B, C, H, W) each
    means = torch.stack([f.mean(dim=(0, 2, 3)) for f in features])  # (batches, C)
    variances = torch.stack([f.transpose(0, 1).flatten(1).var(dim=1) for f in features])  # unbiased, (batches, C)
    torch.testing.assert_close(norm.running_mean, means.mean(0))  # a plain average over the batches
    torch.testing.assert_close(norm.running_var, variances.mean(0))
    assert int(norm.num_batches_tracked) == batches and norm.momentum == 0.1  # the momentum is put back
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # weights untouched

    # in eval mode the BatchNorm now centres what it was recalibrated on (before: far off centre)
    model.eval()
    with torch.no_grad():
        normalized = torch.cat([norm(f) for f in features]).mean(dim=(0, 2, 3))
    torch.testing.assert_close(normalized, norm.bias.detach(), atol=1e-4, rtol=0)

    untouched = conv_bn(seed=0)
    before = copy.deepcopy(untouched.state_dict())
    recalibrate_batchnorm(untouched, tiny_data, 0, batch_size, seed)  # no batches: nothing to re-estimate
    assert all(torch.equal(v, untouched.state_dict()[k]) for k, v in before.items())


def test_recalibration_restores_eval_mode_accuracy_after_the_statistics_went_wrong(tiny_data):
    """A model whose BatchNorm statistics no longer fit its layers (as after decomposition) predicts as it did
    once recalibrated on the data."""
    model = conv_bn(seed=1)
    config = dataclasses.replace(Config(), batch_size=16, finetune_steps=150, finetune_lr=0.1, label_smoothing=0.0)
    finetune(model, tiny_data, config, seed=0)  # 0.6-0.7 of the training images right (seeds 0-3)
    recalibrate_batchnorm(model, tiny_data, 12, 16, seed=0)
    model.eval()
    images = tiny_data.normalize(tiny_data.splits["train"].images)
    with torch.no_grad():
        calibrated = model(images)
        model[1].running_mean.add_(3.0)
        broken = model(images)
    recalibrate_batchnorm(model, tiny_data, 12, 16, seed=0)
    model.eval()
    with torch.no_grad():
        again = model(images)
    assert not torch.allclose(broken, calibrated, atol=0.1)
    torch.testing.assert_close(again, calibrated)  # the same batches: the same statistics, the same outputs
    labels = tiny_data.splits["train"].labels
    accuracy = lambda logits: float((logits.argmax(1) == labels).float().mean())  # noqa: E731
    assert accuracy(again) > accuracy(broken) + 0.2  # broken: about chance (0.1)


def teacher_gap(student: nn.Module, teacher: nn.Module, images: torch.Tensor) -> float:
    """KL(teacher || student) of their softened outputs on ``images``: how far the student is from the teacher."""
    with torch.no_grad():
        return float(distillation_loss(student.eval()(images), teacher.eval()(images), 4.0))


def sharp_teacher(seed: int) -> nn.Module:
    teacher = conv_bn(seed)
    with torch.no_grad():
        teacher[-1].weight.mul_(20)  # confident logits: a softened distribution far from uniform
    return teacher.eval()


def test_a_distilled_finetune_moves_the_student_toward_its_teacher(tiny_data):
    config = dataclasses.replace(Config(), batch_size=16, finetune_steps=40, finetune_lr=0.05, distill_weight=1.0)
    images = tiny_data.normalize(tiny_data.splits["train"].images)
    teacher, other = sharp_teacher(10), sharp_teacher(11)
    start = conv_bn(seed=2)
    distilled, plain, to_other = copy.deepcopy(start), copy.deepcopy(start), copy.deepcopy(start)
    finetune(distilled, tiny_data, config, seed=0, teacher=teacher)
    finetune(plain, tiny_data, config, seed=0)  # no teacher: cross-entropy only
    finetune(to_other, tiny_data, config, seed=0, teacher=other)
    assert teacher_gap(distilled, teacher, images) < 0.5 * teacher_gap(start, teacher, images)
    assert teacher_gap(distilled, teacher, images) < 0.5 * teacher_gap(plain, teacher, images)
    assert teacher_gap(to_other, other, images) < teacher_gap(distilled, other, images)  # each follows its own

    off = copy.deepcopy(start)
    finetune(off, tiny_data, dataclasses.replace(config, distill_weight=0.0), seed=0, teacher=teacher)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in off.state_dict().items())  # weight 0: unused


FINETUNE_RATES = {  # the rate of each of 20 steps at finetune_lr 0.1, then the rate after the last
    "cosine": [0.1 * 0.5 * (1 + math.cos(math.pi * step / 20)) for step in range(21)],
    "constant": [0.1] * 21,
}


def test_every_finetune_schedule_the_config_offers_is_tested():
    assert set(CHOICES["finetune_schedule"]) == set(FINETUNE_RATES)


@pytest.mark.parametrize("schedule", CHOICES["finetune_schedule"])
def test_each_finetune_schedule_gives_its_rates(tiny_data, monkeypatch, schedule):
    rates, real_steps = [], train_module.train_steps

    def recorded(model, data, optimizer, scheduler, steps, config, generator, progress=None, teacher=None):
        class Rate:  # called after each step, once the scheduler stepped
            def update(self, _):
                rates.append(optimizer.param_groups[0]["lr"])

        rates.append(optimizer.param_groups[0]["lr"])  # the first step's
        return real_steps(model, data, optimizer, scheduler, steps, config, generator, Rate(), teacher)

    monkeypatch.setattr(train_module, "train_steps", recorded)
    config = dataclasses.replace(Config(), batch_size=16, finetune_steps=20, finetune_lr=0.1,
                                 finetune_schedule=schedule)  # fmt: skip
    model = conv_bn(seed=3)
    before = copy.deepcopy(model.state_dict())
    loss = finetune(model, tiny_data, config, seed=0)
    assert rates == pytest.approx(FINETUNE_RATES[schedule], rel=1e-9, abs=1e-15)
    assert math.isfinite(loss) and not torch.equal(model[0].weight, before["0.weight"])  # it trained
    if schedule == "cosine":
        assert rates[0] == 0.1 and rates[-2] < 0.003 and rates[-1] == pytest.approx(0, abs=1e-15)  # ends near 0
        assert all(later < earlier for earlier, later in zip(rates, rates[1:], strict=False))
    else:
        assert set(rates) == {0.1}

"""Refine: the rewound schedule, exact resume from a checkpoint (also after kill -9), the from-scratch check, and the
export flags that drive them."""

import copy
import dataclasses
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, SMOKE_CONFIG, run_cli
from ranksearch import decompose, load_model, set_ranks, vgg16_cifar
from ranksearch.cli import main
from ranksearch.data.datasets import DeviceData, load_dataset
from ranksearch.deliver import refine as refine_module
from ranksearch.deliver.refine import (
    RECIPES,
    RefineRecipe,
    from_scratch,
    lr_factor,
    refine,
    reinitialised,
    warmup_steps,
)
from ranksearch.models.ranks import module_names
from ranksearch.study.config import load_config
from ranksearch.train.loops import distillation_loss

CONFIG = load_config(SMOKE_CONFIG, {})


@pytest.fixture(scope="module")
def tiny_data(tiny_imagefolder) -> DeviceData:
    return DeviceData(load_dataset(tiny_imagefolder), val_size=20, split_seed=0, device=torch.device("cpu"))


def decomposed_vgg(seed: int = 0) -> torch.nn.Module:
    """A small VGG-16 at ranks 8/32, with random weights (Tucker-2 layer shapes, no factorization)."""
    torch.manual_seed(seed)
    model = vgg16_cifar(width=0.0625)
    return decompose(set_ranks(model, {name: 0.25 for name in module_names(model)}), factorize=False)


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    state = b.state_dict()
    return all(torch.equal(value, state[key]) for key, value in a.state_dict().items())


# ----- the schedule ----------------------------------------------------------------------------------------------


def test_the_rate_rises_linearly_to_the_peak_then_falls_by_a_cosine_to_zero():
    total, warmup = 100, 10
    factors = [lr_factor(step, total, warmup) for step in range(total)]
    assert factors[0] == pytest.approx(0.1) and factors[warmup] == 1.0
    rises = [factors[step + 1] - factors[step] for step in range(warmup)]
    assert all(rise == pytest.approx(0.09) for rise in rises)  # linear: from lr/10 to lr in equal steps
    assert all(factors[step + 1] < factors[step] for step in range(warmup, total - 1))
    assert factors[warmup + 45] == pytest.approx(0.5)  # half-way through the cosine
    assert 0 < factors[-1] < 1e-3
    assert [lr_factor(s, 50, 0) for s in (0, 25)] == pytest.approx([1.0, 0.5])  # "short": the trials' cosine
    assert warmup_steps(RefineRecipe(), per_epoch=6, total=18) == 2  # 0.3 epochs of 6 steps
    assert warmup_steps(RefineRecipe(warmup_epochs=5), per_epoch=6, total=18) == 17  # never the whole refine


def test_each_epoch_continues_the_schedule_of_the_last(tiny_data, monkeypatch):
    used = []

    def record(model, data, optimizer, scheduler, steps, config, generator, progress=None, teacher=None):
        for _ in range(steps):
            used.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return 0.0

    monkeypatch.setattr(refine_module, "train_steps", record)
    recipe = RefineRecipe(lr=0.2, distill_weight=0)
    refine(decomposed_vgg(), tiny_data, CONFIG, 3, seed=0, recipe=recipe, progress=False, evaluate_each_epoch=False)
    per_epoch = 100 // CONFIG.batch_size  # 120 training images, 20 of them held out for val
    total = 3 * per_epoch
    expected = [0.2 * lr_factor(step, total, warmup_steps(recipe, per_epoch, total)) for step in range(total)]
    assert used == pytest.approx(expected, rel=1e-12)


def test_the_recipes_are_named_and_short_is_what_export_did_before():
    assert RECIPES["short"] == RefineRecipe(lr=CONFIG.finetune_lr, warmup_epochs=0, distill_weight=0)
    assert RECIPES["rewind+kd"] == RefineRecipe() and RECIPES["rewind"].distill_weight == 0


# ----- checkpoints -----------------------------------------------------------------------------------------------


class Stop(Exception):
    pass


def stop_after_epoch(monkeypatch, epoch: int) -> None:
    """Make a refine raise right after it saved the checkpoint of ``epoch``, as a kill would leave it."""
    save = refine_module._save_checkpoint

    def save_then_stop(path, key, done, *args):
        save(path, key, done, *args)
        if done == epoch:
            raise Stop

    monkeypatch.setattr(refine_module, "_save_checkpoint", save_then_stop)


def test_a_resumed_refine_ends_with_the_weights_of_an_uninterrupted_one(tiny_data, tmp_path, monkeypatch, capsys):
    start, teacher = decomposed_vgg(), vgg16_cifar(width=0.0625)
    whole = copy.deepcopy(start)
    expected = refine(whole, tiny_data, CONFIG, 3, seed=5, teacher=teacher, progress=False)
    checkpoint = tmp_path / "best.pt.refine.pt"
    with monkeypatch.context() as patch:
        stop_after_epoch(patch, 1)
        with pytest.raises(Stop):
            refine(copy.deepcopy(start), tiny_data, CONFIG, 3, seed=5, teacher=teacher, checkpoint=checkpoint)
    capsys.readouterr()
    resumed = copy.deepcopy(start)  # what a re-run starts from: the same rebuilt weights
    history = refine(resumed, tiny_data, CONFIG, 3, seed=5, teacher=teacher, checkpoint=checkpoint, progress=False)
    assert f"refine: resuming at epoch 2/3 from {checkpoint}" in capsys.readouterr().err
    assert same_weights(resumed, whole) and not same_weights(resumed, start)
    assert history == expected and [h["epoch"] for h in history] == [1, 2, 3]
    assert checkpoint.is_file()  # the caller deletes it


def test_progress_is_a_line_per_epoch_off_a_terminal(tiny_data, capsys):
    refine(decomposed_vgg(), tiny_data, CONFIG, 2, seed=0, recipe=RECIPES["rewind"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("refine: epoch ")]
    assert len(lines) == 2 and lines[1].startswith("refine: epoch 2/2, val ")
    assert lines[1].endswith(" min left") and ", 0.0 min left" in lines[1]
    refine(decomposed_vgg(), tiny_data, CONFIG, 1, seed=0, recipe=RECIPES["rewind"], progress=False)
    assert capsys.readouterr().err == ""


def test_a_checkpoint_of_another_refine_is_ignored_and_overwritten(tiny_data, tmp_path, capsys):
    checkpoint, recipe = tmp_path / "x.refine.pt", RECIPES["rewind"]
    refine(decomposed_vgg(), tiny_data, CONFIG, 1, seed=1, recipe=recipe, checkpoint=checkpoint, progress=False)
    other = decomposed_vgg()
    refine(other, tiny_data, CONFIG, 1, seed=2, recipe=recipe, checkpoint=checkpoint, progress=False)
    err = capsys.readouterr().err
    assert "it is of another refine" in err and "overwriting it" in err and "resuming" not in err
    plain = decomposed_vgg()
    refine(plain, tiny_data, CONFIG, 1, seed=2, recipe=recipe, progress=False)
    assert same_weights(other, plain)  # started afresh
    saved = torch.load(checkpoint, weights_only=True)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in saved["model"].items())


def test_an_unreadable_checkpoint_is_ignored_with_one_line(tiny_data, tmp_path, capsys):
    checkpoint, recipe = tmp_path / "x.refine.pt", RECIPES["short"]
    checkpoint.write_bytes(b"PK\x03\x04 not a checkpoint")
    model = decomposed_vgg()
    refine(model, tiny_data, CONFIG, 1, seed=3, recipe=recipe, checkpoint=checkpoint, progress=False)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "ignoring the unreadable checkpoint" in lines[0] and str(checkpoint) in lines[0]
    plain = decomposed_vgg()
    refine(plain, tiny_data, CONFIG, 1, seed=3, recipe=recipe, progress=False)
    assert same_weights(model, plain)
    assert torch.load(checkpoint, weights_only=True)["epochs_done"] == 1  # replaced by a good one


def test_distillation_needs_a_teacher(tiny_data):
    with pytest.raises(ValueError, match="needs a teacher"):
        refine(decomposed_vgg(), tiny_data, CONFIG, 1, seed=0, recipe=RefineRecipe(distill_weight=0.5))


def small_net(seed: int, sharpness: float = 1.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3, padding=1), torch.nn.BatchNorm2d(6), torch.nn.ReLU(),
                              torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(6, 10))  # fmt: skip
    with torch.no_grad():
        net[-1].weight.mul_(sharpness)  # a teacher's confident logits: softened, still far from uniform
    return net


def test_a_distilled_refine_moves_the_model_toward_its_teacher(tiny_data):
    images = tiny_data.normalize(tiny_data.splits["train"].images)
    teacher, start = small_net(10, sharpness=20).eval(), small_net(2)

    def gap(model) -> float:  # KL(teacher || model) of the softened outputs: the distillation term itself
        with torch.no_grad():
            return float(distillation_loss(model.eval()(images), teacher(images), CONFIG.distill_temperature))

    def refined(distill_weight: float) -> torch.nn.Module:
        model = copy.deepcopy(start)
        refine(model, tiny_data, CONFIG, 5, seed=0, recipe=RefineRecipe(distill_weight=distill_weight),
               teacher=teacher, progress=False, evaluate_each_epoch=False)  # fmt: skip
        return model

    distilled, plain = refined(1.0), refined(0.0)  # 0: the teacher is given but unused
    assert gap(distilled) < 0.5 * gap(start) and gap(distilled) < 0.5 * gap(plain)
    half = refined(0.5)
    assert gap(distilled) < gap(half) < gap(plain)  # the weight mixes the two losses


# ----- from scratch ----------------------------------------------------------------------------------------------


def train_loss(model: torch.nn.Module, data: DeviceData) -> float:
    """Loss on all training images in one batch, BatchNorm on that batch's statistics (in eval mode, running
    statistics of a 60-step run made the loss swing with the thread count and test order)."""
    train, model = data.splits["train"], copy.deepcopy(model).train()
    with torch.no_grad():
        return float(F.cross_entropy(model(data.normalize(train.images)), train.labels))


def test_from_scratch_reinitialises_the_architecture_and_trains_it(tiny_data, capsys):
    model = decomposed_vgg()
    with torch.no_grad():  # as a trained model's: no parameter at its initial value (BatchNorm's 1 and 0)
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    kept = copy.deepcopy(model.state_dict())
    # at the smoke config's peak rate (0.05) this tiny net's loss after 60 steps swung from -0.8 to +0.2 with the
    # thread count and test order; at 0.01 for 120 steps it fell by 0.64 to 1.29 (6 seeds x 1 and 2 threads)
    gentle = dataclasses.replace(CONFIG, pretrain_lr=0.01)
    trained = from_scratch(model, tiny_data, gentle, steps=120, seed=4)
    assert "for 120 steps" in capsys.readouterr().err
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in kept.items())  # the input is untouched
    fresh, state = reinitialised(model, seed=4), trained.state_dict()
    for name, parameter in model.named_parameters():
        assert not torch.equal(parameter, fresh.get_parameter(name)), name  # every parameter drawn afresh
        assert not torch.equal(parameter, state[name]), name
    records = [k for k in kept if k.endswith((".rank", ".decomposition"))]
    assert records and all(torch.equal(state[k], kept[k]) for k in records)  # the same architecture
    assert type(trained.features.block1[0]) is type(model.features.block1[0])
    assert train_loss(trained, tiny_data) < train_loss(fresh, tiny_data) - 0.1  # trained


def test_reinitialising_resets_batchnorm_statistics():
    model = decomposed_vgg()
    norm = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    norm.running_mean.fill_(3.0)
    fresh = reinitialised(model, seed=0)
    fresh_norm = next(m for m in fresh.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert torch.equal(fresh_norm.running_mean, torch.zeros_like(norm.running_mean))


# ----- export --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study_dir(tmp_path_factory, tiny_imagefolder, pretrained):
    """A working folder with a one-trial smoke study (its weights kept) and its baseline."""
    cwd = tmp_path_factory.mktemp("refine")
    shutil.copytree(pretrained, cwd / "studies" / "baselines")
    result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), "--trials", "1",
                     "--ranks", "8/32,8/32,8/32,8/32,8/32", cwd=cwd)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return cwd


EXPORT = ("export", "--study-name", "smoke", "--trial", "0")


@pytest.mark.parametrize("flags,message", [
    (("--refine-distill", "2"), "--refine-distill must be a weight in [0, 1]"),
    (("--refine-lr", "-0.1"), "--refine-lr must be a finite number > 0"),
    (("--refine-warmup-epochs", "nan"), "--refine-warmup-epochs must be a finite number >= 0"),
])  # fmt: skip
def test_bad_refine_flags_are_one_line(tmp_path, capsys, flags, message):
    assert main([*EXPORT, "--out", str(tmp_path / "x.pt"), "--finetune-epochs", "2", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1


def test_refine_distill_2_from_the_command_line_exits_2_without_a_traceback(tmp_path):
    result = run_cli(*EXPORT, "--out", "x.pt", "--finetune-epochs", "2", "--refine-distill", "2", cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "--refine-distill must be a weight in [0, 1]" in result.stderr and "Traceback" not in result.stderr


def test_refine_flags_without_epochs_are_refused(tmp_path, capsys):
    assert main([*EXPORT, "--out", str(tmp_path / "x.pt"), "--refine-lr", "0.1"]) == 2
    assert "need --finetune-epochs" in capsys.readouterr().err


@pytest.mark.slow
def test_export_with_the_from_scratch_check_records_both(study_dir):
    result = run_cli(*EXPORT, "--finetune-epochs", "2", "--refine-lr", "0.02", "--from-scratch-check",
                     "--out", "out/check.pt", cwd=study_dir)  # fmt: skip
    assert result.returncode == 0, result.stderr
    payload = torch.load(study_dir / "out" / "check.pt", weights_only=True)
    steps = CONFIG.finetune_steps + 2 * (100 // CONFIG.batch_size)
    scratch = payload["from_scratch"]
    assert scratch["steps"] == steps and set(scratch) == {"steps", "val_accuracy", "test_accuracy"}
    line = f"from scratch, same architecture and steps ({steps}): val {scratch['val_accuracy']:.2%}, "
    assert line in result.stdout and f"(refined: val {payload['val_accuracy']:.2%}" in result.stdout
    assert payload["refine"]["recipe"] == {"lr": 0.02, "warmup_epochs": 0.3, "distill_weight": 0.9}
    assert payload["refine"]["epochs"] == 2 and [h["epoch"] for h in payload["refine"]["history"]] == [1, 2]
    assert payload["refine"]["history"][-1]["val_accuracy"] == payload["val_accuracy"]
    assert "before_finetune" in payload and payload["finetune_epochs"] == 2
    assert not (study_dir / "out" / "check.pt.refine.pt").exists()
    load_model(study_dir / "out" / "check.pt")


@pytest.mark.slow
def test_a_distilled_refine_without_the_baseline_asks_for_refine_distill_0(study_dir):
    storage = f"sqlite:///{study_dir / 'studies' / 'smoke.db'}"
    baseline = study_dir / optuna.load_study(study_name="smoke", storage=storage).user_attrs["baseline_path"]
    hidden = baseline.with_name("hidden.pt")
    baseline.rename(hidden)
    try:
        result = run_cli(*EXPORT, "--finetune-epochs", "1", "--out", "gone.pt", cwd=study_dir)
    finally:
        hidden.rename(baseline)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "is gone; pass --refine-distill 0" in result.stderr and not (study_dir / "gone.pt").exists()


@pytest.mark.slow
def test_an_export_killed_during_its_refine_resumes_to_the_same_weights(study_dir):
    epochs = 20  # on the tiny data, seconds after the first checkpoint
    args = [*EXPORT, "--finetune-epochs", str(epochs), "--out"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    killed = subprocess.Popen([sys.executable, "-m", "ranksearch", *args, "killed.pt"], cwd=study_dir, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    checkpoint = study_dir / "killed.pt.refine.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and killed.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    still_running = killed.poll() is None
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL and still_running and checkpoint.exists()
    done = torch.load(checkpoint, weights_only=True)["epochs_done"]
    assert 1 <= done < epochs

    resumed = run_cli(*args, "killed.pt", cwd=study_dir, subprocess=True)  # as the killed one ran: bit for bit
    assert resumed.returncode == 0, resumed.stderr
    assert f"refine: resuming at epoch {done + 1}/{epochs} from killed.pt.refine.pt" in resumed.stderr
    assert not checkpoint.exists() and not (study_dir / "whole.pt.refine.pt").exists()
    whole = run_cli(*args, "whole.pt", cwd=study_dir, subprocess=True)
    assert whole.returncode == 0, whole.stderr
    assert "resuming" not in whole.stderr
    a, b = (torch.load(study_dir / name, weights_only=True) for name in ("killed.pt", "whole.pt"))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["refine"] == b["refine"] and math.isfinite(a["refine"]["history"][-1]["loss"])

"""``--weights FILE``: a user's trained weights as the baseline (``ranksearch.user_weights``): read safely, fitted
to the model or refused naming the first mismatch, recorded by digest; and a real round trip, a resnet18 trained in
plain PyTorch compressed by ``run --weights`` and exported."""

import hashlib
import os
import pickle

import optuna
import pytest
import torch
import torchvision
from torchvision import transforms

from conftest import SMOKE_CONFIG, run_cli
from ranksearch import load_model
from ranksearch.data.datasets import DeviceData, load_dataset
from ranksearch.data.inputs import CIFAR_MEAN, CIFAR_STD
from ranksearch.models import build_model
from ranksearch.models.user_weights import fitted, read_weights
from ranksearch.study.storage import other_weights
from ranksearch.train.loops import evaluate
from ranksearch.utils.errors import UserError

RESNET18 = ("--model", "torchvision:resnet18", "--width", "1")  # the smoke config's width is VGG's


def _user_loader(folder, shuffle: bool):
    """The tiny data as a user's own script reads it: torchvision's ImageFolder, normalized as ranksearch does
    32x32 images (CIFAR-10's constants)."""
    normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)])
    dataset = torchvision.datasets.ImageFolder(folder, transform=normalize)
    return torch.utils.data.DataLoader(dataset, batch_size=16, shuffle=shuffle)


@pytest.fixture(scope="session")
def user_resnet18(tmp_path_factory, tiny_imagefolder):
    """A resnet18 trained outside ranksearch, in plain PyTorch, saved as users save one; and its test accuracy as
    the user measured it."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(6):
        for images, labels in _user_loader(tiny_imagefolder / "train", shuffle=True):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        scored = [(model(images).argmax(1) == labels) for images, labels in _user_loader(tiny_imagefolder / "test",
                                                                                           shuffle=False)]  # fmt: skip
    path = tmp_path_factory.mktemp("user") / "resnet18.pt"
    torch.save(model.state_dict(), path)
    return path, torch.cat(scored).float().mean().item()


def _study(workdir, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{workdir}/studies/{name}.db")


@pytest.mark.slow
def test_a_users_resnet18_is_compressed_without_pretraining_and_exported(tmp_path, tiny_imagefolder, user_resnet18):
    weights, user_test = user_resnet18
    common = ("--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), *RESNET18, "--study-name", "mine")
    result = run_cli("run", *common, "--weights", str(weights), "--trials", "2", "--ranks", "8/32,8/32,8/32,8/32,8/32",
                     cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "pretraining" not in result.stderr.replace("no pretraining", "") and "your weights" in result.stderr
    study = _study(tmp_path, "mine")
    assert study.user_attrs["baseline"]["test_accuracy"] == pytest.approx(user_test)  # the user's own accuracy
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert study.user_attrs["config"]["weights"] == {"sha256": digest}
    assert "pretrain_epochs" not in study.user_attrs["config"]  # not pretrained: nothing of pretraining recorded
    trial = next(t for t in study.trials if t.state.name == "COMPLETE")
    export = run_cli("export", "--study-name", "mine", "--trial", str(trial.number), "--out", "mine.pt", cwd=tmp_path)
    assert export.returncode == 0, export.stderr
    model = load_model(tmp_path / "mine.pt")
    data = DeviceData(load_dataset(tiny_imagefolder), val_size=20, split_seed=0, device=torch.device("cpu"))
    assert evaluate(model, data, "val", 64) == pytest.approx(trial.values[0])  # the exported model is the trial's
    assert any(type(m).__name__ == "Tucker2Conv" for m in model.modules())
    report = run_cli("report", "--study-name", "mine", "--out", "report", cwd=tmp_path)
    assert f"baseline (your weights {weights}, sha256 {digest[:12]}): val" in report.stdout, report.stderr

    other = tmp_path / "other.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), other)
    again = run_cli("run", *common, "--weights", str(other), "--trials", "1", cwd=tmp_path)
    assert again.returncode == 2 and "made from other weights" in again.stderr and len(again.stderr.splitlines()) == 1
    pretrained = run_cli("run", *common, "--trials", "1", cwd=tmp_path)
    assert pretrained.returncode == 2 and f"made from --weights {weights}" in pretrained.stderr
    assert len(_study(tmp_path, "mine").trials) == 2  # neither added a trial


@pytest.mark.slow
def test_pretrain_and_ranks_measure_the_users_weights(tmp_path, tiny_imagefolder, user_resnet18):
    weights, user_test = user_resnet18
    common = ("--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), *RESNET18, "--weights", str(weights))
    result = run_cli("pretrain", *common, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"test {user_test:.2%}" in result.stderr and "no pretraining" in result.stderr
    (cached,) = (tmp_path / "studies" / "baselines").glob("*-weights-*.pt")
    ranks = run_cli("ranks", "--vbmf", *common, cwd=tmp_path)
    assert ranks.returncode == 0 and "--ranks " in ranks.stdout and f"{cached.name} (cached)" in ranks.stderr


@pytest.mark.parametrize("command", ["run", "sensitivity", "ranks", "pretrain"])
def test_weights_of_another_class_count_are_refused_before_any_work(tmp_path, tiny_imagefolder, command):
    weights = tmp_path / "five.pt"
    torch.save(torchvision.models.resnet18(num_classes=5).state_dict(), weights)
    extra = ("--vbmf",) if command == "ranks" else ()
    result = run_cli(command, *extra, "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), *RESNET18,
                     "--weights", str(weights), cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "does not fit torchvision:resnet18 with 10 classes: fc.weight is 5x512 in the file, 10x512" in result.stderr
    assert not (tmp_path / "studies").exists()  # no baseline, no study


def test_a_damaged_file_and_a_code_running_pickle_are_one_line_each(tmp_path, tiny_imagefolder):
    good = tmp_path / "good.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), good)
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    hostile, pickled = tmp_path / "hostile.pt", tmp_path / "pickled.pt"
    torch.save({"state_dict": Payload()}, hostile)
    with open(pickled, "wb") as file:
        pickle.dump({"state_dict": Payload()}, file)
    refused = "which loading would have to run as code"
    expected = {damaged: "is damaged or not a PyTorch file", hostile: refused, pickled: refused}
    for path, message in expected.items():
        result = run_cli("pretrain", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), *RESNET18,
                         "--weights", str(path), cwd=tmp_path)  # fmt: skip
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1 and message in result.stderr, path
    assert not marker.exists()  # the pickle's code never ran


def test_pretraining_flags_are_refused_with_weights(tmp_path, tiny_imagefolder):
    result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), *RESNET18,
                     "--weights", "any.pt", "--pretrain-epochs", "3", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "--pretrain-epochs: with --weights" in result.stderr


def test_checkpoints_of_the_usual_shapes_are_read(tmp_path):
    state = torchvision.models.resnet18(num_classes=10).state_dict()
    layouts = {
        "plain": state,
        "checkpoint": {"epoch": 7, "model_state_dict": state, "optimizer": {"lr": 0.1}},
        "data_parallel": {"state_dict": {f"module.{key}": value for key, value in state.items()}},
        "compiled": {f"_orig_mod.{key}": value for key, value in state.items()},
    }
    for name, saved in layouts.items():
        torch.save(saved, tmp_path / f"{name}.pt")
        read = read_weights(tmp_path / f"{name}.pt")
        assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state), name
    torch.save({"epoch": 7, "optimizer": {"lr": 0.1}}, tmp_path / "none.pt")
    with pytest.raises(UserError, match=r"holds a dict with keys epoch, optimizer, not a state_dict"):
        read_weights(tmp_path / "none.pt")
    torch.save(torchvision.models.resnet18(num_classes=10), tmp_path / "whole.pt")  # the module pickled
    with pytest.raises(UserError, match=r"run as code .*torchvision.models.resnet.ResNet.*state_dict\(\)"):
        read_weights(tmp_path / "whole.pt")


def test_torchvisions_own_checkpoint_layout_loads_as_it_is():
    """A file as torchvision publishes it (its model's state_dict, 1000 classes) fits ``torchvision:<name>``;
    densenet's legacy keys (``norm.1``) are renamed as torchvision's own loading does."""
    published = torchvision.models.resnet18().state_dict()
    model = fitted(build_model("torchvision:resnet18", num_classes=1000), published, "resnet18-f37072fd.pth", "r18")
    assert torch.equal(model.fc.weight, published["fc.weight"])
    densenet = torchvision.models.densenet121().state_dict()
    legacy = {key.replace("norm1", "norm.1").replace("conv2", "conv.2"): value for key, value in densenet.items()
              if not key.endswith("num_batches_tracked")}  # fmt: skip  (saved before BatchNorm counted batches)
    assert legacy.keys() != densenet.keys()
    model = fitted(build_model("torchvision:densenet121", num_classes=1000), legacy, "densenet121.pth", "d121")
    key = "features.denseblock1.denselayer1.conv2.weight"
    assert torch.equal(model.state_dict()[key], densenet[key])


def test_another_architecture_names_its_first_mismatch():
    resnet34 = torchvision.models.resnet34(num_classes=10).state_dict()
    with pytest.raises(UserError, match=r"the file has layer1.2.conv1.weight, which the model has not"):
        fitted(build_model("torchvision:resnet18"), resnet34, "r34.pt", "torchvision:resnet18")
    resnet18 = torchvision.models.resnet18(num_classes=10).state_dict()
    del resnet18["layer2.0.bn1.weight"]
    with pytest.raises(UserError, match=r"the file has no layer2.0.bn1.weight \(128 in the model\)"):
        fitted(build_model("torchvision:resnet18"), resnet18, "r18.pt", "torchvision:resnet18")


def test_a_study_refuses_other_weights_in_one_line():
    made = {"sha256": "a" * 64}
    assert other_weights("s", made, {"sha256": "a" * 64}, "/w/mine.pt") is None
    assert other_weights("s", None, None, None) is None
    assert "made from other weights (/w/mine.pt, sha256 aaaaaaaaaaaa; this --weights: sha256 bbbbbbbbbbbb)" in (
        other_weights("s", made, {"sha256": "b" * 64}, "/w/mine.pt"))  # fmt: skip
    assert "baseline ranksearch pretrained" in other_weights("s", None, made, None)
    assert "made from --weights /w/mine.pt" in other_weights("s", made, None, "/w/mine.pt")


def test_normalize_sets_the_inputs_mean_and_std_as_the_weights_were_trained(tmp_path, tiny_imagefolder):
    memory = lambda normalize: DeviceData(load_dataset(tiny_imagefolder), 20, 0, torch.device("cpu"),  # noqa: E731
                                          normalize).spec  # fmt: skip
    assert (memory("auto").mean, memory("auto").std) == (CIFAR_MEAN, CIFAR_STD)  # 32x32 images, as always
    assert memory("imagenet").mean == (0.485, 0.456, 0.406) and memory("imagenet").std == (0.229, 0.224, 0.225)
    assert memory("0.5,0.5,0.5/0.25,0.25,0.25").std == (0.25, 0.25, 0.25)
    assert memory("data").mean != CIFAR_MEAN  # the tiny images' own
    for bad in ("0.5,0.5/0.2,0.2", "0.5,0.5,0.5/0,1,1", "imagenett"):
        result = run_cli("pretrain", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder),
                         "--normalize", bad, cwd=tmp_path)  # fmt: skip
        assert result.returncode == 2 and "normalize must be one of auto, data, cifar10, imagenet" in result.stderr


def test_a_study_records_a_normalization_other_than_auto():
    from ranksearch.study.config import Config, baseline_key, search_fields

    assert "normalize" not in search_fields(Config())  # studies before it resume
    assert search_fields(Config(normalize="imagenet"))["normalize"] == "imagenet"
    identity = {"fingerprint": "f"}
    assert baseline_key(Config(normalize="imagenet"), identity) != baseline_key(Config(), identity)

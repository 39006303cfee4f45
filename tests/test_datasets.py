"""Datasets other than CIFAR-10: an ImageFolder of another image size and class count gives its own input spec
(size, mean/std, classes), which the MACs, the export and ``load_model`` carry."""

import warnings
from pathlib import Path

import optuna
import pytest
import torch
import yaml
from PIL import Image

from conftest import CLASSES, SMOKE_CONFIG, run_cli, write_imagefolder
from ranksearch.data.datasets import DeviceData, load_dataset
from ranksearch.data.inputs import CIFAR_MEAN, CIFAR_STD, InputSpec, pixel_statistics, spec_of
from ranksearch.deliver.load import load_model
from ranksearch.models import build_model
from ranksearch.models.measure import count_macs
from ranksearch.study.config import load_config
from ranksearch.utils.errors import UserError

SIZE = 48  # pixels: not CIFAR's 32
SEVEN = [f"kind{i}" for i in range(7)]


def write_folder(root: Path, size: int = SIZE, classes=SEVEN, train: int = 8, test: int = 2) -> Path:
    """An ImageFolder of ``size`` x ``size`` PNGs, each class its own RGB colour."""
    rgb = lambda k: (30 * k + 20, 200 - 25 * k, 60 + 10 * k)  # noqa: E731
    return write_imagefolder(root, train, test, size, classes, color=rgb)


def config_without_num_classes(folder: Path) -> Path:
    """The smoke config less its ``num_classes: 10``: the data's count is taken."""
    fields = yaml.safe_load(SMOKE_CONFIG.read_text())
    del fields["num_classes"]
    path = folder / "smoke-any.yaml"
    path.write_text(yaml.safe_dump(fields))
    return path


def one_line_error(result, *texts: str) -> None:
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert result.stderr.startswith("ranksearch: error:") and "Traceback" not in result.stderr
    assert all(text in result.stderr for text in texts), result.stderr


# ----- the spec, from the data -----------------------------------------------------------------------------------


def test_images_keep_their_size_and_give_their_own_spec(tmp_path):
    dataset = load_dataset(write_folder(tmp_path / "data"))
    assert dataset.train.images.shape == (56, 3, SIZE, SIZE) and dataset.test.images.shape == (14, 3, SIZE, SIZE)
    spec = DeviceData(dataset, val_size=20, split_seed=0, device=torch.device("cpu")).spec
    mean, std = pixel_statistics(dataset.train.images)
    assert spec == InputSpec(SIZE, SIZE, mean, std, tuple(SEVEN))
    assert mean != CIFAR_MEAN and std != CIFAR_STD
    assert spec.input_size() == (1, 3, SIZE, SIZE) and spec.record()["size"] == [3, SIZE, SIZE]


def test_32x32_data_keeps_cifar_10s_normalization(tiny_imagefolder):
    data = DeviceData(load_dataset(tiny_imagefolder), val_size=20, split_seed=0, device=torch.device("cpu"))
    assert data.spec == InputSpec(classes=tuple(CLASSES))
    assert (data.spec.mean, data.spec.std) == (CIFAR_MEAN, CIFAR_STD)  # as every baseline so far was trained


def test_pixel_statistics_are_per_channel_over_the_pixels():
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    images[0, 0] = 255  # channel 0: half the pixels 255, half 0; channel 1: all 0; channel 2: all 51
    images[:, 2] = 51
    mean, std = pixel_statistics(images, chunk=1)
    assert mean == (0.5, 0.0, 0.2) and std == (0.5, round(1 / 255, 4), round(1 / 255, 4))  # no std of 0
    assert spec_of(images, ["a"]).mean == mean  # 4x4: not CIFAR's size


def test_num_classes_comes_from_the_data_unless_the_config_sets_it(tmp_path):
    data = write_folder(tmp_path / "data", size=8, train=1, test=1)
    assert load_config(config_without_num_classes(tmp_path), {"data_dir": str(data)}).num_classes == 7
    assert load_config(SMOKE_CONFIG, {"data_dir": str(data)}).num_classes == 10  # set: checked when loading the data
    assert load_config(config_without_num_classes(tmp_path), {"data_dir": str(tmp_path / "none")}).num_classes == 10


def test_test_images_of_another_size_are_refused(tmp_path):
    data = write_folder(tmp_path / "data", size=8, train=2, test=1)
    Image.new("RGB", (9, 8)).save(data / "test" / "kind3" / "0000.png")
    with pytest.raises(UserError, match=r"1 image\(s\) are not 8x8 like .*kind0/0000.png .*kind3/0000.png \(9x8\)"):
        load_dataset(data)


# ----- models and MACs at other sizes ----------------------------------------------------------------------------


def test_torchvision_resnet18_at_224_counts_torchvisions_published_1_81_gmacs():
    macs, _ = count_macs(build_model("torchvision:resnet18", num_classes=1000), input_size=(1, 3, 224, 224))
    assert macs == pytest.approx(1.81e9, rel=0.01)  # torchvision's "GFLOPS" of resnet18 are MACs


def test_vgg_takes_larger_images_and_counts_them():
    model = build_model("vgg16", num_classes=7, width=0.0625).eval()
    assert model(torch.zeros(2, 3, 64, 64)).shape == (2, 7)
    at_32, at_64 = count_macs(model)[0], count_macs(model, (1, 3, 64, 64))[0]
    classifier = 32 * 7  # the Linear's MACs: the same at any size, after the global pooling
    assert at_64 - classifier == 4 * (at_32 - classifier)  # every conv sees 4x the pixels


# ----- end to end: run, export, load -----------------------------------------------------------------------------


@pytest.mark.slow
def test_a_48px_seven_class_imagefolder_runs_exports_and_loads_with_its_own_spec(tmp_path):
    data, config = write_folder(tmp_path / "data"), config_without_num_classes(tmp_path)
    result = run_cli("run", "--config", str(config), "--data-dir", str(data), "--trials", "2",
                     "--ranks", "4/32,4/32,4/32,4/32,4/32", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    result = run_cli("export", "--study-name", "smoke", "--trial", "best", "--max-drop", "100", "--format",
                     "pt,onnx,torchscript", "--out", "out/best.pt", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr

    payload = torch.load(tmp_path / "out" / "best.pt", weights_only=True)
    spec = DeviceData(load_dataset(data), val_size=20, split_seed=0, device=torch.device("cpu")).spec
    assert payload["input"] == spec.record() and payload["input"]["size"] == [3, SIZE, SIZE]
    assert payload["classes"] == SEVEN and payload["config"]["num_classes"] == 7
    model = load_model(tmp_path / "out" / "best.pt")
    assert InputSpec.from_record(model.input_spec, model.classes) == spec
    images = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        logits = model(images)
    assert logits.shape == (3, 7)

    # MACs counted at 48x48 by the trial, the baseline and the export
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{tmp_path / 'studies' / 'smoke.db'}")
    macs = count_macs(model, spec.input_size())[0]
    assert payload["macs"] == macs == study.trials[payload["trial_number"]].values[1]
    assert macs > count_macs(model)[0]  # not the 32x32 count
    baseline = build_model("vgg16", num_classes=7, width=0.0625)
    assert study.user_attrs["baseline"]["macs"] == count_macs(baseline, spec.input_size())[0]

    # the deployable files take 48x48 images too
    import onnxruntime

    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "best.onnx"), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"images": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_logits), logits, atol=1e-4, rtol=1e-4)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
        torch.testing.assert_close(torch.jit.load(str(tmp_path / "out" / "best.ts"))(images), logits)


def test_training_images_of_mixed_sizes_are_one_line_naming_a_file(tmp_path):
    data = write_folder(tmp_path / "data", size=8, train=2, test=1)
    Image.new("RGB", (10, 12)).save(data / "train" / "kind5" / "0001.png")
    result = run_cli("pretrain", "--config", str(config_without_num_classes(tmp_path)), "--data-dir", str(data),
                     cwd=tmp_path)  # fmt: skip
    one_line_error(result, "are not 8x8 like", "kind5/0001.png (10x12)", "resize")


def test_a_model_that_cannot_take_the_images_is_one_line(tmp_path):
    data = write_folder(tmp_path / "data", size=16, train=3, test=1)  # VGG's 5 halvings need 32 pixels
    result = run_cli("pretrain", "--config", str(config_without_num_classes(tmp_path)), "--data-dir", str(data),
                     cwd=tmp_path)  # fmt: skip
    one_line_error(result, "model vgg16 cannot take the data's 3x16x16 images")

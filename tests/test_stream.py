"""Data over the memory limit (``ranksearch.stream``): decoded into memory-mapped files and streamed in batches,
with the same batches, identity and trial results as the in-memory path; its cache checked like the in-memory one."""

import shutil

import optuna
import pytest
import torch

from conftest import SMOKE_CONFIG, run_cli
from ranksearch.data.datasets import DeviceData, device_data, load_dataset
from ranksearch.data.stream import MAPPED_NAME, MappedImages, StreamedData, memory_limit
from ranksearch.study.config import Config
from ranksearch.utils.errors import UserError


@pytest.fixture
def data(tmp_path, tiny_imagefolder):
    """A copy of the tiny data of its own (its caches are written beside it)."""
    return shutil.copytree(tiny_imagefolder, tmp_path / "data", ignore=shutil.ignore_patterns(".ranksearch-*"))


def _both(folder) -> tuple[DeviceData, DeviceData]:
    make = lambda share: device_data(Config(data_dir=str(folder), download=False, val_size=20,  # noqa: E731
                                            data_memory_share=share), torch.device("cpu"))  # fmt: skip
    return make(1.0), make(0.0)


def test_streamed_data_gives_the_in_memory_batches_and_identity(data):
    memory, streamed = _both(data)
    assert type(memory) is DeviceData and type(streamed) is StreamedData
    assert streamed.identity == memory.identity and streamed.spec == memory.spec
    assert all(streamed.size(split) == memory.size(split) for split in ("train", "val", "test"))
    pairs = zip(memory.train_batches(16, torch.Generator().manual_seed(3)),
                streamed.train_batches(16, torch.Generator().manual_seed(3)), strict=True)  # fmt: skip
    for _, ((a, a_labels), (b, b_labels)) in zip(range(20), pairs, strict=False):  # 2 epochs: orders, crops, flips
        assert torch.equal(a, b) and torch.equal(a_labels, b_labels)
    for split in ("val", "test"):
        for every in (1, 3):
            one, other = list(memory.eval_batches(split, 7, every)), list(streamed.eval_batches(split, 7, every))
            assert len(one) == len(other) and all(torch.equal(x, y) and torch.equal(p, q)
                                                  for (x, p), (y, q) in zip(one, other, strict=True))  # fmt: skip


def test_the_memory_limit_decides_which_data_is_streamed(data):
    images = 10 * (12 + 3)  # the tiny data: 10 classes, 12 train and 3 test images each, 32x32 RGB
    pixels = images * 32 * 32 * 3
    assert isinstance(load_dataset(data, memory_limit=pixels).train.images, torch.Tensor)
    assert isinstance(load_dataset(data, memory_limit=pixels - 1).train.images, MappedImages)
    cpu = torch.device("cpu")
    assert memory_limit(0.5, 1, cpu) == pytest.approx(2 * memory_limit(0.5, 2, cpu), abs=1)
    assert memory_limit(0.0, 1, cpu) == 0


def test_a_changed_mapped_file_or_image_is_decoded_again(data, capsys):
    first = load_dataset(data, memory_limit=0)
    train = data / MAPPED_NAME / "train.npy"
    with open(train, "r+b") as file:  # a byte of the pixels edited in place
        file.seek(-1, 2)
        file.write(b"\x00" if file.read(1) != b"\x00" else b"\x01")
    again = load_dataset(data, memory_limit=0)
    assert "unusable" in capsys.readouterr().err and again.fingerprint == first.fingerprint
    image = next((data / "train").glob("*/*.png"))
    image.write_bytes((data / "test" / image.parent.name / "0000.png").read_bytes())
    changed = load_dataset(data, memory_limit=0)
    assert "made from other files" in capsys.readouterr().err and changed.fingerprint != first.fingerprint


def test_a_broken_image_is_named_and_leaves_no_mapped_file(data):
    broken = next((data / "test").glob("*/*.png"))
    broken.write_bytes(b"")
    with pytest.raises(UserError, match=rf"1 image\(s\) cannot be decoded, first {broken}"):
        load_dataset(data, memory_limit=0)
    assert not [path for path in (data / MAPPED_NAME).iterdir() if path.suffix == ".npy" or "partial" in path.name]


def test_streamed_data_in_a_read_only_folder_is_one_line(tmp_path, data):
    result = run_cli("pretrain", "--config", str(SMOKE_CONFIG), "--data-dir", str(data), "--data-memory-share", "0",
                     cwd=tmp_path, read_only=(data,))  # fmt: skip
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "cannot write the memory-mapped images" in result.stderr and "data_memory_share" in result.stderr


@pytest.mark.slow
def test_a_run_on_streamed_data_measures_what_it_measures_in_memory(workdir, data):
    values = {}
    for name, share in (("memory", "1"), ("streamed", "0")):
        result = run_cli("run", "--config", str(SMOKE_CONFIG), "--data-dir", str(data), "--study-name",
                         name, "--data-memory-share", share, "--trials", "1", "--ranks", "8/32,4/32,4/32,2/32,2/32",
                         cwd=workdir)  # fmt: skip
        assert result.returncode == 0 and "(cached)" in result.stderr, result.stderr  # the same baseline
        study = optuna.load_study(study_name=name, storage=f"sqlite:///{workdir}/studies/{name}.db")
        values[name] = study.trials[0].values
    assert values["streamed"] == values["memory"]

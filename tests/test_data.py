import os
from pathlib import Path

import pytest
import torch

from conftest import CLASSES, class_color, write_imagefolder
from ranksearch.data import CACHE_NAME, DeviceData, augment, detect_source, load_dataset, split_train_val
from ranksearch.errors import UserError


def test_imagefolder_is_decoded_once_and_cached(tmp_path):
    root = write_imagefolder(tmp_path / "cifar", train_per_class=3, test_per_class=2)
    assert detect_source(root) == "imagefolder"
    first = load_dataset(root)
    assert (root / CACHE_NAME).is_file()
    assert first.classes == CLASSES
    assert first.train.images.shape == (30, 3, 32, 32) and first.train.images.dtype == torch.uint8
    assert first.test.labels.tolist() == [label for label in range(10) for _ in range(2)]
    assert int(first.train.images[5, 1, 10, 10]) == class_color(int(first.train.labels[5]))
    for path in (root / "train").rglob("*.png"):  # the second start reads the cache alone
        path.write_bytes(b"not an image any more")
    second = load_dataset(root)
    assert torch.equal(second.train.images, first.train.images)


def test_torchvision_folder_is_detected(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert detect_source(tmp_path) == "torchvision"
    assert detect_source(tmp_path / "cifar-10-batches-py") == "torchvision"
    assert detect_source(tmp_path / "missing") is None


def test_missing_data_is_an_error_not_random_data(tmp_path):
    with pytest.raises(UserError, match="--data-dir .* ImageFolder tree with train/ and test/"):
        load_dataset(tmp_path / "nothing-here", download=False)


def test_split_is_disjoint_fixed_and_sized(tiny_imagefolder):
    train = load_dataset(tiny_imagefolder).train
    kept, val = split_train_val(train, 20, seed=0)
    assert len(val.labels) == 20 and len(kept.labels) == len(train.labels) - 20
    top_rows = lambda t: {tuple(row.tolist()) for row in t.images[:, 0, 0, :]}  # noqa: E731 (unique per image)
    assert not top_rows(kept) & top_rows(val)
    assert torch.equal(split_train_val(train, 20, seed=0)[1].images, val.images)
    assert not torch.equal(split_train_val(train, 20, seed=1)[1].images, val.images)
    with pytest.raises(UserError, match="val_size"):
        split_train_val(train, len(train.labels), seed=0)


def test_augment_gives_each_image_its_own_crop_and_flip():
    torch.manual_seed(0)
    image = torch.randint(1, 256, (3, 32, 32), dtype=torch.uint8)
    batch = image.expand(256, -1, -1, -1).contiguous()
    out = augment(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.dtype == torch.uint8
    padded = torch.nn.functional.pad(image, (4, 4, 4, 4))
    crops = {(dy, dx): padded[:, dy : dy + 32, dx : dx + 32] for dy in range(9) for dx in range(9)}
    candidates = {(dy, dx, f): c.flip(2) if f else c for (dy, dx), c in crops.items() for f in (0, 1)}
    seen = set()
    for picture in out:
        matches = [key for key, crop in candidates.items() if torch.equal(crop, picture)]
        assert len(matches) == 1  # every output is exactly one crop/flip of its own input
        seen.add(matches[0])
    assert len(seen) > 50 and {flip for _, _, flip in seen} == {0, 1}


def test_training_batches_keep_labels_aligned(tiny_imagefolder):
    data = DeviceData(load_dataset(tiny_imagefolder), val_size=20, split_seed=0, device=torch.device("cpu"))
    batches = data.train_batches(16, torch.Generator().manual_seed(0))
    mean, std = data.mean, data.std
    for _ in range(10):
        images, labels = next(batches)
        raw = (images * std + mean).round()
        center = raw[:, 1, 16, 16]  # within any 4-pixel crop and flip of a solid class image
        assert center.tolist() == [class_color(int(label)) for label in labels]


REAL_DATA = os.environ.get("RANKSEARCH_CIFAR_DIR", "")


@pytest.mark.skipif(not Path(REAL_DATA, "train").is_dir(), reason="set RANKSEARCH_CIFAR_DIR to the extracted copy")
def test_real_cifar10_jpeg_copy_loads_with_the_default_split():
    data = DeviceData(load_dataset(REAL_DATA), val_size=5000, split_seed=0, device=torch.device("cpu"))
    assert [data.size(s) for s in ("train", "val", "test")] == [45_000, 5_000, 10_000]
    assert data.classes[0] == "airplane" and data.classes[-1] == "truck"

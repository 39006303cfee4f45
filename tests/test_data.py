import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from conftest import CLASSES, class_color, write_imagefolder
from ranksearch.data.datasets import (
    CACHE_NAME,
    DeviceData,
    augment,
    check_classes,
    data_identity,
    detect_source,
    load_dataset,
    split_train_val,
)  # fmt: skip
from ranksearch.utils.errors import UserError


def test_imagefolder_is_decoded_once_and_cached(tmp_path, monkeypatch):
    root = write_imagefolder(tmp_path / "cifar", train_per_class=3, test_per_class=2)
    assert detect_source(root) == "imagefolder"
    first = load_dataset(root)
    assert (root / CACHE_NAME).is_file()
    assert first.classes == CLASSES
    assert first.train.images.shape == (30, 3, 32, 32) and first.train.images.dtype == torch.uint8
    assert first.test.labels.tolist() == [label for label in range(10) for _ in range(2)]
    assert int(first.train.images[5, 1, 10, 10]) == class_color(int(first.train.labels[5]))
    monkeypatch.setattr("ranksearch.data.datasets._decode_one", None)  # the second start reads the cache alone
    second = load_dataset(root)
    assert torch.equal(second.train.images, first.train.images)


def test_the_cache_follows_the_files_it_was_made_from(tmp_path):
    root = write_imagefolder(tmp_path / "cifar", train_per_class=3, test_per_class=2)
    first = load_dataset(root)
    moved = root / "train" / "class0" / "0000.png"
    moved.rename(root / "train" / "class1" / "0009.png")  # one image changes class: same counts, same classes
    second = load_dataset(root)
    assert second.fingerprint != first.fingerprint
    assert second.train.labels.tolist().count(1) == 4 and second.train.labels.tolist().count(0) == 2
    image = root / "train" / "class2" / "0001.png"
    Image.open(image).point(lambda v: 255 - v).save(image)  # new pixels in place
    third = load_dataset(root)
    assert third.fingerprint != second.fingerprint
    assert int(third.train.images[third.train.labels == 2][1, 1, 10, 10]) == 255 - class_color(2)


def test_a_cache_whose_contents_disagree_with_its_record_is_rebuilt_not_crashed_on(tmp_path, capsys):
    root = write_imagefolder(tmp_path / "cifar", train_per_class=3, test_per_class=2)
    first = load_dataset(root)
    cache = torch.load(root / CACHE_NAME, weights_only=True)
    cache["train_labels"] = cache["train_labels"][:5]  # contents no longer match: an IndexError before
    torch.save(cache, root / CACHE_NAME)
    again = load_dataset(root)
    assert "decoding again" in capsys.readouterr().err
    assert again.fingerprint == first.fingerprint and torch.equal(again.train.labels, first.train.labels)
    (root / CACHE_NAME).write_bytes(b"garbage")
    assert load_dataset(root).fingerprint == first.fingerprint


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0 truncated jpeg", b"not an image"])
def test_an_undecodable_image_is_named(tmp_path, content):
    root = write_imagefolder(tmp_path / "cifar", train_per_class=2, test_per_class=1)
    bad = root / "train" / "class3" / "0001.jpg"
    bad.write_bytes(content)
    with pytest.raises(UserError, match=f"1 image\\(s\\) cannot be decoded, first {bad}.*remove or replace"):
        load_dataset(root)


def test_a_truncated_jpeg_is_refused(tmp_path):
    root = write_imagefolder(tmp_path / "cifar", train_per_class=2, test_per_class=1)
    good = root / "test" / "class0" / "0000.jpg"
    Image.new("RGB", (32, 32), (10, 200, 30)).save(good, quality=90)
    good.write_bytes(good.read_bytes()[:300])
    with pytest.raises(UserError, match="0000.jpg"):
        load_dataset(root)


def test_identity_names_the_data_and_the_exact_split(tiny_imagefolder, tmp_path):
    dataset = load_dataset(tiny_imagefolder)
    identity = data_identity(dataset, 20, 0)
    assert identity == DeviceData(dataset, 20, 0, torch.device("cpu")).identity
    assert identity["source"] == "imagefolder" and identity["fingerprint"] == dataset.fingerprint
    assert data_identity(dataset, 20, 1)["split"] != identity["split"]
    assert data_identity(dataset, 21, 0)["split"] != identity["split"]
    smaller = load_dataset(write_imagefolder(tmp_path / "small", train_per_class=11, test_per_class=3))
    assert smaller.fingerprint != dataset.fingerprint


def test_num_classes_must_match_the_class_folders(tiny_imagefolder):
    with pytest.raises(UserError, match="num_classes is 5 but --data-dir .* has 10 classes.*set num_classes: 10"):
        check_classes(load_dataset(tiny_imagefolder), 5, tiny_imagefolder)


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


def test_augment_gives_the_pixels_earlier_versions_gave():
    """The gathers draw and place exactly what 0.10.0's indexing did: resumed studies measure alike."""

    def by_indexing(images, generator, padding=4):
        b, c, h, w = images.shape
        shifts = torch.randint(0, 2 * padding + 1, (2, b), generator=generator)
        flips = torch.rand(b, generator=generator) < 0.5
        padded = torch.nn.functional.pad(images, (padding,) * 4)
        rows, cols = shifts[0, :, None] + torch.arange(h), shifts[1, :, None] + torch.arange(w)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        index = torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None]
        return padded[(*index, rows[:, None, :, None], cols[:, None, None, :])]

    for seed, shape in enumerate([(16, 3, 32, 32), (5, 3, 40, 24), (1, 1, 8, 8)]):
        images = torch.randint(0, 256, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
        expected = by_indexing(images, torch.Generator().manual_seed(seed))
        assert torch.equal(augment(images, torch.Generator().manual_seed(seed)), expected)


@pytest.mark.parametrize("draw_steps", [64, 2])  # an epoch's draws at once, and in chunks across its steps
def test_training_batches_are_the_ones_drawn_batch_by_batch(tiny_imagefolder, monkeypatch, draw_steps):
    """Crops and flips drawn many steps at a time (one copy to a GPU per chunk) are the ones 0.11.0 drew batch by
    batch after each epoch's permutation: the same batches, so resumed studies measure alike."""
    monkeypatch.setattr("ranksearch.data.datasets.DRAW_STEPS", draw_steps)
    data = DeviceData(load_dataset(tiny_imagefolder), val_size=20, split_seed=0, device=torch.device("cpu"))

    def batch_by_batch(batch_size, generator):
        n = data.size("train")
        while True:
            order = torch.randperm(n, generator=generator)
            for start in range(0, n - batch_size + 1, batch_size):
                chunk = order[start : start + batch_size]
                images = data.splits["train"].images[chunk]
                yield data.normalize(augment(images, generator)), data.splits["train"].labels[chunk]

    per_epoch = data.size("train") // 16
    pairs = zip(data.train_batches(16, torch.Generator().manual_seed(5)),
                batch_by_batch(16, torch.Generator().manual_seed(5)), strict=True)  # fmt: skip
    for _ in range(2 * per_epoch + 1):  # across two epochs' boundaries
        (images, labels), (expected_images, expected_labels) = next(pairs)
        assert torch.equal(images, expected_images) and torch.equal(labels, expected_labels)


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

"""Data that does not fit in memory: decoded once into memory-mapped files beside the images, read in batches.

An ImageFolder tree whose decoded pixels are over the memory limit (``memory_limit``: a share of the RAM, and of a
GPU's memory, over the workers' copies) is decoded image by image into ``<data_dir>/.ranksearch-mapped-v1/``
(``train.npy``, ``test.npy``: uint8 (N, 3, H, W)), never held whole. ``StreamedData`` then gathers each batch's
images from the map on the CPU, one batch ahead in a thread, and moves them to the device, where they are
augmented as ``DeviceData`` does with the same generator draws: the same batches as the in-memory path, and the
same data identity (the fingerprint hashes the same bytes in the same order). The pages a batch read are dropped
from the process after it (``madvise``), so its memory is bounded by the batch; the OS page cache keeps them for
the next epoch where it can.
"""

import hashlib
import json
import mmap
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ..utils.errors import UserError, first_line
from ..utils.files import atomic_save, partial_path, read_or_make
from .datasets import DeviceData, ImageTensors, decode_each, made_from, to_device, val_indices
from .inputs import pixel_statistics

MAPPED_NAME = ".ranksearch-mapped-v1"  # the folder of the memory-mapped decode cache, in the data folder


def _ram_bytes() -> int:
    """This machine's RAM, or the memory limit of this process's control group (a container's) when lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(limit).read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
    return total


def memory_limit(share: float, workers: int, device: torch.device) -> int:
    """The bytes of decoded pixels one process may hold in memory: ``share`` of the RAM over the ``workers``
    processes' copies, and on a GPU of its memory over the workers sharing it (workers go to GPUs in turn)."""
    limit = share * _ram_bytes() / workers
    if device.type == "cuda":
        gpus = max(1, torch.cuda.device_count())
        limit = min(limit, share * torch.cuda.get_device_properties(device).total_memory / -(-workers // gpus))
    return int(limit)


class MappedImages:
    """uint8 images (N, C, H, W) in an .npy file, memory-mapped read-only. Reads return copies (torch tensors),
    after which the pages read are dropped from this process."""

    def __init__(self, path: Path):
        with open(path, "rb") as file:
            if np.lib.format.read_magic(file) != (1, 0):  # the version ``_write_images`` writes
                raise ValueError(f"{path.name} is not an .npy file of version 1.0")
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
            if fortran or dtype != np.uint8 or len(shape) != 4:
                raise ValueError(f"{path.name} holds no uint8 (N, C, H, W) images")
            self.map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
            self.array = np.ndarray(shape, np.uint8, buffer=self.map, offset=file.tell())
        self.shape = torch.Size(shape)

    def __len__(self) -> int:
        return self.shape[0]

    def numel(self) -> int:
        return self.shape.numel()

    def _copied(self, rows: np.ndarray) -> torch.Tensor:
        if hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED)  # the file's pages leave this process (they stay in the page cache)
        return torch.from_numpy(rows)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        """A slice of the images, as ``pixel_statistics`` reads them."""
        return self._copied(np.array(self.array[rows]))

    def rows(self, indices: np.ndarray) -> torch.Tensor:
        """The images at ``indices``, in their order."""
        return self._copied(self.array[indices])


def _write_images(files, path: Path, size: tuple[int, int], first: Path, what: str, digest) -> None:
    """Decode ``files`` into the .npy file ``path`` one image at a time (``decode_each``'s checks), hashing the
    pixels in order into ``digest``."""
    width, height = size
    shape = (len(files), 3, height, width)
    with open(path, "wb") as file:
        np.lib.format.write_array_header_1_0(file, {"descr": "|u1", "fortran_order": False, "shape": shape})
        start, image_bytes = file.tell(), 3 * height * width

        def put(index: int, pixels: np.ndarray) -> None:
            chw = np.ascontiguousarray(pixels.transpose(2, 0, 1)).tobytes()  # (3, H, W)
            file.seek(start + index * image_bytes)
            file.write(chw)
            digest.update(chw)

        decode_each(files, f"decoding {what} images", size, first, put)
        file.truncate(start + len(files) * image_bytes)


def _stamp(path: Path) -> list[int]:
    """What changes when a file is rewritten, edited in place or replaced: its size, times and inode."""
    status = path.stat()
    return [status.st_size, status.st_mtime_ns, status.st_ctime_ns, status.st_ino]


def _labels(files) -> torch.Tensor:
    return torch.tensor([label for _, label in files], dtype=torch.long)


def load_mapped(data_dir: Path, classes: list[str], train_files, test_files, key: str, size, first: Path):
    """The dataset of ``data_dir`` with its images memory-mapped (``MappedImages``): the cache read when it was
    made from exactly these files (``key``) and is as written, else decoded into it first (by one process when
    several start at once)."""
    from .datasets import Dataset

    folder = data_dir / MAPPED_NAME
    meta = folder / "meta.pt"
    try:
        folder.mkdir(exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot write the memory-mapped images to {folder} ({first_line(error)}): the data is "
                        "larger than data_memory_share allows in memory; make the data folder writable or raise "
                        "data_memory_share") from None  # fmt: skip

    def read() -> Dataset | None:
        if not meta.is_file():
            return None
        try:
            saved = made_from(meta, key, classes)
            if saved is None:
                return None
            if saved["stamps"] != [_stamp(folder / f"{split}.npy") for split in ("train", "test")]:
                raise ValueError("the image files changed after they were written")
            train = ImageTensors(MappedImages(folder / "train.npy"), saved["train_labels"])
            test = ImageTensors(MappedImages(folder / "test.npy"), saved["test_labels"])
            statistics = tuple(map(tuple, saved["pixel_statistics"]))
            return Dataset(train, test, classes, "imagefolder", saved["fingerprint"], statistics)
        except Exception as error:  # truncated, edited or foreign: never trusted, never fatal
            print(f"note: memory-mapped images in {folder} are unusable ({type(error).__name__}); decoding again",
                  file=sys.stderr)  # fmt: skip
            return None

    def decode() -> Dataset:
        pixels = (len(train_files) + len(test_files)) * 3 * size[0] * size[1]
        print(f"data: {pixels / 2**20:,.1f} MB of decoded images are over data_memory_share of the memory: decoding "
              f"them into memory-mapped files in {folder}, read from there in batches", file=sys.stderr, flush=True)
        digest = hashlib.sha256(json.dumps({"source": "imagefolder", "classes": classes}).encode())
        labels, partials = {}, {split: partial_path(folder / f"{split}.npy") for split in ("train", "test")}
        try:  # both written before either takes its name: a bad test image leaves no train file behind
            for split, files in (("train", train_files), ("test", test_files)):
                labels[split] = _labels(files)
                digest.update(labels[split].numpy().astype("<i8").tobytes())
                _write_images(files, partials[split], size, first, split, digest)
            for split, partial in partials.items():
                os.replace(partial, folder / f"{split}.npy")
        except BaseException:
            for partial in partials.values():
                partial.unlink(missing_ok=True)
            raise
        train = ImageTensors(MappedImages(folder / "train.npy"), labels["train"])
        test = ImageTensors(MappedImages(folder / "test.npy"), labels["test"])
        dataset = Dataset(train, test, classes, "imagefolder", digest.hexdigest()[:16], _statistics(train))
        atomic_save({"files_key": key, "classes": classes, "fingerprint": dataset.fingerprint,
                     "pixel_statistics": list(dataset.statistics), "train_labels": labels["train"],
                     "test_labels": labels["test"],
                     "stamps": [_stamp(folder / f"{split}.npy") for split in ("train", "test")]}, meta)  # fmt: skip
        return dataset

    waiting = f"data: another process is decoding {data_dir} into {folder.name}; waiting for it"
    return read_or_make(meta, read, decode, waiting)


STATISTICS_VALUES = 1 << 22  # pixel values per chunk of the statistics pass: 32 MB of float64, whatever the size


def _statistics(train: ImageTensors) -> tuple:
    """The training images' per-channel (mean, std) (``inputs.pixel_statistics``), computed once at decode, in
    chunks of ``STATISTICS_VALUES`` values."""
    return pixel_statistics(train.images, chunk=max(1, STATISTICS_VALUES // train.images.shape[1:].numel()))


class StreamedData(DeviceData):
    """``DeviceData``'s splits, read from memory-mapped images: each batch gathered on the CPU (the next one
    meanwhile, in a thread) and moved to the device; ``DeviceData.train_batches`` draws and augments them, so they
    are the batches it gives in memory."""

    def __init__(self, dataset, val_size: int, split_seed: int, device: torch.device, normalize: str = "auto"):
        train_idx, val_idx = val_indices(len(dataset.train.labels), val_size, split_seed)
        test_idx = torch.arange(len(dataset.test.labels))
        self._describe(dataset, val_size, split_seed, device, normalize)
        self.sources = {"train": (dataset.train, train_idx), "val": (dataset.train, val_idx),
                        "test": (dataset.test, test_idx)}  # fmt: skip
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ranksearch-gather")

    def size(self, split: str) -> int:
        return len(self.sources[split][1])

    def _batches(self, split: str, chunks: list[torch.Tensor]):
        """The batches at ``chunks`` (positions each) on the device, each one's images read from the map in a thread
        while the one before is used. That thread runs no torch op: one would start an OpenMP team of its own,
        whose spinning made a val pass 1.8x slower on 2 cores."""
        data, index = self.sources[split]
        rows = [index[chunk].numpy() for chunk in chunks]
        pending = self.pool.submit(data.images.rows, rows[0]) if rows else None
        for number, batch_rows in enumerate(rows):
            images = pending.result()
            if number + 1 < len(rows):
                pending = self.pool.submit(data.images.rows, rows[number + 1])
            labels = data.labels[torch.from_numpy(batch_rows)]
            yield to_device(images, self.device), to_device(labels, self.device)  # pinned: the copy does not block

    @property
    def index_device(self) -> torch.device:
        """Positions pick rows of the map on the CPU."""
        return torch.device("cpu")

    def eval_batches(self, split: str, batch_size: int, every: int = 1):
        positions = torch.arange(0, self.size(split), every)
        for images, labels in self._batches(split, list(positions.split(batch_size))):
            yield self.normalize(images), labels

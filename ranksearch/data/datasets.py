"""Image data as uint8 tensors: find it, decode it once, cache it, split it, and cut batches on the device.

Accepted in ``--data-dir``: an ImageFolder tree with ``train/`` and ``test/`` (one folder per class; any number of
classes, any image size shared by all its images), or torchvision's CIFAR-10 folder (``cifar-10-batches-py``), which
torchvision can also download. The data gives the models' input spec (``input_spec``: size, mean/std, classes).
"""

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..utils.errors import UserError, first_line
from ..utils.files import atomic_save, read_or_make
from ..utils.steps import draws_bars
from .inputs import CIFAR10_CLASSES, CIFAR_SIZE, InputSpec, pixel_statistics, spec_of

CROP_PADDING = 4
DRAW_STEPS = 64  # the training batches' crops and flips are drawn this many steps at a time, and copied to the
# device at once: no copy per step (one to a GPU waits for its queue), nor a whole epoch's for a 200-step fine-tune
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
# v2: validated by the files and the pixels' fingerprint; v3: images kept at their own size (v2 resized to 32x32)
CACHE_NAME = ".ranksearch-cache-v3.pt"
ACCEPTED = (
    "an ImageFolder tree with train/ and test/ (one subfolder per class), "
    "or torchvision's CIFAR-10 folder (cifar-10-batches-py)"
)


@dataclass
class ImageTensors:
    images: torch.Tensor  # (N, 3, H, W) uint8
    labels: torch.Tensor  # (N,) int64


@dataclass
class Dataset:
    train: ImageTensors
    test: ImageTensors
    classes: list[str]
    source: str  # "imagefolder" or "torchvision"
    fingerprint: str = ""  # of source, classes, labels and pixels in loading order (``content_fingerprint``)
    statistics: tuple | None = None  # the training images' (mean, std) per channel when known (computed at decode)

    def __post_init__(self):
        if not self.fingerprint:
            self.fingerprint = content_fingerprint(self)


def content_fingerprint(dataset: Dataset) -> str:
    """sha256 of the layout, the class names, and every label and pixel of both splits, in loading order.

    Two copies of CIFAR-10 in different layouts load in different orders, so they get different fingerprints
    (their train/val splits differ too). ~0.3 s for CIFAR-10.
    """
    digest = hashlib.sha256(json.dumps({"source": dataset.source, "classes": dataset.classes}).encode())
    for split in (dataset.train, dataset.test):
        digest.update(split.labels.numpy().astype("<i8").tobytes())
        digest.update(split.images.contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _torchvision_root(data_dir: Path) -> Path | None:
    if (data_dir / "cifar-10-batches-py").is_dir():
        return data_dir
    if data_dir.name == "cifar-10-batches-py" and data_dir.is_dir():
        return data_dir.parent
    return None


def detect_source(data_dir: Path) -> str | None:
    """ "imagefolder", "torchvision", or None when ``data_dir`` holds neither layout."""
    if (data_dir / "train").is_dir() and (data_dir / "test").is_dir():
        return "imagefolder"
    if _torchvision_root(data_dir) is not None:
        return "torchvision"
    return None


def load_dataset(data_dir: str | Path, download: bool = False, memory_limit: int | None = None) -> Dataset:
    """Load the dataset in ``data_dir`` (either layout of ``ACCEPTED``), downloading torchvision's CIFAR-10 there if
    allowed and it holds neither; an ImageFolder tree whose decoded pixels are over ``memory_limit`` bytes with its
    images memory-mapped (``ranksearch.data.stream``)."""
    data_dir = Path(data_dir).expanduser()
    source = detect_source(data_dir)
    if source is None and download:
        _download(data_dir)
        source = detect_source(data_dir)
    if source is None:
        raise UserError(
            f"no dataset found in --data-dir {data_dir}: point it at {ACCEPTED}"
            + ("" if download else ", or allow downloading torchvision's CIFAR-10 with --download")
        )
    if source == "torchvision":
        return _load_torchvision(_torchvision_root(data_dir))
    return _load_imagefolder_cached(data_dir, memory_limit)


def _download(data_dir: Path) -> None:
    from torchvision.datasets import CIFAR10

    print(f"downloading CIFAR-10 into {data_dir} ...", file=sys.stderr)
    made = [folder for folder in (data_dir, *data_dir.parents) if not folder.exists()]  # the ones it creates
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        CIFAR10(str(data_dir), train=True, download=True)
    except Exception as error:  # no network, no permission, ...
        for folder in made:  # innermost first: a failed start leaves no folder of its own behind
            _remove_if_empty(folder)
        raise UserError(
            f"no CIFAR-10 in --data-dir {data_dir} and the download failed ({error}); point --data-dir at {ACCEPTED}"
        ) from None


def _remove_if_empty(folder: Path) -> None:
    """``folder`` removed when it holds nothing but a partial download's leftovers (torchvision's empty archive)."""
    try:
        for leftover in folder.glob("cifar-10-python.tar.gz"):
            if leftover.stat().st_size == 0:
                leftover.unlink()
        folder.rmdir()  # only when empty
    except OSError:
        pass


def _load_torchvision(root: Path) -> Dataset:
    from torchvision.datasets import CIFAR10

    def split(train: bool) -> tuple[ImageTensors, list[str]]:
        ds = CIFAR10(str(root), train=train, download=False)
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        return ImageTensors(images, torch.tensor(ds.targets, dtype=torch.long)), list(ds.classes)

    try:
        (train, classes), (test, _) = split(True), split(False)
    except Exception as error:  # missing or corrupt batch files (RuntimeError, pickle errors, ...)
        raise UserError(
            f"torchvision CIFAR-10 folder in {root} is incomplete or corrupt ({type(error).__name__}: "
            f"{first_line(error)}); delete it and download again"
        ) from None
    return Dataset(train, test, classes, "torchvision")


def _image_files(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """The class folders of ``split_dir`` and their image files; a one-line UserError naming any image name that
    is no regular file (a FIFO would block the decoder forever, a dangling link cannot be read)."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    files = [
        (path, label)
        for label, name in enumerate(classes)
        for path in sorted((split_dir / name).iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    special = [path for path, _ in files if not path.is_file()]  # is_file follows links: dangling ones fail too
    if special:
        raise UserError(f"{len(special)} image name(s) in {split_dir} are not regular files (a dangling link, a FIFO, "
                        f"a folder...), first {special[0]}; remove them")  # fmt: skip
    return classes, files


SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N"}  # Pillow's 16-bit grayscale (a 16-bit PNG or TIFF)
DECODER = 2  # in the decode cache's key; 2: 16-bit images scaled to 8 bits, 32-bit ones refused (1: clipped)


class PixelFormatError(ValueError):
    """An image whose pixels have no known 8-bit form (32-bit integers or floats: their range is the writer's)."""


def _decode_one(path: Path) -> np.ndarray:
    """The image at ``path`` as 8-bit RGB, (H, W, 3). 16-bit grayscale keeps its high byte (``convert("RGB")``
    clipped it: a 16-bit PNG was nearly all white); 32-bit integer and float images are refused."""
    from PIL import Image

    with Image.open(path) as image:
        if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):  # older Pillow: "I"
            gray = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)  # 0..65535 -> 0..255
            return np.repeat(gray[..., None], 3, axis=2)
        if image.mode in ("I", "F"):
            kind = "floats" if image.mode == "F" else "integers"
            raise PixelFormatError(f"32-bit {kind} (mode {image.mode}), whose range no file states; save it as "
                                   "8-bit or 16-bit")  # fmt: skip
        return np.asarray(image.convert("RGB"))  # (H, W, 3)


def image_size(files: list[tuple[Path, int]]) -> tuple[int, int]:
    """(width, height) of the first of ``files`` that opens (read from its header): the size every image must have.
    CIFAR's when none opens: decoding then names the broken files."""
    from PIL import Image

    for path, _ in files:
        try:
            with Image.open(path) as image:
                return image.size
        except Exception:  # not an image: ``_decode`` reports it
            continue
    return CIFAR_SIZE, CIFAR_SIZE


def decode_each(files: list[tuple[Path, int]], desc: str, size: tuple[int, int], first: Path, put) -> None:
    """Decode every file, calling ``put(index, pixels)`` (H, W, 3) for each in order; refuse the data, naming the
    files, when any image cannot be decoded or is not ``size`` (width, height: that of ``first``, train/'s first)."""
    width, height = size
    bad: list[tuple[Path, Exception]] = []
    sized: list[tuple[Path, tuple[int, int]]] = []  # decoded, but of another size
    shown = tqdm(files, desc=desc, unit="img", file=sys.stderr, leave=False, disable=not draws_bars())
    for index, (path, _) in enumerate(shown):
        try:
            pixels = _decode_one(path)
        except Exception as error:  # zero-byte, truncated, not an image, ...
            bad.append((path, error))
            continue
        if pixels.shape[:2] != (height, width):
            sized.append((path, (pixels.shape[1], pixels.shape[0])))
            continue
        put(index, pixels)
    if bad:
        path, error = bad[0]
        raise UserError(
            f"{len(bad)} image(s) cannot be decoded, first {path} ({type(error).__name__}: "
            f"{first_line(error)}); remove or replace them"
        )
    if sized:
        path, (w, h) = sized[0]
        raise UserError(
            f"{len(sized)} image(s) are not {width}x{height} like {first} (train/'s first), first {path} ({w}x{h}); "
            f"resize every image of train/ and test/ to one size"
        )


def _decode(files: list[tuple[Path, int]], desc: str, size: tuple[int, int], first: Path) -> ImageTensors:
    """Every file decoded into one uint8 tensor (``decode_each``'s checks)."""
    width, height = size
    images = np.empty((len(files), height, width, 3), dtype=np.uint8)
    decode_each(files, desc, size, first, images.__setitem__)
    labels = torch.tensor([label for _, label in files], dtype=torch.long)
    return ImageTensors(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels)


def files_key(data_dir: Path, files: list[tuple[Path, int]]) -> str:
    """What the decode cache was made from: every file's path, label, size, modification and change times, inode.

    Moving an image to another class, adding, removing or rewriting one changes the key; so does an edit in place
    that keeps the size and sets the modification time back (its change time, which no program can set, moves).
    """
    digest = hashlib.sha256(f"decoder {DECODER}\n".encode())  # a cache decoded otherwise is decoded again
    for path, label in files:
        stat = path.stat()
        times = f"{stat.st_mtime_ns}\0{stat.st_ctime_ns}\0{stat.st_ino}"
        digest.update(f"{path.relative_to(data_dir)}\0{label}\0{stat.st_size}\0{times}\n".encode())
    return digest.hexdigest()


def _load_imagefolder_cached(data_dir: Path, memory_limit: int | None = None) -> Dataset:
    """Decode the ImageFolder tree once; later starts read the uint8 cache saved beside it. Processes started
    together decode once: one decodes and saves under the cache's lock, the others wait and read its file. Decoded
    pixels over ``memory_limit`` bytes go to memory-mapped files instead (``stream.load_mapped``)."""
    (classes, train_files), (test_classes, test_files) = (
        _image_files(data_dir / "train"),
        _image_files(data_dir / "test"),
    )
    if not train_files or not test_files:
        raise UserError(f"--data-dir {data_dir} has no images under train/ or test/: it needs {ACCEPTED}")
    if classes != test_classes:
        raise UserError(f"--data-dir {data_dir}: train/ and test/ hold different class folders")
    key = files_key(data_dir, train_files + test_files)
    cache = data_dir / CACHE_NAME
    size, first = image_size(train_files), train_files[0][0]
    if memory_limit is not None and (len(train_files) + len(test_files)) * size[0] * size[1] * 3 > memory_limit:
        from .stream import load_mapped

        return load_mapped(data_dir, classes, train_files, test_files, key, size, first)

    def decode() -> Dataset:
        train = _decode(train_files, "decoding train images", size, first)
        test = _decode(test_files, "decoding test images", size, first)
        dataset = Dataset(train, test, classes, "imagefolder")
        dataset.statistics = pixel_statistics(train.images)  # kept in the cache: a pass over every pixel, once
        _save_cache(cache, dataset, key)
        return dataset

    waiting = f"data: another process is decoding {data_dir} into {cache.name}; waiting for it"
    return read_or_make(cache, lambda: _read_cache(cache, key, classes), decode, waiting)


def made_from(cache: Path, key: str, classes: list[str]) -> dict | None:
    """The torch file ``cache`` when it was made from exactly these files (``files_key``) and classes; None, with a
    note, when it was made from others."""
    saved = torch.load(cache, weights_only=True)
    if saved["files_key"] != key or saved["classes"] != classes:
        print(f"note: {cache} was made from other files; decoding again", file=sys.stderr)
        return None
    return saved


def _read_cache(cache: Path, key: str, classes: list[str]) -> Dataset | None:
    """The cached dataset if it was made from exactly these files and its pixels still match its fingerprint."""
    if not cache.is_file():
        return None
    try:
        saved = made_from(cache, key, classes)
        if saved is None:
            return None
        train = ImageTensors(saved["train_images"], saved["train_labels"])
        test = ImageTensors(saved["test_images"], saved["test_labels"])
        statistics = saved.get("pixel_statistics")  # caches of 0.10.0 and before have none: computed each start
        dataset = Dataset(train, test, classes, "imagefolder", statistics=statistics and tuple(map(tuple, statistics)))
        if dataset.fingerprint != saved["fingerprint"]:  # computed from the contents
            raise ValueError("contents differ from the fingerprint recorded when decoding")
        return dataset
    except Exception as error:  # truncated, edited or foreign: never trusted, never fatal
        print(f"note: decode cache {cache} is unusable ({type(error).__name__}); decoding again", file=sys.stderr)
        return None


def _save_cache(cache: Path, dataset: Dataset, key: str) -> None:
    payload = {
        "files_key": key,
        "classes": dataset.classes,
        "fingerprint": dataset.fingerprint,
        "pixel_statistics": dataset.statistics,
        "train_images": dataset.train.images,
        "train_labels": dataset.train.labels,
        "test_images": dataset.test.images,
        "test_labels": dataset.test.labels,
    }
    try:
        atomic_save(payload, cache)
    except (OSError, RuntimeError) as error:  # torch.save reports an unwritable path as RuntimeError
        reason = first_line(error)
        print(f"note: cannot write the decode cache {cache} ({reason}); decoding each start", file=sys.stderr)


def val_indices(count: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices) of ``count`` training images: ``val_size`` held out by a fixed seed."""
    if not 0 < val_size < count:
        raise UserError(f"val_size {val_size} must be between 1 and {count - 1} (training images - 1)")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))
    return order[val_size:].sort().values, order[:val_size].sort().values


def split_train_val(train: ImageTensors, val_size: int, seed: int) -> tuple[ImageTensors, ImageTensors]:
    """Hold ``val_size`` images out of the training set, chosen by a fixed seed."""
    train_idx, val_idx = val_indices(len(train.labels), val_size, seed)
    return (
        ImageTensors(train.images[train_idx], train.labels[train_idx]),
        ImageTensors(train.images[val_idx], train.labels[val_idx]),
    )


def data_identity(dataset: Dataset, val_size: int, split_seed: int) -> dict[str, str]:
    """What a baseline and a study were measured on: the data's fingerprint and the exact val split."""
    _, val_idx = val_indices(len(dataset.train.labels), val_size, split_seed)
    split = hashlib.sha256(dataset.fingerprint.encode() + val_idx.numpy().astype("<i8").tobytes())
    return {"source": dataset.source, "fingerprint": dataset.fingerprint, "split": split.hexdigest()[:16]}


class DeviceData:
    """Train / val / test splits resident on the training device as uint8; batches cut there."""

    def __init__(self, dataset: Dataset, val_size: int, split_seed: int, device: torch.device,
                 normalize: str = "auto"):  # fmt: skip
        train, val = split_train_val(dataset.train, val_size, split_seed)
        self._describe(dataset, val_size, split_seed, device, normalize)
        self.splits = {
            name: ImageTensors(t.images.to(device), t.labels.to(device))
            for name, t in (("train", train), ("val", val), ("test", dataset.test))
        }

    def _describe(self, dataset: Dataset, val_size: int, split_seed: int, device: torch.device, normalize: str):
        """What the data is and how it is fed, whatever holds its images: its device, classes, identity and spec."""
        self.device = device
        self.classes = dataset.classes
        self.identity = data_identity(dataset, val_size, split_seed)  # recorded by baselines and studies
        self.spec = input_spec(dataset, normalize)  # what the models take: size, mean/std, classes
        self.mean = torch.tensor(self.spec.mean, device=device).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(self.spec.std, device=device).view(1, -1, 1, 1) * 255

    def size(self, split: str) -> int:
        return len(self.splits[split].labels)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float() - self.mean) / self.std

    def train_batches(self, batch_size: int, generator: torch.Generator):
        """Endless augmented batches: a fresh permutation per epoch, each image its own crop and flip. The images
        come from ``_batches`` (resident here, streamed in ``stream.StreamedData``): the same draws either way."""
        n = self.size("train")
        batch_size = min(batch_size, n)
        while True:
            order = to_device(torch.randperm(n, generator=generator), self.index_device)
            steps = n // batch_size
            batches = self._batches("train", [order[s * batch_size : (s + 1) * batch_size] for s in range(steps)])
            for first in range(0, steps, DRAW_STEPS):  # the draws come from the generator in the order of the steps
                count = min(DRAW_STEPS, steps - first)
                shifts, flips = (to_device(t, self.device) for t in augmentation_draws(generator, count, batch_size))
                for step in range(count):
                    images, labels = next(batches)
                    yield self.normalize(crop_and_flip(images, shifts[step], flips[step])), labels

    @property
    def index_device(self) -> torch.device:
        """Where a batch's positions are used to pick its images: the device, which holds them."""
        return self.device

    def _batches(self, split: str, chunks: list[torch.Tensor]):
        """The uint8 images and labels at each of ``chunks`` (positions of ``split``, on ``index_device``)."""
        data = self.splits[split]
        for positions in chunks:
            yield data.images[positions], data.labels[positions]

    def eval_batches(self, split: str, batch_size: int, every: int = 1):
        """Batches of ``split`` in order; ``every`` > 1: every that-many-th image only (a slice spread over the
        split, whose images are in class order)."""
        data = self.splits[split]
        images, labels = (data.images, data.labels) if every == 1 else (data.images[::every], data.labels[::every])
        for start in range(0, len(labels), batch_size):
            yield self.normalize(images[start : start + batch_size]), labels[start : start + batch_size]


def input_spec(dataset: Dataset, normalize: str = "auto") -> InputSpec:
    """The input of models trained on ``dataset``: its images' size, their normalization (``spec_of``: by default
    CIFAR-10's constants at 32x32, else the training images' own statistics; or ``normalize``'s) and its class
    names."""
    return spec_of(dataset.train.images, dataset.classes, dataset.statistics, normalize)


def data_classes(data_dir: str | Path) -> list[str] | None:
    """The class names of the data in ``data_dir`` without decoding it: train/'s class folders, or CIFAR-10's for
    torchvision's folder; None when it holds neither (yet)."""
    data_dir = Path(data_dir).expanduser()
    source = detect_source(data_dir)
    if source == "torchvision":
        return list(CIFAR10_CLASSES)
    if source == "imagefolder":
        try:
            return sorted(d.name for d in (data_dir / "train").iterdir() if d.is_dir())
        except OSError:  # unreadable: loading the data says so
            return None
    return None


def device_data(config, device: torch.device) -> DeviceData:
    """The config's dataset, split and moved to ``device`` (streamed there from memory-mapped files when it is over
    ``data_memory_share``, ``ranksearch.data.stream``); its classes must be the config's ``num_classes``."""
    from .stream import StreamedData, memory_limit

    limit = memory_limit(config.data_memory_share, config.workers, device)
    dataset = load_dataset(config.data_dir, config.download, limit)
    check_classes(dataset, config.num_classes, config.data_dir)
    streamed = not isinstance(dataset.train.images, torch.Tensor)
    kind = StreamedData if streamed else DeviceData
    return kind(dataset, config.val_size, config.split_seed, device, config.normalize)


def check_classes(dataset: Dataset, num_classes: int, data_dir) -> None:
    found = len(dataset.classes)
    if found != num_classes:
        raise UserError(
            f"num_classes is {num_classes} but --data-dir {data_dir} has {found} classes "
            f"({', '.join(dataset.classes[:4])}{', ...' if found > 4 else ''}); set num_classes: {found}"
        )


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the CPU) on ``device`` without making the CPU wait for the GPU: a plain copy to a GPU waits for
    everything queued before it, which in a training loop leaves the GPU idle while the next step is prepared."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def augmentation_draws(generator: torch.Generator, steps: int, batch_size: int,
                       padding: int = CROP_PADDING) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``steps`` batches' crops and flips, drawn at once on the CPU in the order ``augment`` draws them batch by
    batch (the same values): shifts (steps, 2, B) in 0..2*padding and flips (steps, B)."""
    shifts = torch.empty((steps, 2, batch_size), dtype=torch.int64)
    flips = torch.empty((steps, batch_size), dtype=torch.bool)
    for step in range(steps):
        shifts[step] = torch.randint(0, 2 * padding + 1, (2, batch_size), generator=generator)
        flips[step] = torch.rand(batch_size, generator=generator) < 0.5
    return shifts, flips


def augment(images: torch.Tensor, generator: torch.Generator, padding: int = CROP_PADDING) -> torch.Tensor:
    """Per-image random crop (zero padding) and horizontal flip of a uint8 batch (B, C, H, W), drawn from
    ``generator``."""
    shifts, flips = augmentation_draws(generator, 1, len(images), padding)
    return crop_and_flip(images, shifts[0].to(images.device), flips[0].to(images.device), padding)


def crop_and_flip(images: torch.Tensor, shifts: torch.Tensor, flips: torch.Tensor,
                  padding: int = CROP_PADDING) -> torch.Tensor:  # fmt: skip
    """Each image of a uint8 batch (B, C, H, W) cropped at its ``shifts`` (2, B) from the zero-padded image and
    flipped where ``flips`` (B,), all on the images' device."""
    b, c, h, w = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding,) * 4)  # (B, C, H+2p, W+2p)
    rows = shifts[0, :, None] + torch.arange(h, device=device)  # (B, H)
    cols = shifts[1, :, None] + torch.arange(w, device=device)  # (B, W)
    cols = torch.where(flips[:, None], cols.flip(1), cols)  # a flip reverses the column order
    # rows, then columns, each a gather by an expanded (never materialized) index: no (B, C, H, W) int64 index
    picked = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * padding))  # (B, C, H, W+2p)
    return picked.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)

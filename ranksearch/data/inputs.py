"""What a model takes: the image size, the normalization and the name of each output, in one record.

``InputSpec`` is derived from the data (``datasets.input_spec``) and handed to everything that needs the input: MACs
counting, the cost table, latency, export's dummy inputs, and the exported file's ``input`` and ``classes``. A file
that predates the record is CIFAR-10's: ``CIFAR10_INPUT``, the default of the functions that take an input size.
"""

import math
from dataclasses import dataclass

import torch

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # CIFAR-10's training images, per RGB channel, of pixel / 255
CIFAR_STD = (0.2470, 0.2435, 0.2616)
CIFAR_SIZE = 32  # pixels, square
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MIN_STD = 1 / 255  # a channel that barely varies is scaled as if it varied by one gray level, never divided by 0


@dataclass(frozen=True)
class InputSpec:
    """Images a model takes: ``(pixel / 255 - mean) / std`` per RGB channel, NCHW, ``height`` x ``width``."""

    height: int = CIFAR_SIZE  # pixels
    width: int = CIFAR_SIZE  # pixels
    mean: tuple[float, ...] = CIFAR_MEAN  # per channel, of pixel / 255
    std: tuple[float, ...] = CIFAR_STD  # per channel, of pixel / 255
    classes: tuple[str, ...] = CIFAR10_CLASSES  # the name of each output, in order
    channels: int = 3  # RGB: every image is converted to RGB when decoded

    def shape(self) -> tuple[int, int, int]:
        """One image's shape, (C, H, W)."""
        return self.channels, self.height, self.width

    def input_size(self, batch: int = 1) -> tuple[int, int, int, int]:
        """A batch's shape, (B, C, H, W): what ``count_macs`` takes."""
        return batch, *self.shape()

    def record(self) -> dict:
        """The exported file's ``input``: how an image becomes the model's input (plain JSON values)."""
        return {
            "size": list(self.shape()), "channel_order": "RGB", "scale": "uint8 pixel / 255",
            "mean": list(self.mean), "std": list(self.std), "layout": "NCHW",
        }  # fmt: skip

    @classmethod
    def from_record(cls, record: dict, classes: list[str] | None) -> "InputSpec":
        """The spec an exported file records (its ``input`` and ``classes``)."""
        channels, height, width = record["size"]
        names = tuple(classes) if classes is not None else ()
        return cls(height, width, tuple(record["mean"]), tuple(record["std"]), names, channels)


CIFAR10_INPUT = InputSpec()  # CIFAR-10's: what files and functions that predate other inputs assume
CIFAR10_INPUT_SIZE = CIFAR10_INPUT.input_size()  # (1, 3, 32, 32): the default of the functions taking a batch shape
CIFAR10_SHAPE = CIFAR10_INPUT.shape()  # (3, 32, 32): the default of those taking one image's


def pixel_statistics(images: torch.Tensor, chunk: int = 1024) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of uint8 ``images`` (N, C, H, W) over every pixel, of pixel / 255, to 4 decimals
    (as CIFAR-10's constants are written); a std below ``MIN_STD`` is raised to it. In chunks: no float copy of all."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros_like(total)
    for start in range(0, len(images), chunk):
        part = images[start : start + chunk].to(torch.float64) / 255  # (b, C, H, W)
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    count = max(1, images.numel() // images.shape[1])
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(0).sqrt().clamp_min(MIN_STD)
    return tuple(round(float(m), 4) for m in mean), tuple(round(float(s), 4) for s in std)


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # what torchvision's pretrained models were trained with
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALIZATIONS = {"cifar10": (CIFAR_MEAN, CIFAR_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}
NORMALIZE_CHOICES = ("auto", "data", *NORMALIZATIONS, "M1,M2,M3/S1,S2,S3")


def parse_normalize(text: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """``normalize``'s (mean, std) per RGB channel: a preset's (``NORMALIZATIONS``) or ``m1,m2,m3/s1,s2,s3``'s;
    None for "auto" and "data" (the data's, ``spec_of``); ValueError when it is none of ``NORMALIZE_CHOICES``."""
    if text in ("auto", "data"):
        return None
    if text in NORMALIZATIONS:
        return NORMALIZATIONS[text]
    means, slash, stds = text.partition("/")
    try:
        mean, std = tuple(float(v) for v in means.split(",")), tuple(float(v) for v in stds.split(","))
    except ValueError:
        mean = std = ()
    if not (slash and len(mean) == len(std) == 3 and all(math.isfinite(v) for v in mean + std)
            and all(v > 0 for v in std)):  # fmt: skip
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE_CHOICES)} (three means, then three stds > "
                         f"0, of pixel / 255), got {text!r}")  # fmt: skip
    return mean, std


def spec_of(images: torch.Tensor, classes: list[str], statistics: tuple | None = None,
            normalize: str = "auto") -> InputSpec:  # fmt: skip
    """The input spec of a dataset whose training images are ``images`` (N, C, H, W), uint8.

    ``normalize`` "auto": images of CIFAR's 3x32x32 are normalized by CIFAR-10's constants, as every earlier version
    normalized all data (so baselines and studies made on 32x32 data keep theirs); images of any other size, and
    all with "data", by their own per-channel mean and std (``pixel_statistics``, or ``statistics`` when they are
    known). A preset or explicit ``normalize`` (``parse_normalize``): that mean and std, as a user's weights were
    trained with.
    """
    channels, height, width = images.shape[1:]
    given = parse_normalize(normalize)
    if given is not None:
        mean, std = given
    elif normalize == "auto" and (channels, height, width) == (3, CIFAR_SIZE, CIFAR_SIZE):
        mean, std = CIFAR_MEAN, CIFAR_STD
    elif statistics is not None:
        mean, std = statistics
    else:
        mean, std = pixel_statistics(images)
    return InputSpec(height, width, mean, std, tuple(classes), channels)

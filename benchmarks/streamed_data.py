"""Streamed against in-memory data: peak memory and throughput on a generated ImageFolder (issue 26).

    python benchmarks/streamed_data.py make /tmp/streamed --train 20000 --test 2000 --size 128
    python benchmarks/streamed_data.py compare /tmp/streamed
    python benchmarks/streamed_data.py statistics /tmp/streamed

``make`` writes an ImageFolder of JPEGs (10 classes; each image a smooth random pattern tinted by its class, so the
data is learnable and JPEG sizes are realistic). ``compare`` runs, one after the other, each in a fresh process so
that its peak RSS is its own: the in-memory path (``data_memory_share: 1``) and the streamed path
(``data_memory_share: 0``), each first decoding its cache and then, in a second process, reading it and running
``--steps`` augmented training batches and three passes over val, and prints each process's peak RSS
(``ru_maxrss``), the decoded pixels' size and the throughput in images per second, side by side.
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLASSES = 10


def make(root: Path, train: int, test: int, size: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("test", test)):
        for index in range(count):
            label = index % CLASSES
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # upsampled: smooth, photo-like
            image = Image.fromarray(coarse).resize((size, size), Image.BILINEAR)
            pixels = np.asarray(image).astype(np.int16)
            pixels[..., label % 3] += 40 + 8 * label  # the class's tint
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{index:06d}.jpg", quality=90)
    print(f"wrote {train + test:,} {size}x{size} JPEGs under {root}")


def measure(root: Path, share: float, steps: int, batch: int, stage: str) -> dict:
    """One process's figures: decode (``stage`` "decode": load the data, writing its cache) or train (read the
    cache, ``steps`` augmented batches, three passes over val)."""
    import torch

    from ranksearch.data.datasets import device_data
    from ranksearch.study.config import Config

    torch.set_num_threads(1)
    before_mb = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    config = Config(data_dir=str(root), download=False, val_size=2000, data_memory_share=share)
    start = time.perf_counter()
    data = device_data(config, torch.device("cpu"))
    load_s = time.perf_counter() - start
    figures = {"kind": type(data).__name__, "load_s": load_s, "before_data_mb": before_mb}
    if stage == "train":
        batches = data.train_batches(batch, torch.Generator().manual_seed(0))
        next(batches)
        start = time.perf_counter()
        total = 0.0
        for _ in range(steps):
            images, labels = next(batches)
            total += float(images[:, :, 0, 0].sum())  # touch the batch
        figures["train_images_per_s"] = steps * batch / (time.perf_counter() - start)
        start = time.perf_counter()
        seen = sum(len(labels) for _ in range(3) for _, labels in data.eval_batches("val", 500))  # 3 passes
        figures["val_images_per_s"] = seen / (time.perf_counter() - start)
    figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return figures


def compare(root: Path, steps: int, batch: int) -> None:
    for cache in root.glob(".ranksearch-*"):  # every figure from a first decode
        shutil.rmtree(cache) if cache.is_dir() else cache.unlink()
    rows = {}
    for name, share in (("in memory", 1.0), ("streamed", 0.0)):
        for stage in ("decode", "train"):
            command = [sys.executable, __file__, "measure", str(root), "--share", str(share), "--stage", stage,
                       "--steps", str(steps), "--batch", str(batch)]  # fmt: skip
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows[(name, stage)] = json.loads(output.strip().splitlines()[-1])
    images = sum(1 for _ in root.glob("*/*/*.jpg"))
    side = next(root.glob("train/*/*.jpg"))
    from PIL import Image

    with Image.open(side) as first:
        pixel_mb = images * first.size[0] * first.size[1] * 3 / 2**20
    print(f"{images:,} images of {first.size[0]}x{first.size[1]}: {pixel_mb:,.0f} MB of decoded pixels; "
          f"{steps} batches of {batch}, 1 thread, CPU")  # fmt: skip
    print("RSS before data: the process with torch and ranksearch imported, before it loads any data")
    print(f"{'path':<10} {'RSS before data':>15} {'decode: peak RSS':>17} {'s':>6} {'train: load s':>14} "
          f"{'peak RSS':>9} {'train img/s':>12} {'val img/s':>10}")  # fmt: skip
    for name in ("in memory", "streamed"):
        decode, train = rows[(name, "decode")], rows[(name, "train")]
        print(f"{name:<10} {train['before_data_mb']:>12,.0f} MB {decode['peak_rss_mb']:>14,.0f} MB "
              f"{decode['load_s']:>6.1f} {train['load_s']:>14.2f} {train['peak_rss_mb']:>6,.0f} MB "
              f"{train['train_images_per_s']:>12,.0f} {train['val_images_per_s']:>10,.0f}")  # fmt: skip


def statistics(root: Path) -> None:
    """The in-memory start with the cache's pixel statistics, and without them (a cache written by 0.10.0, which
    made every start compute them), side by side, twice (the first pair may read the cache from disk)."""
    import torch

    from ranksearch.data.datasets import CACHE_NAME, device_data
    from ranksearch.study.config import Config

    torch.set_num_threads(1)
    config = Config(data_dir=str(root), download=False, val_size=2000, data_memory_share=1.0)
    cache = root / CACHE_NAME
    device_data(config, torch.device("cpu"))  # the cache, written now when missing
    saved = torch.load(cache, weights_only=True)
    kept = saved["pixel_statistics"]

    def start() -> float:
        begin = time.perf_counter()
        device_data(config, torch.device("cpu"))
        return time.perf_counter() - begin

    for _ in range(2):
        with_statistics = start()
        torch.save({k: v for k, v in saved.items() if k != "pixel_statistics"}, cache)
        without = start()
        torch.save({**saved, "pixel_statistics": kept}, cache)
        print(f"in-memory start: {with_statistics:.2f} s with the cached statistics, {without:.2f} s without")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    making = commands.add_parser("make")
    making.add_argument("root", type=Path)
    making.add_argument("--train", type=int, default=20000)
    making.add_argument("--test", type=int, default=2000)
    making.add_argument("--size", type=int, default=128)
    commands.add_parser("statistics").add_argument("root", type=Path)
    for name in ("compare", "measure"):
        sub = commands.add_parser(name)
        sub.add_argument("root", type=Path)
        sub.add_argument("--steps", type=int, default=200)
        sub.add_argument("--batch", type=int, default=128)
        if name == "measure":
            sub.add_argument("--share", type=float, required=True)
            sub.add_argument("--stage", choices=("decode", "train"), required=True)
    args = parser.parse_args()
    if args.command == "make":
        make(args.root, args.train, args.test, args.size)
    elif args.command == "statistics":
        statistics(args.root)
    elif args.command == "measure":
        print(json.dumps(measure(args.root, args.share, args.steps, args.batch, args.stage)))
    else:
        compare(args.root, args.steps, args.batch)


if __name__ == "__main__":
    main()

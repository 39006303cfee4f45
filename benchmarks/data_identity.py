"""What data identity costs at start-up: decoding, the cached start, and its parts (file listing, pixel hash).

    python benchmarks/data_identity.py /tmp/data/cifar10-jpeg

Copies the ImageFolder tree to a temporary folder (so the first start really decodes), then times, in one
process: the first start (decode + fingerprint + cache write), a cached start, and alone the two checks a
cached start makes (the files key over every path/size/mtime, the sha256 of every pixel and label).
"""

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ranksearch.data.datasets import _image_files, content_fingerprint, files_key, load_dataset


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="an ImageFolder tree with train/ and test/")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "copy"
        shutil.copytree(args.data_dir, root, ignore=shutil.ignore_patterns(".ranksearch-cache*"))
        dataset, first = timed(lambda: load_dataset(root))
        _, cached = timed(lambda: load_dataset(root))
        files = _image_files(root / "train")[1] + _image_files(root / "test")[1]
        _, key = timed(lambda: files_key(root, files))
        _, pixels = timed(lambda: content_fingerprint(dataset))
    images = len(dataset.train.labels) + len(dataset.test.labels)
    print(f"{images:,} images, fingerprint {dataset.fingerprint}, {args.threads} torch thread(s)")
    print(f"first start (decode, fingerprint, cache write): {first:.2f} s")
    print(f"cached start (list + key + load + fingerprint check): {cached:.2f} s")
    print(f"  files key (path, class, size, mtime of every file): {key:.2f} s")
    print(f"  pixel fingerprint (sha256 of labels and pixels): {pixels:.2f} s")


if __name__ == "__main__":
    main()

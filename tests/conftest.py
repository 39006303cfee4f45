import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"
CLASSES = [f"class{i}" for i in range(10)]


def class_color(label: int) -> int:
    """Each class is a solid gray level, so a pixel tells its label even after a crop or flip."""
    return 20 + 20 * label


def write_imagefolder(root: Path, train_per_class: int = 12, test_per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.full((32, 32, 3), class_color(label), dtype=np.uint8)
                pixels[0, :, 0] = rng.integers(0, 256, 32)  # a unique top row per image
                Image.fromarray(pixels).save(folder / f"{index:04d}.png")  # lossless
    return root


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("tiny") / "cifar")


def run_cli(*args: str, cwd: Path, read_only: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """``python -m ranksearch ARGS`` in ``cwd``, as a user would type it.

    ``read_only``: folders the command sees as a read-only file system (EROFS, which binds root too: a private
    mount namespace with read-only bind mounts; for a non-root user, the folders are chmod'ed instead).
    """
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "ranksearch", *args]
    if read_only and os.geteuid() == 0:
        quoted = [shlex.quote(str(p)) for p in read_only]
        mounts = " && ".join(f"mount --bind {p} {p} && mount -o remount,ro,bind {p}" for p in quoted)
        command = ["unshare", "-m", "sh", "-c", f"{mounts} && exec {shlex.join(command)}"]
    elif read_only:
        for path in read_only:
            path.chmod(0o555)
    try:
        return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    finally:
        if read_only and os.geteuid() != 0:
            for path in read_only:
                path.chmod(0o755)

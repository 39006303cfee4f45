import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
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


def run_cli(
    *args: str, cwd: Path, read_only: tuple[Path, ...] = (), pythonpath: Path | None = None
) -> subprocess.CompletedProcess:
    """``python -m ranksearch ARGS`` in ``cwd``, as a user would type it.

    ``pythonpath``: a folder put before the repo on PYTHONPATH (e.g. a ``sitecustomize.py`` that patches a function).
    ``read_only``: folders the command sees as a read-only file system (EROFS, which binds root too: a private
    mount namespace with read-only bind mounts; for a non-root user, the folders are chmod'ed instead).
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in (pythonpath, REPO) if p)}
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


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, tiny_imagefolder):
    """A folder holding the smoke baseline of the tiny data (studies/baselines), pretrained once."""
    cwd = tmp_path_factory.mktemp("pretrained")
    result = run_cli("pretrain", "--config", str(SMOKE_CONFIG), "--data-dir", str(tiny_imagefolder), cwd=cwd)
    assert result.returncode == 0, result.stderr
    return cwd / "studies" / "baselines"


@pytest.fixture
def workdir(tmp_path, pretrained):
    """A working folder with the tiny data's baseline already cached."""
    shutil.copytree(pretrained, tmp_path / "studies" / "baselines")
    return tmp_path


PG_BIN = Path("/usr/lib/postgresql/15/bin")  # Debian's package `postgresql` (.ci/run installs it when missing)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _as_postgres(*command: str) -> subprocess.CompletedProcess:
    """A server binary as the ``postgres`` user when we are root (the server refuses root), else as ourselves."""
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *command], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL 15 server of the test session's own: a temporary data folder, trust authentication for the
    superuser ``postgres``, a free port on 127.0.0.1; stopped and removed at the end. Yields its port."""
    if not (PG_BIN / "initdb").is_file():
        pytest.fail(f"no PostgreSQL server in {PG_BIN}: apt-get install postgresql (.ci/run does)")
    folder = Path(tempfile.mkdtemp(prefix="ranksearch-pg-"))  # in /tmp: the postgres user can reach it
    data = folder / "data"
    data.mkdir()
    if os.geteuid() == 0:
        shutil.chown(folder, "postgres")
        shutil.chown(data, "postgres")
    init = _as_postgres(str(PG_BIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync")
    assert init.returncode == 0, init.stderr
    port = None
    for _ in range(3):  # another program may take the free port before the server binds it
        candidate = _free_port()
        options = f"-p {candidate} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        start = _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-o", options,
                             "-w", "start")  # fmt: skip
        if start.returncode == 0:
            port = candidate
            break
    assert port is not None, f"PostgreSQL did not start: {start.stdout}{start.stderr}"
    try:
        yield port
    finally:
        _as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the session's PostgreSQL server, as a ranksearch ``--storage`` URL."""
    import psycopg  # the [postgres] extra, part of [test]

    name = f"t{time.monotonic_ns()}_{os.getpid()}"
    server = f"host=127.0.0.1 port={postgres_server} user=postgres dbname=postgres"
    with psycopg.connect(server, autocommit=True) as db:
        db.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@127.0.0.1:{postgres_server}/{name}"

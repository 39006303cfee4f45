import contextlib
import io
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import subprocess as _subprocess  # run_cli's keyword `subprocess` hides the module there
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = REPO / "configs" / "smoke.yaml"
CLASSES = [f"class{i}" for i in range(10)]


def class_color(label: int) -> int:
    """Each class is a solid gray level, so a pixel tells its label even after a crop or flip."""
    return 20 + 20 * label


def write_imagefolder(root: Path, train_per_class: int = 12, test_per_class: int = 3, size: int = 32,
                      classes: list[str] = CLASSES, color=class_color) -> Path:  # fmt: skip
    """An ImageFolder of ``size`` x ``size`` PNGs: each class one ``color(label)`` (a gray level or an RGB triple),
    each image a unique top row."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = np.empty((size, size, 3), dtype=np.uint8)
                pixels[:] = color(label)
                pixels[0, :, 0] = rng.integers(0, 256, size)  # a unique top row per image
                Image.fromarray(pixels).save(folder / f"{index:04d}.png")  # lossless
    return root


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory) -> Path:
    return write_imagefolder(tmp_path_factory.mktemp("tiny") / "cifar")


def run_cli(
    *args: str, cwd: Path, read_only: tuple[Path, ...] = (), pythonpath: Path | None = None, subprocess: bool = False
) -> _subprocess.CompletedProcess:
    """``python -m ranksearch ARGS`` in ``cwd``, as a user would type it: ``ranksearch.cli.main(ARGS)`` in this
    process (``_in_process``: the same exit code, stdout and stderr as the command's, process state restored), or
    a real ``python -m ranksearch`` with ``subprocess=True``, ``read_only`` or ``pythonpath``.

    A real process is needed where the process itself is tested: ``--workers N`` (its workers write to the
    parent's file descriptors), a plugin (it registers into the process, and a study's plugins are imported again
    by each later command), a patched function (``pythonpath``), a read-only mount.
    ``pythonpath``: a folder put before the repo on PYTHONPATH (e.g. a ``sitecustomize.py`` that patches a function).
    ``read_only``: folders the command sees as a read-only file system (EROFS, which binds root too: a private
    mount namespace with read-only bind mounts; for a non-root user, the folders are chmod'ed instead).
    """
    if subprocess or read_only or pythonpath:
        return _in_subprocess(args, cwd, read_only, pythonpath)
    return _in_process(args, cwd)


def _in_subprocess(args, cwd: Path, read_only: tuple[Path, ...], pythonpath: Path | None):
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
        return _subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    finally:
        if read_only and os.geteuid() != 0:
            for path in read_only:
                path.chmod(0o755)


def _needs_a_process(args) -> str | None:
    """Why ``args`` cannot run in this process, or None."""
    for index, arg in enumerate(args):
        workers = args[index + 1] if arg == "--workers" and index + 1 < len(args) else arg.partition("--workers=")[2]
        if workers and workers != "1":
            return f"--workers {workers} starts worker processes that write to this process's stdout and stderr"
    return None


# A fresh interpreter's warning filters (python without -W or -X dev): what ``python -m ranksearch`` runs with.
_FRESH_WARNING_FILTERS = [
    ("default", DeprecationWarning, "__main__"),
    ("ignore", DeprecationWarning, ""),
    ("ignore", PendingDeprecationWarning, ""),
    ("ignore", ImportWarning, ""),
    ("ignore", ResourceWarning, ""),
]
_FRESH_THREADS = torch.get_num_threads()  # torch's intra-op threads in a fresh process (before any test set them)


def _print_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """What a fresh interpreter's ``warnings.showwarning`` does (pytest's recorder replaces it in tests)."""
    (file or sys.stderr).write(warnings.formatwarning(message, category, filename, lineno, line))


@contextlib.contextmanager
def _fd_capture(fd: int, stream_name: str):
    """File descriptor ``fd`` and ``sys.<stream_name>`` into one temporary file, as a pipe to a child would take
    both Python's and C libraries' writes; yields a function that reads what was written."""
    getattr(sys, stream_name).flush()
    saved_fd, saved_stream = os.dup(fd), getattr(sys, stream_name)
    with tempfile.TemporaryFile() as file:
        os.dup2(file.fileno(), fd)
        stream = io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), encoding="utf-8", errors="backslashreplace",
                                  write_through=True)  # fmt: skip
        setattr(sys, stream_name, stream)
        try:
            yield lambda: (file.seek(0), file.read().decode("utf-8", errors="replace"))[1]
        finally:
            stream.flush()
            setattr(sys, stream_name, saved_stream)
            os.dup2(saved_fd, fd)
            os.close(saved_fd)


@contextlib.contextmanager
def _process_state_kept(args, cwd: Path):
    """Run the body as ``python -m ranksearch ARGS`` in ``cwd`` would, and put back after it what a command may
    change in its process: cwd, argv, path, environment, signal handlers, warning filters, logging, optuna's
    verbosity, torch's threads, flags and random state, numpy's and random's random states. (A fresh process's
    random states are drawn from the OS, torch's too: nothing to start from but the current ones.)"""
    import random

    import optuna

    from ranksearch.search import workers

    optuna_logger = optuna.logging._get_library_root_logger()
    optuna_handlers = [h for h in optuna_logger.handlers if isinstance(h, logging.StreamHandler)]
    saved = {
        "cwd": os.getcwd(), "argv": sys.argv, "path": sys.path[:], "environ": dict(os.environ),
        "signals": {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)},
        "flags": (workers._Signals.in_trial, workers._Signals.pending),
        "root_handlers": logging.root.handlers[:], "root_level": logging.root.level,
        "optuna_streams": [h.stream for h in optuna_handlers], "optuna_verbosity": optuna.logging.get_verbosity(),
        "threads": torch.get_num_threads(), "grad": torch.is_grad_enabled(), "dtype": torch.get_default_dtype(),
        "deterministic": (torch.are_deterministic_algorithms_enabled(),
                          torch.is_deterministic_algorithms_warn_only_enabled()),
        "cudnn": (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark),
        "rng": (torch.get_rng_state(), np.random.get_state(), random.getstate()),
    }  # fmt: skip
    with warnings.catch_warnings():
        warnings.resetwarnings()
        for action, category, module in _FRESH_WARNING_FILTERS:
            warnings.filterwarnings(action, category=category, module=module, append=True)
        warnings.showwarning = _print_warning  # to sys.stderr, not recorded by pytest
        try:
            os.chdir(cwd)
            sys.argv = [str(REPO / "ranksearch" / "__main__.py"), *args]
            logging.root.handlers = []  # not pytest's log capture: a fresh process prints warnings to stderr
            for handler in optuna_handlers:
                handler.setStream(sys.stderr)  # the captured one (optuna's handler keeps the stream it was made with)
            torch.set_num_threads(_FRESH_THREADS)
            torch.set_grad_enabled(True)
            yield
        finally:
            os.chdir(saved["cwd"])
            sys.argv, sys.path[:] = saved["argv"], saved["path"]
            if os.environ != saved["environ"]:
                os.environ.clear()
                os.environ.update(saved["environ"])
            for number, handler in saved["signals"].items():
                if handler is not None:  # None: set outside Python, cannot be put back
                    signal.signal(number, handler)
            workers._Signals.in_trial, workers._Signals.pending = saved["flags"]
            logging.root.handlers, logging.root.level = saved["root_handlers"], saved["root_level"]
            for handler, stream in zip(optuna_handlers, saved["optuna_streams"], strict=True):
                handler.setStream(stream)
            optuna.logging.set_verbosity(saved["optuna_verbosity"])
            torch.set_num_threads(saved["threads"])
            torch.set_grad_enabled(saved["grad"])
            torch.set_default_dtype(saved["dtype"])
            torch.use_deterministic_algorithms(saved["deterministic"][0], warn_only=saved["deterministic"][1])
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved["cudnn"]
            torch.set_rng_state(saved["rng"][0])
            np.random.set_state(saved["rng"][1])
            random.setstate(saved["rng"][2])


def _in_process(args, cwd: Path) -> _subprocess.CompletedProcess:
    """``ranksearch.cli.main(args)`` as ``python -m ranksearch`` runs it: its return value or SystemExit is the exit
    code, an uncaught exception is a traceback on stderr and exit code 1; see ``_process_state_kept``."""
    reason = _needs_a_process(args)
    assert reason is None, f"run_cli({' '.join(args)}): {reason}; pass subprocess=True"
    from ranksearch.cli import main

    modules = set(sys.modules)
    with _fd_capture(1, "stdout") as read_out, _fd_capture(2, "stderr") as read_err, _process_state_kept(args, cwd):
        try:
            code = main(list(args))
        except SystemExit as stop:  # argparse's errors, --help, --version
            code = stop.code
            if not (code is None or isinstance(code, int)):  # as the interpreter does: the message, exit code 1
                print(code, file=sys.stderr)
                code = 1
        except KeyboardInterrupt:
            raise
        except BaseException:
            traceback.print_exc(file=sys.stderr)  # as the interpreter does for an uncaught exception
            code = 1
        stdout, stderr = read_out(), read_err()
    plugins = sorted(m for m in set(sys.modules) - modules if m.startswith("ranksearch_plugin_"))
    assert not plugins, f"run_cli({' '.join(args)}) imported plugins into the test process ({plugins}); their " \
        "registrations stay for later tests: pass subprocess=True"  # fmt: skip
    return _subprocess.CompletedProcess([sys.executable, "-m", "ranksearch", *args], code or 0, stdout, stderr)


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

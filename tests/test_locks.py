"""A file that many processes need (baseline, channel bases, decode cache) is made once: one process makes it under
`<file>.lock`, the others wait and read it; a read-only folder works without a lock."""

import multiprocessing
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from conftest import REPO
from ranksearch.utils.files import atomic_save, file_lock, lock_path, read_or_make

WORKERS = 4


def _load(path: Path):
    return torch.load(path, weights_only=True) if path.exists() else None


def _make_once(path: Path, log: Path, barrier, results) -> None:
    """What ensure_baseline does: read the file, else make it (slowly) and save it; count every making in ``log``."""

    def make():
        with log.open("a") as out:
            out.write(f"{os.getpid()}\n")
        time.sleep(0.5)  # long enough for every other process to find the lock taken
        value = {"maker": os.getpid()}
        atomic_save(value, path)
        return value

    barrier.wait()
    results.put(read_or_make(path, lambda: _load(path), make, "waiting for another process"))


def test_processes_racing_make_the_file_once(tmp_path, capfd):
    path, log = tmp_path / "baseline.pt", tmp_path / "made"
    context = multiprocessing.get_context("fork")
    barrier, results = context.Barrier(WORKERS), context.Queue()
    processes = [context.Process(target=_make_once, args=(path, log, barrier, results)) for _ in range(WORKERS)]
    for process in processes:
        process.start()
    values = [results.get(timeout=60) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    makers = log.read_text().split()
    assert len(makers) == 1  # the work ran once
    assert values == [{"maker": int(makers[0])}] * WORKERS  # every process has the one that was made
    assert capfd.readouterr().err.count("waiting for another process") == WORKERS - 1
    assert lock_path(path) == tmp_path / "baseline.pt.lock" and not lock_path(path).exists()  # no litter


def test_a_stale_file_is_remade_once_and_a_fresh_one_is_only_read(tmp_path):
    path, made = tmp_path / "bases.pt", []
    atomic_save({"key": "old"}, path)

    def read():
        value = _load(path)
        return value if value and value["key"] == "new" else None  # stale: not usable

    def make():
        made.append(1)
        atomic_save({"key": "new"}, path)
        return {"key": "new"}

    assert read_or_make(path, read, make) == {"key": "new"} and len(made) == 1
    assert read_or_make(path, read, make) == {"key": "new"} and len(made) == 1


def test_a_waiter_blocks_until_the_holder_is_done_and_says_so(tmp_path, capsys):
    path, entered = tmp_path / "cache.pt", threading.Event()
    waited = []

    def second():
        with file_lock(path, "another process holds it; waiting") as was_waiting:
            waited.append(was_waiting)
            entered.set()

    with file_lock(path) as first_waited:
        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(0.5)  # blocked while the lock is held
    thread.join(timeout=10)
    assert entered.is_set() and waited == [True] and first_waited is False
    assert "another process holds it; waiting" in capsys.readouterr().err


def test_a_lock_is_released_when_its_process_dies(tmp_path):
    path = tmp_path / "baseline.pt"
    holder = subprocess.Popen(
        [sys.executable, "-c", "from ranksearch.utils.files import file_lock\nfrom pathlib import Path\n"
         f"import os, time\nwith file_lock(Path({str(path)!r})):\n    print('held', flush=True)\n    time.sleep(600)"],
        env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
    finally:
        holder.kill()  # kill -9: no clean-up code runs
        holder.wait()
    with file_lock(path) as waited:
        assert waited is False


def test_a_read_only_folder_works_without_a_lock(tmp_path):
    """No lock file can be created: the body runs unlocked, and no error escapes."""
    folder = tmp_path / "ro"
    folder.mkdir()
    code = (
        "from pathlib import Path\nfrom ranksearch.utils.files import file_lock\n"
        f"with file_lock(Path({str(folder / 'x.pt')!r}), 'waiting') as waited:\n    print('ran', waited)\n"
    )
    command = [sys.executable, "-c", code]
    if os.geteuid() == 0:  # root ignores permissions: a read-only bind mount in a private mount namespace
        mount = f"mount --bind {folder} {folder} && mount -o remount,ro,bind {folder}"
        command = ["unshare", "-m", "sh", "-c", f"{mount} && exec {shlex.join(command)}"]
    else:
        folder.chmod(0o555)
    try:
        result = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    finally:
        folder.chmod(0o755)
    assert result.returncode == 0 and result.stdout.strip() == "ran False", result.stderr
    assert result.stderr == "" and not lock_path(folder / "x.pt").exists()

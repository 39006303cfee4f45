"""Files that must not be lost or half-written: write-ability checks before long work, atomic saves, and a file
lock so that a file many processes need (baseline, channel bases, decode cache) is made by one of them."""

import contextlib
import fcntl
import glob
import os
import re
import signal
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import torch

from .errors import UserError, first_line


def _nearest_existing(folder: Path) -> Path:
    folder = folder.absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable(folder: str | Path, what: str) -> None:
    """Raise UserError unless files can be created in ``folder`` (or in the folders that would hold it).

    Creates nothing that stays: a probe file in the nearest existing folder, removed at once. ``what`` names
    the folder for the message, e.g. "baseline_dir".
    """
    folder = Path(folder)
    existing = _nearest_existing(folder)
    if not existing.is_dir():
        raise UserError(f"{what} {folder}: {existing} is a file, not a folder; pass a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".ranksearch-probe-"):
            pass
    except OSError as error:
        raise UserError(
            f"cannot write to {what} {folder} ({first_line(error)}); make it writable or choose another"
        ) from None


T = TypeVar("T")


def partial_path(path: Path) -> Path:
    """A unique hidden temporary name beside ``path``: ``.<name>.<pid>-<hex>.partial`` (no glob of the real files
    matches it)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")


def atomic_write(path: Path, write: Callable[[Path], T]) -> T:
    """``write(partial)`` to a unique hidden temporary name beside ``path`` (``partial_path``; a writer that reads
    the format from the suffix must be told it), then rename it into place; returns what ``write`` returned. Every
    file ranksearch writes goes through here (or ``atomic_write_set``): a reader, or a second writer of the same
    name, never sees a half-written file, and a kill or an error (also one ``write`` raises after checking what it
    wrote) leaves nothing under ``path`` (a kill -9 leaves the temporary: ``clear_stale_partials``). OSError
    (RuntimeError from torch) goes to the caller."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = partial_path(path)
    try:
        result = write(partial)
        os.replace(partial, path)
        return result
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise


def atomic_write_set(writers: dict[Path, Callable[[Path], T]], earlier: tuple[Path, ...] = ()) -> dict[Path, T]:
    """Write several files as one set (an export's .pt, .onnx and .ts): each ``writer(partial)`` to a temporary of
    its own, as ``atomic_write`` does; once all are written, remove the files at their paths and at ``earlier``
    (an earlier set's other members), then rename the temporaries into place. A reader, or a kill at any instant,
    finds the earlier set's files (or some of them) or this set's (or some of them), never a mix; Ctrl-C and
    SIGTERM wait for the few renames, so they leave one whole set. Returns each writer's result by path."""
    partials: dict[Path, Path] = {}
    results: dict[Path, T] = {}
    try:
        for path, write in writers.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            partials[path] = partial_path(path)
            results[path] = write(partials[path])
        with _signals_held():
            for path in (*earlier, *partials):  # the earlier set's files first: no rename lands beside one
                path.unlink(missing_ok=True)
            for path, partial in partials.items():
                os.replace(partial, path)
        return results
    except BaseException:
        for partial in partials.values():
            with contextlib.suppress(OSError):
                partial.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM that come during the body are delivered after it (the body must be short)."""
    held = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, held)


_PARTIAL = re.compile(r"\.(?P<name>.+)\.(?P<pid>[0-9]+)-[0-9a-f]{8}\.partial")


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this machine (this one counts: its own temporaries are in use); a pid of
    0 or below (a process group to ``kill``) names none."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # none, or a number no pid can be
        return False
    except PermissionError:  # another user's
        return True
    return True


def clear_stale_partials(paths: list[Path]) -> list[Path]:
    """Remove the temporaries (``partial_path``'s) of ``paths`` that a writer killed mid-write left: those whose
    process no longer runs. Returns what it removed."""
    removed = []
    for path in paths:
        if not path.parent.is_dir():
            continue
        for candidate in path.parent.glob(f".{glob.escape(path.name)}.*.partial"):
            found = _PARTIAL.fullmatch(candidate.name)
            if found is None or found["name"] != path.name or process_alive(int(found["pid"])):
                continue
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
    return removed


def atomic_save(payload, path: Path) -> None:
    """``torch.save`` of ``payload`` to ``path``, atomically (``atomic_write``)."""
    atomic_write(path, lambda partial: torch.save(payload, partial))



def lock_path(path: Path) -> Path:
    """The lock file of ``path``: ``<file>.lock`` beside it."""
    return path.with_name(f"{path.name}.lock")


@contextlib.contextmanager
def file_lock(path: Path, waiting: str = "") -> Iterator[bool]:
    """Hold ``<path>.lock`` (an OS lock: released when its process ends, however it ends) for the body; the lock
    file is removed as the body ends (also on Ctrl-C or an error), so none is left among the user's files.

    Yields True when another process held it first (and so may have just made ``path``), after printing
    ``waiting`` to stderr. Where the lock file cannot be created (a read-only folder) there is no lock: yields
    False, and the caller's own notes about the unwritable folder are all the user sees. A kill -9 leaves the file:
    the next holder takes it over and removes it.
    """
    lock = lock_path(path)
    descriptor, waited = _hold(lock, waiting)
    try:
        yield waited
    finally:
        if descriptor is not None:
            with contextlib.suppress(OSError):
                lock.unlink()  # while still held: a process waiting on this file sees it gone and locks a new one
            os.close(descriptor)  # releases the lock


def _hold(lock: Path, waiting: str) -> tuple[int | None, bool]:
    """An exclusive flock on the file ``lock`` (created when missing, never through a symlink): its descriptor (None
    where it cannot be created) and whether another process held it first. A holder removes the file before it lets
    go, so a lock taken on a removed file is let go and taken again on the file now there."""
    waited = False
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            descriptor = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError:
            return None, waited  # read-only folder: nothing to coordinate through
        try:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting and not waited:
                    print(waiting, file=sys.stderr, flush=True)
                waited = True
                fcntl.flock(descriptor, fcntl.LOCK_EX)
        except OSError:  # a file system without locks
            os.close(descriptor)
            return None, waited
        except BaseException:  # Ctrl-C while waiting
            os.close(descriptor)
            raise
        if _same_file(descriptor, lock):
            return descriptor, waited
        os.close(descriptor)


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        here, there = os.fstat(descriptor), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def read_or_make(path: Path, read: Callable[[], T | None], make: Callable[[], T], waiting: str = "") -> T:
    """``read()`` of the file at ``path`` when it is usable (not None), else ``make()``, which also saves it.

    Only one process makes it: ``make`` runs under ``<path>.lock``; a process that finds the lock taken waits
    (saying ``waiting``), then reads what the other one saved. Reads take no lock (saves are atomic renames).
    """
    before = _identity(path)
    found = read()
    if found is not None:
        return found
    with file_lock(path, waiting):
        if _identity(path) != before:  # saved by another process since we looked
            found = read()
            if found is not None:
                return found
        return make()


def keyed_cache(path: Path, key: str, field: str, make: Callable[[], T], encode: Callable[[T], object],
                decode: Callable[[object], T], what: str) -> T:  # fmt: skip
    """A value computed once by ``make()`` and kept in ``path``, a torch file ``{"key": key, field: encode(value)}``:
    read back (``decode``) while its key is ``key``, made again when the key differs or the file is broken. One
    process makes it when several start at once (``read_or_make``); a folder that cannot be written is noted, and
    the value is made each start."""

    def read() -> T | None:
        if not path.is_file():
            return None
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            if saved["key"] == key:
                return decode(saved[field])
        except Exception:
            pass  # stale or broken: make it again and overwrite
        return None

    def build() -> T:
        value = make()
        try:
            atomic_save({"key": key, field: encode(value)}, path)
        except (OSError, RuntimeError) as error:  # a read-only folder: made again next start
            print(f"note: cannot cache the {what} in {path} ({first_line(error)}); computing them each start",
                  file=sys.stderr)  # fmt: skip
        return value

    return read_or_make(path, read, build, f"{what}: another process is computing {path}; waiting for it")


@contextlib.contextmanager
def folder_lock(folder: Path, waiting: str = "") -> Iterator[None]:
    """Hold an OS lock on ``folder`` itself (flock on its descriptor: no lock file is left among the user's files)
    for the body (created when missing); another process holding it first makes this one print ``waiting`` and
    wait."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting:
                print(waiting, file=sys.stderr, flush=True)
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)  # releases the lock

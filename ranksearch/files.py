"""Files that must not be lost or half-written: write-ability checks before long work, atomic saves."""

import contextlib
import os
import tempfile
from pathlib import Path

import torch

from .errors import UserError


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
            f"cannot write to {what} {folder} ({error.strerror or error}); make it writable or choose another"
        ) from None


def atomic_save(payload, path: Path) -> None:
    """``torch.save`` to a unique temporary name beside ``path``, then rename it into place.

    Readers never see a half-written file; OSError (RuntimeError from torch) goes to the caller.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        torch.save(payload, partial)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise

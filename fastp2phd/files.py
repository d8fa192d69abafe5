"""Writing files so that a crash never leaves a half-written one, and reading checkpoints safely."""
from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import CheckpointReadError, CheckpointReadFileNotFound


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    Killed at any moment, the folder holds either the old file or the new one,
    never a truncated mix (a leftover ``.tmp`` file at worst).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (POSIX); not possible on every system, where it is skipped."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any]) -> None:
    with atomic_path(path) as tmp:
        write(tmp)


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and a rename."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def load_torch(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` on the CPU; a missing, truncated, empty or unsafe file is one
    sentence (a CheckpointReadError, or FileNotFoundError for a missing one) naming the file and ``what`` it should be."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadFileNotFound(f"the {what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointReadError(
            f"the {what} {path} holds Python objects besides tensors, which fastp2phd does not load (it loads "
            "with weights_only=True, so a file cannot run code); re-save it as a plain state_dict, or check the path"
        ) from None
    except Exception as exc:  # truncated zip, empty file, not a torch file at all, ...
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
        raise CheckpointReadError(
            f"the {what} {path} cannot be read ({detail}): it is truncated, damaged or not a PyTorch file; "
            "restore it from a copy or write it again"
        ) from None

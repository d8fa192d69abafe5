"""Writing files so that a crash never leaves a half-written one, and reading checkpoints safely."""
from __future__ import annotations

import contextlib
import glob
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from .errors import CheckpointReadError, CheckpointReadFileNotFound


TEMPORARY_SUFFIX = ".fastp2phd.tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_leftover_temporaries(folder: str | os.PathLike, names: Iterable[str] | None = None) -> int:
    """Remove what writes killed midway left in ``folder`` (their temporary files, up to a whole train
    state each); returns how many. Only this module's own temporaries are touched, and with ``names``
    only those of these files (so that a command sharing a folder with a running ``train`` leaves
    the checkpoints that one is writing alone)."""
    patterns = [f".{glob.escape(name)}.*{TEMPORARY_SUFFIX}" for name in names] if names is not None else [
        f".*{TEMPORARY_SUFFIX}"]
    removed = 0
    for leftover in (path for pattern in patterns for path in Path(folder).glob(pattern)):
        try:
            leftover.unlink()
            removed += 1
        except OSError:
            pass
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    Killed at any moment, the folder holds either the old file or the new one,
    never a truncated mix (a leftover temporary file at worst, which ``remove_leftover_temporaries``
    cleans up). The file gets the permissions a plain ``open`` would give it (the umask's).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file gets the mode open() would give it
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
    except pickle.UnpicklingError as exc:
        if "unsupported global" not in str(exc).lower():  # garbage, rather than objects weights_only refuses
            raise _damaged(path, what, exc) from None
        raise CheckpointReadError(
            f"the {what} {path} holds Python objects besides tensors, which fastp2phd does not load (it loads "
            "with weights_only=True, so a file cannot run code); re-save it as a plain state_dict, or check the path"
        ) from None
    except Exception as exc:  # truncated zip, empty file, not a torch file at all, ...
        raise _damaged(path, what, exc) from None


def _damaged(path: Path, what: str, exc: Exception) -> CheckpointReadError:
    detail = type(exc).__name__ if isinstance(exc, pickle.UnpicklingError) else (
        (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160])
    return CheckpointReadError(f"the {what} {path} cannot be read ({detail}): it is truncated, damaged or not a "
                               "PyTorch file; restore it from a copy or write it again")

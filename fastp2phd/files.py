"""Writing files so that a crash or a full disk never leaves a half-written one (or a half-written set
of them), and reading checkpoints safely."""
from __future__ import annotations

import contextlib
import errno
import glob
import json
import os
import pickle
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from .errors import CheckpointReadError, CheckpointReadFileNotFound, DiskFullError, InvalidArgumentError


TEMPORARY_SUFFIX = ".fastp2phd.tmp"
# Written (atomically) once every file of a set is complete, removed once all are in place: a save
# found with it was interrupted after its commit point, and is finished before anything is read.
SAVE_JOURNAL = ".fastp2phd-save.json"
_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_JOURNAL_LOCK = threading.Lock()  # one commit or finish at a time in this process (e.g. the editor's threads)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_leftover_temporaries(folder: str | os.PathLike, names: Iterable[str] | None = None,
                                recursive: bool = False) -> int:
    """Finish a file set whose save was interrupted after its commit point, then remove what writes
    killed midway left in ``folder`` (and its subfolders with ``recursive``): their temporary files,
    up to a whole train state each. Returns how many were removed. Only this module's own temporaries
    are touched, and with ``names`` only those of these files (so that a command sharing a folder with
    a running ``train`` leaves the checkpoints that one is writing alone)."""
    finish_interrupted_save(folder)
    patterns = [f".{glob.escape(name)}.*{TEMPORARY_SUFFIX}" for name in names] if names is not None else [
        f".*{TEMPORARY_SUFFIX}"]
    found = Path(folder).rglob if recursive else Path(folder).glob
    removed = 0
    for leftover in (path for pattern in patterns for path in found(pattern)):
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
    tmp = _temporary_beside(path)
    try:
        with _explain_full_disk(path, tmp):
            yield tmp
            _fsync_file(tmp)
        try:
            os.replace(tmp, path)
        except OSError as exc:  # (a folder in the way): name the file the user asked for, not our temporary
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        _fsync_folder(path.parent)
    finally:
        _unlink_quietly(tmp)


def _temporary_beside(path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    except OSError as exc:  # name the file the user asked for, not our temporary
        raise OSError(exc.errno, exc.strerror, str(path)) from None
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file gets the mode open() would give it
    return Path(tmp)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _is_out_of_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in _NO_SPACE
    # torch.save reports a failed write as a RuntimeError from its zip writer ("unexpected pos", "file write failed")
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in ("unexpected pos", "file write failed"))


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if limit == resource.RLIM_INFINITY else limit


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


@contextlib.contextmanager
def _explain_full_disk(path: Path, tmp: Path | None, needs: int | None = None, kept: str = "") -> Iterator[None]:
    """Turn a full disk (or ``ulimit -f``) while writing ``tmp`` for ``path`` (or appending to ``path``
    when ``tmp`` is None) into one DiskFullError sentence."""
    try:
        yield
    except Exception as exc:
        if not _is_out_of_space(exc):
            raise
        written = tmp.stat().st_size if tmp is not None and tmp.exists() else 0
        if tmp is not None:
            _unlink_quietly(tmp)  # its space is what the user frees first
        free = shutil.disk_usage(path.parent).free
        need = f"it needs about {_megabytes(needs)}" if needs else (
            f"it stopped after {_megabytes(written)}" if tmp is not None else "appending")
        limit = _file_size_limit()
        if getattr(exc, "errno", None) == errno.EFBIG or (limit is not None and not isinstance(exc, OSError)):
            reason, fix = f"the file-size limit (ulimit -f) of {_megabytes(limit or 0)} was reached", "raise the limit"
        else:
            reason, fix = "the disk is full", "make room"
        raise DiskFullError(
            f"could not write {path}: {reason} ({need}, {_megabytes(free)} free on its disk); "
            f"{kept or 'the previous version of the file, if any, is intact'}; {fix} and run the command again"
        ) from None


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


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append to a log; a full disk is one sentence (the log keeps its complete lines). A line an earlier
    write left cut (killed, or the disk full) is ended first, so that it does not swallow this one."""
    path = Path(path)
    with _explain_full_disk(path, None, kept="what was saved before, checkpoints included, is intact"):
        with open(path, "a+b") as f:
            if f.tell() and (f.seek(-1, os.SEEK_END), f.read(1))[1] != b"\n":
                text = "\n" + text
            f.write(text.encode("utf-8"))


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file and a rename."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) object: about what ``torch.save`` writes."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


class FileSet:
    """Files saved as one unit (a checkpoint's networks and train state, an edited scene's maps):
    after a crash, a full disk or a kill at any moment, a reader sees all of the new files or all of
    the old ones, never a mix.

    Each file is written to a temporary beside it. Once all are complete and synced, a journal
    naming them is written (atomically) in ``root``: that is the commit point. Then each temporary is
    renamed over its file and the journal removed. ``finish_interrupted_save(root)`` completes the
    renames of a save killed after its commit point; every reader of such files calls it first
    (``load_torch`` does). Use it through ``save_file_set``.
    """

    def __init__(self, root: str | os.PathLike, what: str):
        self.root, self.what = Path(root), what
        self._pending: dict[Path, Path] = {}  # final path -> its complete temporary

    def write(self, relative: str | os.PathLike, write: Callable[[Path], Any], needs: int | None = None) -> None:
        """Write one file of the set (``relative`` to the root) by calling ``write(temporary_path)``."""
        path = self.root / relative
        if path in self._pending:
            raise InvalidArgumentError(f"{path} is written twice in one save")
        tmp = _temporary_beside(path)
        self._pending[path] = tmp
        with _explain_full_disk(path, tmp, needs, kept=f"none of the files of this save were replaced, so the "
                                                      f"previous {self.what} in {self.root} is intact"):
            write(tmp)
            _fsync_file(tmp)

    def save_torch(self, obj: Any, relative: str | os.PathLike) -> None:
        self.write(relative, lambda tmp: torch.save(obj, tmp), needs=_tensor_bytes(obj))

    def write_text(self, relative: str | os.PathLike, text: str) -> None:
        self.write(relative, lambda tmp: tmp.write_text(text))

    def commit(self) -> None:
        journal = {"files": [[os.path.relpath(tmp, self.root), os.path.relpath(path, self.root)]
                             for path, tmp in self._pending.items()]}
        with _JOURNAL_LOCK:
            try:
                write_text(self.root / SAVE_JOURNAL, json.dumps(journal))  # the commit point
            except DiskFullError:
                raise DiskFullError(f"could not finish saving in {self.root}: the disk is full; none of the files of "
                                    f"this save were replaced, so the previous {self.what} is intact; make room and "
                                    "run the command again") from None
            self._pending.clear()  # committed: the journal owns the temporaries now, even if a rename fails
            _apply_journal(self.root, journal)

    def discard(self) -> None:
        for tmp in self._pending.values():
            _unlink_quietly(tmp)
        self._pending.clear()


@contextlib.contextmanager
def save_file_set(root: str | os.PathLike, what: str) -> Iterator[FileSet]:
    """``with save_file_set(folder, "checkpoint") as files: files.save_torch(sd, "latest_net_G.pth") ...``:
    the files replace their old versions together when the block ends, or none does if it raises."""
    files = FileSet(root, what)
    try:
        yield files
        files.commit()
    finally:
        files.discard()


def _apply_journal(root: Path, journal: dict) -> None:
    folders = set()
    for tmp, final in journal["files"]:
        tmp, final = root / tmp, root / final
        with contextlib.suppress(FileNotFoundError):  # renamed already, by an earlier finish or another process
            os.replace(tmp, final)
        folders.add(final.parent)
    for folder in folders:
        _fsync_folder(folder)
    _unlink_quietly(root / SAVE_JOURNAL)
    _fsync_folder(root)


def _journal_entries_are_safe(root: Path, journal: Any) -> bool:
    """The journal only renames this module's temporaries onto paths inside ``root``."""
    try:
        pairs = [(Path(tmp), Path(final)) for tmp, final in journal["files"]]
    except (KeyError, TypeError, ValueError):
        return False
    return all(not p.is_absolute() and ".." not in p.parts for pair in pairs for p in pair) and all(
        tmp.name.endswith(TEMPORARY_SUFFIX) and tmp.parent == final.parent for tmp, final in pairs)


def finish_interrupted_save(root: str | os.PathLike) -> bool:
    """Complete a file set whose save was killed after its commit point (see ``FileSet``); True when
    there was one. Without a journal the old files stand, and the temporaries are mere leftovers."""
    root = Path(root)
    path = root / SAVE_JOURNAL
    if not path.is_file():
        return False
    try:
        journal = json.loads(path.read_text())
    except FileNotFoundError:  # finished meanwhile by another process (each of a torchrun run's reads the run)
        return True
    except (OSError, ValueError):
        journal = None
    if not _journal_entries_are_safe(root, journal):
        raise CheckpointReadError(f"{path} is not a save journal fastp2phd wrote; remove it (the files beside it "
                                  "are the last complete save)")
    try:
        with _JOURNAL_LOCK:
            if path.is_file():  # not finished by another thread meanwhile
                _apply_journal(root, journal)
    except OSError as exc:
        raise CheckpointReadError(f"{root} holds a save that was interrupted and cannot be finished here "
                                  f"({exc.strerror}); make the folder writable and run the command again") from None
    return True


def load_torch(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` on the CPU; a missing, truncated, empty or unsafe file is one
    sentence (a CheckpointReadError, or FileNotFoundError for a missing one) naming the file and ``what`` it should be."""
    path = Path(path)
    finish_interrupted_save(path.parent)
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
    # torch's first sentence (the next ones are its own advice), else the exception's name (for "", "'101'", ...)
    sentence = re.split(r"(?<=[.!?])\s", (str(exc).strip().splitlines() or [""])[0])[0].rstrip(".")
    plain = " " in sentence and len(sentence) <= 160 and not isinstance(exc, pickle.UnpicklingError)
    detail = sentence if plain else type(exc).__name__
    return CheckpointReadError(f"the {what} {path} cannot be read ({detail}): it is truncated, damaged or not a "
                               "PyTorch file; restore it from a copy or write it again")

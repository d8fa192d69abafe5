"""Cluster centres on disk: fastp2phd's pickle-free ``.npz`` clusters files (``save_clusters``,
``load_clusters``), and the original code's pickled ``features_clustered_010.npy`` (only with
``allow_pickle``). ``fastp2phd.features`` computes the clusters and re-exports these."""
from __future__ import annotations

import json
import operator
import os
import re
import zipfile
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from .errors import FileMissingError, InvalidArgumentError, Pix2PixHDError
from .files import atomic_path

#: ``format`` value written into (and required in) the ``__meta__`` entry of a clusters file.
CLUSTERS_FORMAT = "fastp2phd-clusters"
CLUSTERS_VERSION = 1
_META_KEY = "__meta__"
_CLASS_KEY = re.compile(r"^class_(\d+)$")


class ClustersFileError(Pix2PixHDError, ValueError):
    """A clusters file is not one, is corrupt, or holds something it should not."""


class UnsafePickleError(ClustersFileError):
    """Refused to unpickle a file because pickle=True was not explicitly allowed."""


def _to_numpy_2d(value: Any, what: str) -> np.ndarray:
    arr = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise ClustersFileError(f"{what} must be a numeric array, got dtype {arr.dtype}.")
    if arr.ndim != 2:
        raise ClustersFileError(f"{what} must be 2-D (k, F), got shape {arr.shape}.")
    return arr


def _check_widths(arrays: Mapping[int, np.ndarray], source: str) -> int | None:
    widths = {int(a.shape[1]) for a in arrays.values()}
    if len(widths) > 1:
        detail = ", ".join(f"class {c}: {a.shape[1]}" for c, a in sorted(arrays.items()))
        raise ClustersFileError(f"{source} has cluster centres of inconsistent widths ({detail}).")
    return widths.pop() if widths else None


def save_clusters(path: str | os.PathLike, centers: Mapping[int, Any], meta: Mapping[str, Any] | None = None) -> None:
    """Write cluster centres to a pickle-free ``.npz`` file, atomically (see ``clusters_writer``)."""
    write = clusters_writer(centers, meta)
    with atomic_path(path) as tmp:
        write(tmp)


def clusters_writer(centers: Mapping[int, Any], meta: Mapping[str, Any] | None = None) -> Callable[[Any], None]:
    """Check cluster centres and return a function that writes them to a pickle-free ``.npz`` path.

    Args:
        path: destination, written exactly as given (no ``.npz`` is appended).
        centers: ``{class_id: (k, F) tensor or array}``, class ids non-negative ints, all
            with the same F. Arrays keep their dtype.
        meta: extra JSON-serialisable entries stored in ``__meta__``. ``format`` and
            ``version`` are reserved; ``feat_num`` must match F if given; ``n_clusters``
            overrides the default (the largest k).

    The file holds one array per class named ``class_%03d`` (``class_026``) and a 0-d
    string array ``__meta__`` with the JSON object ``{"format": "fastp2phd-clusters",
    "version": 1, "feat_num": F, "n_clusters": ..., "classes": [...], **meta}``.
    ``save_clusters`` writes it through ``fastp2phd.files.atomic_path`` (a temporary file, fsync,
    rename), ``encode_features`` together with the raw features (``save_file_set``).
    """
    arrays: dict[int, np.ndarray] = {}
    for cls, value in centers.items():
        try:
            cls_int = operator.index(cls)
        except TypeError:
            raise ClustersFileError(f"class ids must be integers, got {cls!r}.") from None
        if cls_int < 0:
            raise ClustersFileError(f"class ids must be non-negative, got {cls_int}.")
        arrays[cls_int] = np.ascontiguousarray(_to_numpy_2d(value, f"centres of class {cls_int}"))
    feat_num = _check_widths(arrays, "centers")
    meta = dict(meta or {})
    for reserved in ("format", "version", "classes"):
        if reserved in meta:
            raise ClustersFileError(f"meta key {reserved!r} is reserved by the clusters file format.")
    if feat_num is not None and meta.get("feat_num", feat_num) != feat_num:
        raise ClustersFileError(f"meta feat_num={meta['feat_num']} does not match the centres' width {feat_num}.")
    full_meta = {
        "format": CLUSTERS_FORMAT,
        "version": CLUSTERS_VERSION,
        "feat_num": feat_num if feat_num is not None else meta.get("feat_num"),
        "n_clusters": max((a.shape[0] for a in arrays.values()), default=0),
        "classes": sorted(arrays),
    }
    full_meta.update({k: v for k, v in meta.items() if k != "feat_num"})
    try:
        meta_json = json.dumps(full_meta, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ClustersFileError(f"meta must be JSON-serialisable: {exc}.") from None
    payload = {f"class_{cls:03d}": arrays[cls] for cls in sorted(arrays)}
    payload[_META_KEY] = np.array(meta_json)

    def write(target: str | os.PathLike) -> None:
        with open(target, "wb") as fh:
            np.savez(fh, **payload)
    return write


def _sniff(path: str) -> bytes:
    if not os.path.exists(path):
        raise FileMissingError(f"Clusters file not found: {path}.")
    if os.path.isdir(path):
        raise ClustersFileError(f"{path} is a folder, not a clusters file.")
    with open(path, "rb") as fh:
        return fh.read(6)


def load_clusters(path: str | os.PathLike) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_clusters`, never unpickling anything.

    Returns:
        ``(centers, meta)``: ``{class_id: Tensor (k, F)}`` (CPU, stored dtype, keys in
        increasing order) and the full ``__meta__`` dict (including ``format``,
        ``version``, ``feat_num``, ``n_clusters``, ``classes`` and the caller's entries).

    Raises:
        FileNotFoundError: the file does not exist.
        ClustersFileError: the file is not a fastp2phd clusters file, is corrupt, or holds
            a pickled object array (refused: loading uses ``allow_pickle=False``).
    """
    path = os.fspath(path)
    magic = _sniff(path)
    if magic.startswith(b"\x93NUMPY"):
        raise ClustersFileError(
            f"{path} is a single-array .npy file, not a fastp2phd clusters .npz file; the original "
            "pix2pixHD features_clustered_*.npy is read with import_official_clusters.")
    if not magic.startswith(b"PK"):
        raise ClustersFileError(f"{path} is not a fastp2phd clusters file (not a .npz archive: corrupt or another format).")
    try:
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
            if _META_KEY not in names:
                raise ClustersFileError(f"{path} is not a fastp2phd clusters file (it has no {_META_KEY} entry).")
            raw = {name: npz[name] for name in names}
    except ClustersFileError:
        raise
    except ValueError as exc:
        if "pickle" in str(exc):
            raise ClustersFileError(
                f"{path} contains a pickled object array, which is refused because unpickling can run code.") from None
        raise ClustersFileError(f"{path} is corrupt or truncated ({exc}).") from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, RuntimeError) as exc:
        raise ClustersFileError(f"{path} is corrupt or truncated ({type(exc).__name__}: {exc}).") from None

    meta_arr = raw.pop(_META_KEY)
    try:
        if meta_arr.dtype.kind != "U" or meta_arr.size != 1:
            raise InvalidArgumentError("not a single string")
        meta = json.loads(str(meta_arr.reshape(()).item()))
        if not isinstance(meta, dict):
            raise InvalidArgumentError("not a JSON object")
    except ValueError as exc:
        raise ClustersFileError(f"{path} is not a fastp2phd clusters file (its {_META_KEY} entry is invalid: {exc}).") from None
    if meta.get("format") != CLUSTERS_FORMAT:
        raise ClustersFileError(f"{path} is not a fastp2phd clusters file (__meta__ format is {meta.get('format')!r}).")
    version = meta.get("version")
    if not isinstance(version, int) or version > CLUSTERS_VERSION:
        raise ClustersFileError(f"{path} has clusters format version {version!r}; this fastp2phd reads up to {CLUSTERS_VERSION}.")
    arrays: dict[int, np.ndarray] = {}
    for name, arr in raw.items():
        match = _CLASS_KEY.match(name)
        if match is None:
            raise ClustersFileError(f"{path} is not a valid clusters file (unexpected entry {name!r}).")
        arrays[int(match.group(1))] = _to_numpy_2d(arr, f"{path}: entry {name}")
    width = _check_widths(arrays, path)
    if width is not None and meta.get("feat_num") not in (None, width):
        raise ClustersFileError(f"{path} is inconsistent: __meta__ feat_num={meta.get('feat_num')} but centres have width {width}.")
    centers = {cls: torch.from_numpy(np.array(arrays[cls])) for cls in sorted(arrays)}
    return centers, meta


def import_official_clusters(path: str | os.PathLike, allow_pickle: bool = False) -> dict[int, torch.Tensor]:
    """Read the original pix2pixHD ``features_clustered_010.npy`` (a pickled dict).

    Args:
        path: the ``.npy`` written by the original ``np.save(path, {label: centres})``.
        allow_pickle: must be True to load it: the file is a pickle, and unpickling an
            untrusted file can run arbitrary code. Convert it once with
            :func:`save_clusters` and use :func:`load_clusters` afterwards.

    Returns:
        ``{class_id: Tensor (k, F)}``, keys in increasing order; floating arrays keep their
        dtype, integer ones become float32.

    Raises:
        FileNotFoundError: the file does not exist.
        UnsafePickleError: ``allow_pickle`` is not True.
        ClustersFileError: the content is not a dict of non-empty 2-D numeric arrays of one width.
    """
    path = os.fspath(path)
    _sniff(path)
    if allow_pickle is not True:
        raise UnsafePickleError(
            f"{path} is a pickle, and loading a pickle can run arbitrary code, so it is read only when you "
            "pass allow_pickle=True (--allow_pickle on the command line) for a file you trust; convert it once "
            "to a pickle-free .npz with save_clusters and use load_clusters from then on.")
    try:
        obj = np.load(path, allow_pickle=True, encoding="latin1")
    except Exception as exc:  # unpickling can fail in many ways
        raise ClustersFileError(f"{path} could not be read as a NumPy .npy file ({type(exc).__name__}: {exc}).") from None
    if isinstance(obj, np.lib.npyio.NpzFile):
        obj.close()
        raise ClustersFileError(f"{path} is a .npz archive; fastp2phd clusters files are read with load_clusters.")
    if isinstance(obj, np.ndarray) and obj.dtype == object and obj.shape == ():
        obj = obj.item()
    if not isinstance(obj, dict):
        raise ClustersFileError(f"{path} does not hold a dict of cluster centres (found {type(obj).__name__}).")
    arrays: dict[int, np.ndarray] = {}
    for key, value in obj.items():
        try:
            cls = operator.index(key)
        except TypeError:
            raise ClustersFileError(f"{path} has a non-integer class key {key!r}.") from None
        arr = _to_numpy_2d(value, f"{path}: centres of class {cls}")
        if arr.shape[0] == 0:
            raise ClustersFileError(f"{path}: class {cls} has no cluster centres.")
        if not np.issubdtype(arr.dtype, np.floating):
            arr = arr.astype(np.float32)
        arrays[int(cls)] = arr
    _check_widths(arrays, path)
    return {cls: torch.from_numpy(np.array(arrays[cls])) for cls in sorted(arrays)}

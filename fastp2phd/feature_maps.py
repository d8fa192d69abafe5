"""Feature maps for the generator at test time (pix2pixHD section 3.4): one cluster centre per
instance (:func:`sample_feature_map`), or one edited scene's own per-instance vectors, which
the editor stores (:func:`instance_vectors`, :func:`save_instance_vectors`) and
``fastp2phd test`` reads back (:func:`load_instance_vectors`, :func:`feature_map_from_vectors`).
"""
from __future__ import annotations

import operator
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .clusters_file import ClustersFileError
from .data.labels import class_of_instance
from .errors import InvalidArgumentError
from .feature_encoding import as_id_map, class_of
from .files import atomic_path

__all__ = ["feature_map_from_vectors", "instance_vectors", "load_instance_vectors", "sample_feature_map",
           "save_instance_vectors", "write_instance_vectors"]


def sample_feature_map(inst: torch.Tensor, centers: Mapping[int, Any], feat_num: int, *,
                       generator: torch.Generator | None = None,
                       choices: Mapping[int, int] | None = None) -> torch.Tensor:
    """Feature map for the generator at test time: one cluster centre per instance.

    Args:
        inst: (N, 1, H, W) integer instance ids.
        centers: ``{class_id: (k, F) tensor or array}`` (e.g. from :func:`load_clusters`);
            every entry must have F == ``feat_num``.
        feat_num: F, the number of output channels.
        generator: draws the cluster indices (``torch.rand`` on the generator's device;
            the global CPU generator when None). One uniform value is drawn per
            (batch item, instance id) whose class has centres, item by item and in
            increasing id order within an item -- also for instances fixed by
            ``choices`` -- so the same generator state gives the same map, and fixing one
            instance does not change the draws of the others.
        choices: optional ``{instance_id or class_id: cluster_index}``; an instance's
            index is looked up by its instance id first, then by its class id.

    Returns:
        (N, feat_num, H, W) float32 on inst's device: every pixel of an instance whose class
        has centres holds the chosen centre; all other pixels are 0.

    Raises:
        ValueError: a centre width differs from ``feat_num``, or a choice is not a valid
            cluster index for the class of its key (negative, >= k, or a class without
            centres).
    """
    ids_map = as_id_map(inst)
    feat_num = operator.index(feat_num)
    device = ids_map.device
    n, h, w = ids_map.shape
    out = torch.zeros(n, feat_num, h, w, dtype=torch.float32, device=device)
    table = _CentreTable(centers, feat_num, device)
    checked = _checked_choices(choices, table.num_centres)
    if not table.classes or n == 0 or h * w == 0:
        return out
    choice_keys = torch.tensor(list(checked), dtype=torch.int64, device=device)
    choice_vals = torch.tensor(list(checked.values()), dtype=torch.int64, device=device)
    rand_device = generator.device if generator is not None else torch.device("cpu")
    for b in range(n):
        uniq, inverse = torch.unique(ids_map[b], sorted=True, return_inverse=True)
        cls_u = class_of_instance(uniq)
        pos, sel = table.lookup(cls_u)
        if sel.numel() == 0:
            continue
        u = torch.rand(sel.numel(), generator=generator, dtype=torch.float64, device=rand_device).to(device)
        k_sel = table.k_of[pos[sel]]
        idx = torch.minimum((u * k_sel).floor().to(torch.int64), k_sel - 1)
        if choice_keys.numel():
            idx = _apply_choices(idx, uniq[sel], cls_u[sel], choice_keys, choice_vals)
        rows = torch.zeros(uniq.numel(), feat_num, dtype=torch.float32, device=device)
        rows[sel] = table.table[table.off_of[pos[sel]] + idx]
        out[b] = rows[inverse].permute(2, 0, 1)
    return out


class _CentreTable:
    """All classes' centres in one (total_k, F) float32 table on ``device``: the classes
    with at least one centre (increasing), and per class its number of centres and first row."""

    def __init__(self, centers: Mapping[int, Any], feat_num: int, device: torch.device) -> None:
        table_rows, counts, offsets, classes = [], [], [], []
        offset = 0
        for cls in sorted(centers, key=int):
            value = centers[cls]
            c = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
            if c.dim() != 2 or c.shape[1] != feat_num:
                raise InvalidArgumentError(f"centres of class {int(cls)} have shape {tuple(c.shape)}, expected (k, {feat_num}).")
            if c.shape[0] == 0:
                continue
            classes.append(int(cls))
            counts.append(c.shape[0])
            offsets.append(offset)
            offset += c.shape[0]
            table_rows.append(c.to(device=device, dtype=torch.float32))
        self.classes = classes
        self.num_centres = {cls: k for cls, k in zip(classes, counts)}
        if classes:
            self.table = torch.cat(table_rows)  # (total_k, F)
            self.class_keys = torch.tensor(classes, dtype=torch.int64, device=device)
            self.k_of = torch.tensor(counts, dtype=torch.int64, device=device)
            self.off_of = torch.tensor(offsets, dtype=torch.int64, device=device)

    def lookup(self, cls_u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For classes ``cls_u`` (U,): each one's position among the table's classes (clamped),
        and the indices of those that have centres."""
        pos = torch.searchsorted(self.class_keys, cls_u).clamp_max(len(self.classes) - 1)
        has = self.class_keys[pos] == cls_u
        return pos, has.nonzero().squeeze(1)


def _checked_choices(choices: Mapping[int, int] | None, num_centres: Mapping[int, int]) -> dict[int, int]:
    """``choices`` as ``{int key: int index}``, every index a valid cluster of its key's class."""
    checked: dict[int, int] = {}
    for key, index in dict(choices or {}).items():
        key_i, cls = operator.index(key), class_of(operator.index(key))
        if isinstance(index, bool):
            raise InvalidArgumentError(f"choice for {key_i} must be an integer cluster index, got {index!r}.")
        index = operator.index(index)
        k = num_centres.get(cls, 0)
        if not 0 <= index < k:
            what = f"class {cls} has no cluster centres" if k == 0 else f"class {cls} has {k} clusters (0..{k - 1})"
            raise InvalidArgumentError(f"choice {index} for id {key_i} is out of range: {what}.")
        checked[key_i] = index
    return checked


def _apply_choices(idx: torch.Tensor, ids_sel: torch.Tensor, cls_sel: torch.Tensor, choice_keys: torch.Tensor,
                   choice_vals: torch.Tensor) -> torch.Tensor:
    """The drawn cluster indices ``idx`` with the choices applied: a choice by class id, then
    one by instance id (applied last, so it wins)."""
    by_class = cls_sel[:, None] == choice_keys[None, :]
    by_id = ids_sel[:, None] == choice_keys[None, :]
    for match in (by_class, by_id):
        hit = match.any(1)
        picked = choice_vals[match.to(torch.int64).argmax(1)]
        idx = torch.where(hit, picked, idx)
    return idx


# --------------------------------------------------------------------------------------------
# One scene's instance features (what the editor saves and `fastp2phd test` reads back)
# --------------------------------------------------------------------------------------------


def instance_vectors(feat: torch.Tensor, inst: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(ids (N,) int64, vectors (N, F) float32)``: every instance's feature vector, read at its
    first pixel (an edited or encoded feature map is constant per instance)."""
    ids = inst.reshape(-1).long()
    uniq, first = np.unique(ids.cpu().numpy(), return_index=True)
    vectors = feat.reshape(feat.shape[0], -1)[:, torch.from_numpy(first).to(feat.device)].t()
    return uniq.astype(np.int64), vectors.float().cpu().numpy()


def write_instance_vectors(path: str | os.PathLike, ids: np.ndarray, vectors: np.ndarray) -> None:
    """Write ``ids`` and ``vectors`` to a pickle-free ``.npz`` (in place: see ``save_instance_vectors``)."""
    with open(path, "wb") as fh:
        np.savez(fh, ids=np.asarray(ids, np.int64), vectors=np.asarray(vectors, np.float32))


def save_instance_vectors(path: str | os.PathLike, ids: np.ndarray, vectors: np.ndarray) -> None:
    """``write_instance_vectors``, atomically."""
    with atomic_path(path) as tmp:
        write_instance_vectors(tmp, ids, vectors)


_REDO = "save the scene again from the editor, or remove the file (its instances then sample the clusters)"


def load_instance_vectors(path: str | os.PathLike, feat_num: int) -> dict[int, torch.Tensor]:
    """``{instance id: vector (feat_num,)}`` from a file :func:`save_instance_vectors` wrote."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            ids, vectors = npz["ids"], npz["vectors"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise ClustersFileError(f"{path} is not an instance features file the editor wrote ({exc}); {_REDO}") from None
    if ids.ndim != 1 or vectors.shape != (ids.shape[0], feat_num) or ids.dtype.kind not in "iu":
        raise ClustersFileError(f"{path} holds ids of shape {ids.shape} and vectors of shape {vectors.shape}, not "
                                f"(N,) integer ids and (N, {feat_num}) vectors for this model; {_REDO}")
    return {int(i): torch.from_numpy(np.array(v, np.float32)) for i, v in zip(ids, vectors)}


def feature_map_from_vectors(inst: torch.Tensor, vectors: Mapping[int, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """``base`` (N, F, H, W) with every instance of ``inst`` (N, 1, H, W) that ``vectors`` names set to its vector."""
    out = base.clone()
    ids_map = as_id_map(inst)
    for value in torch.unique(ids_map).tolist():
        if value in vectors:
            where = (ids_map == value)[:, None].expand_as(out)
            out[where] = vectors[value].to(out)[None, :, None, None].expand_as(out)[where]
    return out

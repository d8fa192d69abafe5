"""Instance-level feature embedding: encode, cluster, store and sample (pix2pixHD section 3.4).

pix2pixHD can condition its generator on a low-dimensional feature map produced by an
Encoder whose output is averaged per instance, so every pixel of an instance holds the
instance's feature vector. After training, this module provides the rest of the pipeline:

1. **Encode the training set.** :func:`instance_features` takes the (instance-pooled)
   encoder output and the instance map of a batch and keeps, per instance, ONE feature
   vector -- the value at the instance's *middle pixel* (position ``num // 2`` of the
   instance's pixels in row-major order, ``num`` being its pixel count) -- and its relative
   area ``num / (H * W // 32)``. :func:`class_features` / :class:`FeatureCollector` group
   these by semantic class (``id if id < 1000 else id // 1000``, the Cityscapes convention)
   as rows ``[feature..., area]``.
2. **Cluster.** :func:`cluster_features` keeps instances whose relative area is strictly
   greater than ``area_threshold`` (0.5) and runs :func:`kmeans` per class with
   ``min(n_clusters, number of instances)`` clusters.
3. **Store.** :func:`save_clusters` / :func:`load_clusters` use a pickle-free ``.npz``
   (``class_026``-style arrays plus a JSON ``__meta__`` string), written atomically.
   :func:`import_official_clusters` reads the original ``features_clustered_010.npy``
   (a pickled dict), only when explicitly allowed. They live in ``fastp2phd.clusters_file``.
4. **Sample at test time.** :func:`sample_feature_map` gives every instance whose class has
   centres one centre (drawn uniformly, or chosen), broadcast over its pixels; other pixels
   are 0.
5. **One edited scene.** :func:`instance_vectors` / :func:`save_instance_vectors` store a
   scene's per-instance vectors (the editor's Save); :func:`load_instance_vectors` and
   :func:`feature_map_from_vectors` rebuild its feature map at test time.

Everything runs in torch on the input tensors' device; only numpy is used for file I/O.
"""
from __future__ import annotations

import math
import operator
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .data.labels import class_of_instance
from .errors import InvalidArgumentError
from .clusters_file import (ClustersFileError, UnsafePickleError, clusters_writer,  # noqa: F401  (features' API)
                            import_official_clusters, load_clusters, save_clusters)
from .files import atomic_path

__all__ = [
    "AREA_BLOCKS",
    "ClustersFileError",
    "FeatureCollector",
    "UnsafePickleError",
    "class_features",
    "class_of",
    "cluster_features",
    "clusters_writer",
    "feature_map_from_vectors",
    "import_official_clusters",
    "instance_features",
    "instance_vectors",
    "kmeans",
    "load_clusters",
    "load_instance_vectors",
    "sample_feature_map",
    "save_clusters",
    "save_instance_vectors",
    "write_instance_vectors",
]

#: The relative area of an instance is ``num_pixels / (H * W // AREA_BLOCKS)``.
AREA_BLOCKS = 32


# --------------------------------------------------------------------------------------------
# Encoding the training set
# --------------------------------------------------------------------------------------------


def class_of(instance_id: int) -> int:
    """Semantic class of an instance id (``data.labels.class_of_instance`` for one Python int)."""
    return int(class_of_instance(int(instance_id)))


def _as_id_map(inst: torch.Tensor, name: str = "inst") -> torch.Tensor:
    """Validate an (N, 1, H, W) instance map and return it as int64 of shape (N, H, W).

    Floating maps (the original loads instance maps as float tensors) are accepted when
    every value is integral.
    """
    if not isinstance(inst, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(inst).__name__}.")
    if inst.dim() != 4 or inst.shape[1] != 1:
        raise InvalidArgumentError(f"{name} must have shape (N, 1, H, W), got {tuple(inst.shape)}.")
    if inst.dtype == torch.bool or inst.is_complex():
        raise TypeError(f"{name} must hold integer instance ids, got dtype {inst.dtype}.")
    if inst.is_floating_point():
        if not bool(torch.all(inst == torch.round(inst))):
            raise InvalidArgumentError(f"{name} is floating point but holds non-integral instance ids.")
    return inst[:, 0].to(torch.int64)


def instance_features(feat_map: torch.Tensor, inst: torch.Tensor) -> list[dict[int, tuple[torch.Tensor, float]]]:
    """One feature vector and relative area per instance of every batch item.

    Args:
        feat_map: (N, F, H, W) encoder output, normally already averaged per instance.
        inst: (N, 1, H, W) integer instance ids (integral floating values are accepted).

    Returns:
        A list with one dict per batch item, ``{instance_id: (feature, relative_area)}``
        in increasing id order, where ``feature`` is a CPU tensor of shape (F,) and dtype
        ``feat_map.dtype`` holding ``feat_map`` at the instance's middle pixel -- position
        ``num // 2`` in the row-major list of the instance's pixels of that item's H x W
        plane -- and ``relative_area = num / (H * W // 32)`` (the denominator is clamped to
        at least 1 for planes smaller than 32 pixels). Batch items are kept apart.

    The computation is vectorised (a stable sort of the flattened ids and a gather) and
    runs on the tensors' device; only the final dict is built in Python.
    """
    if not isinstance(feat_map, torch.Tensor) or feat_map.dim() != 4:
        raise InvalidArgumentError(f"feat_map must be a (N, F, H, W) tensor, got {getattr(feat_map, 'shape', type(feat_map))}.")
    ids_map = _as_id_map(inst)
    n, f, h, w = feat_map.shape
    if ids_map.shape != (n, h, w):
        raise InvalidArgumentError(f"inst shape {tuple(inst.shape)} does not match feat_map shape {tuple(feat_map.shape)} "
                         "(expected (N, 1, H, W) with the same N, H, W).")
    if ids_map.device != feat_map.device:
        raise InvalidArgumentError(f"feat_map is on {feat_map.device} but inst is on {inst.device}.")
    denominator = max(h * w // AREA_BLOCKS, 1)
    feat_flat = feat_map.detach().reshape(n, f, h * w)
    result = []
    for b in range(n):
        ids = ids_map[b].reshape(-1)
        sorted_ids, order = torch.sort(ids, stable=True)  # row-major order kept within an id
        uniq, counts = torch.unique_consecutive(sorted_ids, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        middle = order[starts + torch.div(counts, 2, rounding_mode="floor")]
        feats = feat_flat[b][:, middle].t().cpu()  # (U, F)
        uniq_list = uniq.tolist()
        counts_list = counts.tolist()
        result.append({
            int(i): (feats[j].clone(), counts_list[j] / denominator) for j, i in enumerate(uniq_list)
        })
    return result


def class_features(per_item: list[Mapping[int, tuple[torch.Tensor, float]]]) -> dict[int, torch.Tensor]:
    """Group per-instance features by semantic class.

    Args:
        per_item: the output of :func:`instance_features` (or several concatenated).

    Returns:
        ``{class_id: Tensor (n, F + 1)}`` with keys in increasing order, each row being
        ``[feature..., relative_area]``; rows follow the items' order, then increasing
        instance id. The dtype is the features' dtype promoted to at least float32.
    """
    rows: dict[int, list[torch.Tensor]] = {}
    for item in per_item:
        for instance_id in sorted(item):
            feature, area = item[instance_id]
            feature = torch.as_tensor(feature).detach().cpu().reshape(-1)
            dtype = torch.promote_types(feature.dtype, torch.float32)
            row = torch.cat([feature.to(dtype), torch.tensor([float(area)], dtype=dtype)])
            rows.setdefault(class_of(instance_id), []).append(row)
    out = {}
    for cls in sorted(rows):
        widths = {r.shape[0] for r in rows[cls]}
        if len(widths) != 1:
            raise InvalidArgumentError(f"class {cls} has features of different lengths {sorted(w - 1 for w in widths)}.")
        dtype = rows[cls][0].dtype
        for r in rows[cls][1:]:
            dtype = torch.promote_types(dtype, r.dtype)
        out[cls] = torch.stack([r.to(dtype) for r in rows[cls]])
    return out


class FeatureCollector:
    """Accumulate per-class instance features over a dataset.

    Example::

        collector = FeatureCollector()
        for label, inst, image in loader:
            collector.add(encoder(image, inst), inst)
        features = collector.result()          # {class: (n, F + 1)}
        centers = cluster_features(features)   # {class: (k, F)}
    """

    def __init__(self) -> None:
        self._parts: dict[int, list[torch.Tensor]] = {}
        self.num_items = 0  #: batch items added so far

    def add(self, feat_map: torch.Tensor, inst: torch.Tensor) -> None:
        """Add one batch: ``feat_map`` (N, F, H, W) and ``inst`` (N, 1, H, W)."""
        per_item = instance_features(feat_map, inst)
        for cls, rows in class_features(per_item).items():
            self._parts.setdefault(cls, []).append(rows)
        self.num_items += len(per_item)

    def result(self) -> dict[int, torch.Tensor]:
        """``{class_id: Tensor (n, F + 1)}`` over everything added, keys in increasing order."""
        out = {}
        for cls in sorted(self._parts):
            parts = self._parts[cls]
            dtype = parts[0].dtype
            for p in parts[1:]:
                dtype = torch.promote_types(dtype, p.dtype)
            out[cls] = torch.cat([p.to(dtype) for p in parts])
        return out


# --------------------------------------------------------------------------------------------
# K-means
# --------------------------------------------------------------------------------------------


def _sq_dists(x: torch.Tensor, x_sq: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """(n, k) squared Euclidean distances by the expansion, clamped at 0 against rounding."""
    d = x_sq[:, None] - 2.0 * (x @ c.t()) + (c * c).sum(1)[None, :]
    return d.clamp_min_(0)


def _kmeans_plus_plus(x: torch.Tensor, x_sq: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++: each new centre is the best (lowest potential) of 2 + log(k)
    candidates sampled with probability proportional to the squared distance to the
    nearest chosen centre. Falls back to uniform sampling when every point already
    coincides with a centre."""
    n = x.shape[0]
    trials = 2 + int(math.log(k))
    centers = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    first = torch.randint(n, (1,), generator=gen, device=x.device)
    centers[0] = x[first[0]]
    closest = _sq_dists(x, x_sq, centers[:1]).squeeze(1)
    for c in range(1, k):
        if float(closest.sum()) > 0:
            cand = torch.multinomial(closest, trials, replacement=True, generator=gen)
        else:
            cand = torch.randint(n, (trials,), generator=gen, device=x.device)
        cand_d = _sq_dists(x, x_sq, x[cand]).t()  # (trials, n)
        new_closest = torch.minimum(closest[None, :], cand_d)
        best = int(torch.argmin(new_closest.sum(1)))
        centers[c] = x[cand[best]]
        closest = new_closest[best]
    return centers


def _lloyd(x: torch.Tensor, x_sq: torch.Tensor, centers: torch.Tensor, max_iter: int,
           tol: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Lloyd iterations from ``centers``; an empty cluster is re-seeded to the point
    farthest from its own centre. Stops when the labels repeat or the squared centre
    shift is <= tol. Returns (centers, labels, inertia) after a final assignment."""
    k = centers.shape[0]
    prev_labels = None
    for _ in range(max_iter):
        d = _sq_dists(x, x_sq, centers)
        labels = d.argmin(1)
        # One-hot matmul instead of index_add_: deterministic on every device.
        onehot = torch.nn.functional.one_hot(labels, k).to(x.dtype)
        counts = onehot.sum(0)
        new = (onehot.t() @ x) / counts.clamp_min(1)[:, None]
        empty = counts == 0
        n_empty = int(empty.sum())
        if n_empty:
            own = d.gather(1, labels[:, None]).squeeze(1)
            far = torch.topk(own, n_empty).indices
            new[empty] = x[far]
        shift = float(((new - centers) ** 2).sum())
        centers = new
        if prev_labels is not None and torch.equal(labels, prev_labels):
            break
        if shift <= tol:
            break
        prev_labels = labels
    labels = _sq_dists(x, x_sq, centers).argmin(1)
    inertia = float(((x - centers[labels]) ** 2).sum())
    return centers, labels, inertia


def kmeans(x: torch.Tensor, k: int, *, n_init: int = 10, max_iter: int = 300, tol: float = 1e-4,
           seed: int = 0, init: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """K-means (Lloyd's algorithm with greedy k-means++ initialisation), in torch on x's device.

    Args:
        x: (n, d) float32 or float64 points, n >= 1.
        k: number of clusters, >= 1; clamped to n when larger.
        n_init: restarts from different k-means++ seeds; the lowest inertia wins
            (the first one on ties).
        max_iter: Lloyd iterations per restart.
        tol: relative tolerance: a restart stops when the summed squared centre shift is
            <= ``tol * mean per-feature variance of x`` (scikit-learn's convention), or
            when the assignment repeats.
        seed: seeds a ``torch.Generator`` on x's device; the result is deterministic for a
            given seed, input and device.
        init: optional (min(k, n), d) initial centres; when given, a single run starts
            from them and ``n_init`` is ignored.

    Returns:
        ``(centers (k, d) in x.dtype, labels (n,) int64, inertia float)`` where
        ``inertia = sum_i ||x_i - centers[labels_i]||^2`` for the returned labels (the
        nearest centre of every point). Empty clusters met during the iterations are
        re-seeded to the point farthest from its centre, so centres are never NaN.
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise InvalidArgumentError(f"kmeans expects a 2-D (n, d) tensor, got {getattr(x, 'shape', type(x))}.")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"kmeans expects float32 or float64 points, got {x.dtype}.")
    n = x.shape[0]
    if n == 0:
        raise InvalidArgumentError("kmeans needs at least one point, got an empty (0, d) tensor.")
    k = operator.index(k)
    if k < 1:
        raise InvalidArgumentError(f"kmeans needs k >= 1, got {k}.")
    if n_init < 1 or max_iter < 1 or tol < 0:
        raise InvalidArgumentError(f"kmeans needs n_init >= 1, max_iter >= 1 and tol >= 0, got {n_init}, {max_iter}, {tol}.")
    if not bool(torch.isfinite(x).all()):
        raise InvalidArgumentError("kmeans input contains NaN or infinite values.")
    k = min(k, n)
    x = x.detach()
    x_sq = (x * x).sum(1)
    tol_abs = float(x.var(dim=0, unbiased=False).mean()) * tol
    if init is not None:
        init = torch.as_tensor(init).detach().to(device=x.device, dtype=x.dtype)
        if init.shape != (k, x.shape[1]):
            raise InvalidArgumentError(f"kmeans init must have shape {(k, x.shape[1])}, got {tuple(init.shape)}.")
        return _lloyd(x, x_sq, init.clone(), max_iter, tol_abs)
    gen = torch.Generator(device=x.device)
    gen.manual_seed(seed)
    best = None
    for _ in range(n_init):
        centers = _kmeans_plus_plus(x, x_sq, k, gen)
        run = _lloyd(x, x_sq, centers, max_iter, tol_abs)
        if best is None or run[2] < best[2]:
            best = run
    return best


def cluster_features(features: Mapping[int, torch.Tensor], n_clusters: int = 10, area_threshold: float = 0.5,
                     seed: int = 0, device: torch.device | str | None = None) -> dict[int, torch.Tensor]:
    """Per-class K-means of instance features, as pix2pixHD's clustering step.

    Args:
        features: ``{class_id: Tensor (n, F + 1)}`` (rows ``[feature..., area]``, e.g. from
            :func:`class_features`).
        n_clusters: clusters per class; reduced to the number of kept instances when fewer.
        area_threshold: rows with relative area strictly greater than this are kept.
        seed: passed to :func:`kmeans` (the same seed for every class).
        device: where K-means runs (default: where each class's tensor is).

    Returns:
        ``{class_id: Tensor (k_c, F)}`` on the CPU, keys in increasing order, float64 if
        the input is float64 else float32. Classes with no instance left are omitted.
    """
    n_clusters = operator.index(n_clusters)
    if n_clusters < 1:
        raise InvalidArgumentError(f"n_clusters must be >= 1, got {n_clusters}.")
    out = {}
    for cls in sorted(features, key=int):
        rows = torch.as_tensor(features[cls])
        if rows.dim() != 2 or rows.shape[1] < 2:
            raise InvalidArgumentError(f"features of class {cls} must be (n, F + 1) with F >= 1, got {tuple(rows.shape)}.")
        if rows.dtype != torch.float64:
            rows = rows.to(torch.float32)
        if device is not None:
            rows = rows.to(device)
        kept = rows[rows[:, -1] > area_threshold, :-1]
        if kept.shape[0] == 0:
            continue
        centers, _, _ = kmeans(kept.contiguous(), min(n_clusters, kept.shape[0]), seed=seed)
        out[int(cls)] = centers.cpu()
    return out


# --------------------------------------------------------------------------------------------
# Sampling at test time
# --------------------------------------------------------------------------------------------


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
    ids_map = _as_id_map(inst)
    feat_num = operator.index(feat_num)
    device = ids_map.device
    n, h, w = ids_map.shape
    out = torch.zeros(n, feat_num, h, w, dtype=torch.float32, device=device)
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
    num_centres = {cls: k for cls, k in zip(classes, counts)}

    choices = dict(choices or {})
    checked: dict[int, int] = {}
    for key, index in choices.items():
        key_i, cls = operator.index(key), class_of(operator.index(key))
        if isinstance(index, bool):
            raise InvalidArgumentError(f"choice for {key_i} must be an integer cluster index, got {index!r}.")
        index = operator.index(index)
        k = num_centres.get(cls, 0)
        if not 0 <= index < k:
            what = f"class {cls} has no cluster centres" if k == 0 else f"class {cls} has {k} clusters (0..{k - 1})"
            raise InvalidArgumentError(f"choice {index} for id {key_i} is out of range: {what}.")
        checked[key_i] = index
    if not classes or n == 0 or h * w == 0:
        return out

    table = torch.cat(table_rows)  # (total_k, F)
    class_keys = torch.tensor(classes, dtype=torch.int64, device=device)
    k_of = torch.tensor(counts, dtype=torch.int64, device=device)
    off_of = torch.tensor(offsets, dtype=torch.int64, device=device)
    choice_keys = torch.tensor(list(checked), dtype=torch.int64, device=device)
    choice_vals = torch.tensor(list(checked.values()), dtype=torch.int64, device=device)
    rand_device = generator.device if generator is not None else torch.device("cpu")
    for b in range(n):
        uniq, inverse = torch.unique(ids_map[b], sorted=True, return_inverse=True)
        cls_u = class_of_instance(uniq)
        pos = torch.searchsorted(class_keys, cls_u).clamp_max(len(classes) - 1)
        has = class_keys[pos] == cls_u
        sel = has.nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        u = torch.rand(sel.numel(), generator=generator, dtype=torch.float64, device=rand_device).to(device)
        k_sel = k_of[pos[sel]]
        idx = torch.minimum((u * k_sel).floor().to(torch.int64), k_sel - 1)
        if choice_keys.numel():
            ids_sel, cls_sel = uniq[sel], cls_u[sel]
            by_class = cls_sel[:, None] == choice_keys[None, :]
            by_id = ids_sel[:, None] == choice_keys[None, :]
            for match in (by_class, by_id):  # instance id applied last, so it wins
                hit = match.any(1)
                picked = choice_vals[match.to(torch.int64).argmax(1)]
                idx = torch.where(hit, picked, idx)
        rows = torch.zeros(uniq.numel(), feat_num, dtype=torch.float32, device=device)
        rows[sel] = table[off_of[pos[sel]] + idx]
        out[b] = rows[inverse].permute(2, 0, 1)
    return out


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


def load_instance_vectors(path: str | os.PathLike, feat_num: int) -> dict[int, torch.Tensor]:
    """``{instance id: vector (feat_num,)}`` from a file :func:`save_instance_vectors` wrote."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            ids, vectors = npz["ids"], npz["vectors"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
        raise ClustersFileError(f"{path} is not an instance features file the editor wrote ({exc}).") from None
    if ids.ndim != 1 or vectors.shape != (ids.shape[0], feat_num) or ids.dtype.kind not in "iu":
        raise ClustersFileError(f"{path} holds ids of shape {ids.shape} and vectors of shape {vectors.shape}; expected "
                                f"(N,) integer ids and (N, {feat_num}) vectors for this model")
    return {int(i): torch.from_numpy(np.array(v, np.float32)) for i, v in zip(ids, vectors)}


def feature_map_from_vectors(inst: torch.Tensor, vectors: Mapping[int, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """``base`` (N, F, H, W) with every instance of ``inst`` (N, 1, H, W) that ``vectors`` names set to its vector."""
    out = base.clone()
    ids_map = _as_id_map(inst)
    for value in torch.unique(ids_map).tolist():
        if value in vectors:
            where = (ids_map == value)[:, None].expand_as(out)
            out[where] = vectors[value].to(out)[None, :, None, None].expand_as(out)[where]
    return out

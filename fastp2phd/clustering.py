"""Clustering instance features (pix2pixHD section 3.4): :func:`kmeans` (Lloyd's algorithm
with greedy k-means++ initialisation) and :func:`cluster_features`, K-means per semantic
class of the rows ``fastp2phd.feature_encoding`` collects. In torch, on the points' device.
"""
from __future__ import annotations

import math
import operator
from collections.abc import Mapping

import torch

from .errors import InvalidArgumentError

__all__ = ["cluster_features", "kmeans"]


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

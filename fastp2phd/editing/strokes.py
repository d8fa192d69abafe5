"""A brush stroke's pixels: the pixels within width/2 of a polyline, found with work that grows
with the pixels the stroke touches (its points, length and width), never with the scene's size,
and bounds on one stroke so that a request cannot ask for unbounded work."""
from __future__ import annotations

import math

import torch

from ..errors import InvalidArgumentError

__all__ = ["MAX_BRUSH_WIDTH", "MAX_STROKE_POINTS", "MAX_STROKE_WORK", "stroke_region"]

# Bounds on one stroke: its cost grows with its points, length and width (see stroke_region).
MAX_STROKE_POINTS = 10_000
MAX_BRUSH_WIDTH = 128
MAX_STROKE_WORK = 64 << 20  # pixel tests: about a second on one CPU core


def stroke_region(points: list[tuple[int, int]], width: int, height: int,
                  scene_width: int) -> tuple[tuple[int, int, int, int], torch.Tensor]:
    """(box, mask over the box, on the CPU) of the pixels of a ``height`` x ``scene_width``
    scene within width/2 of the polyline ``points`` [(y, x), ...] (inside the scene).

    Every segment is cut into pieces no longer than the brush radius, and each piece is
    tested only on the pixels of its own small window. A stroke costing more than
    ``MAX_STROKE_WORK`` pixel tests is refused.
    """
    radius = width / 2.0
    pts = torch.tensor(points, dtype=torch.float32)
    if len(pts) > 1:  # repeated points add nothing but work
        pts = pts[torch.cat([torch.ones(1, dtype=torch.bool), (pts[1:] != pts[:-1]).any(dim=1)])]
    starts, ends = (pts[:-1], pts[1:]) if len(pts) > 1 else (pts, pts)
    lengths = (ends - starts).norm(dim=1)
    pieces = torch.ceil(lengths / max(1.0, radius)).clamp_min(1).long()
    size = int(math.ceil(float((lengths / pieces).max()) + 2 * radius)) + 2  # a piece's window side
    work = int(pieces.sum()) * size * size
    if work > MAX_STROKE_WORK:
        raise InvalidArgumentError(f"this stroke ({len(points)} points, {float(lengths.sum()):.0f} pixels long, width {width}) "
                         "is too much for one edit; paint it in several shorter strokes")
    a, b = _pieces(starts, ends, pieces)
    hit = torch.cat(list(_hits(a, b, radius, size, height, scene_width)))
    (y0, x0), (y1, x1) = hit.min(0).values.tolist(), (hit.max(0).values + 1).tolist()
    inside = torch.zeros(y1 - y0, x1 - x0, dtype=torch.bool)
    inside[hit[:, 0] - y0, hit[:, 1] - x0] = True
    return (y0, y1, x0, x1), inside


def _pieces(starts: torch.Tensor, ends: torch.Tensor, pieces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first points, last points) of the pieces, segment i cut into ``pieces[i]`` equal ones."""
    segment = torch.repeat_interleave(torch.arange(len(pieces)), pieces)
    k = torch.arange(len(segment)) - torch.repeat_interleave(torch.cumsum(pieces, 0) - pieces, pieces)
    direction = (ends - starts)[segment]
    a = starts[segment] + direction * (k / pieces[segment])[:, None]
    b = starts[segment] + direction * ((k + 1) / pieces[segment])[:, None]
    return a, b


def _hits(a: torch.Tensor, b: torch.Tensor, radius: float, size: int, height: int, width: int):
    """(n, 2) int64 (y, x) of the scene's pixels within ``radius`` of each piece a-b, tested on
    the piece's size x size window, a chunk of pieces at a time."""
    origin = torch.floor(torch.minimum(a, b) - radius)
    offsets = torch.arange(size, dtype=torch.float32)
    chunk = max(1, (1 << 22) // (size * size))  # bounds the temporaries to a few MiB
    for i in range(0, len(a), chunk):
        ca, cb, co = a[i:i + chunk], b[i:i + chunk], origin[i:i + chunk]
        ys = co[:, 0, None, None] + offsets[None, :, None]  # (pieces, size, 1)
        xs = co[:, 1, None, None] + offsets[None, None, :]  # (pieces, 1, size)
        ay, ax = ca[:, 0, None, None], ca[:, 1, None, None]
        dy, dx = (cb - ca)[:, 0, None, None], (cb - ca)[:, 1, None, None]
        length2 = dy * dy + dx * dx
        t = (((ys - ay) * dy + (xs - ax) * dx) / torch.where(length2 > 0, length2, 1.0)).clamp(0, 1)
        near = (ys - (ay + t * dy)) ** 2 + (xs - (ax + t * dx)) ** 2 <= radius * radius
        near &= (ys >= 0) & (ys < height) & (xs >= 0) & (xs < width)
        yield torch.stack([ys.expand_as(near)[near], xs.expand_as(near)[near]], 1).long()

"""The objects of a synthetic street scene (``data.scene``): cars and persons.

Each kind has a silhouette (``*_mask``) and its pixels (``*_pixels``) in its own box.
:func:`place_objects` samples 2-6 cars and 1-4 persons and places them so that, painted
far to near, every one keeps at least half of its pixels visible; :func:`paint_objects`
draws them into the scene's label, instance and colour arrays. Pure numpy; all
randomness comes from the scene's generator, in a fixed order.
"""
from __future__ import annotations

from typing import List, Optional

import numpy as np

__all__ = ["CAR", "PERSON", "jitter", "paint_objects", "place_objects"]

# Cityscapes labelIds of the object kinds drawn here
PERSON, CAR = 24, 26

# Car body colours, pairwise far apart: each car of a scene takes a different one.
_CAR_COLOURS = np.array([
    (200, 30, 30),    # red
    (30, 60, 190),    # blue
    (235, 235, 235),  # white
    (25, 25, 28),     # black
    (230, 200, 30),   # yellow
    (140, 145, 150),  # silver
    (30, 140, 60),    # green
    (235, 120, 20),   # orange
    (20, 160, 170),   # teal
    (125, 45, 150),   # purple
], np.float32)
_SHIRT_COLOURS = np.array([
    (200, 40, 40), (40, 90, 200), (240, 240, 240), (40, 40, 40), (230, 190, 40),
    (40, 160, 80), (230, 110, 30), (150, 60, 160), (20, 170, 180), (240, 130, 170),
], np.float32)
_PANTS_COLOURS = np.array([(35, 45, 90), (30, 30, 30), (90, 80, 60), (120, 120, 125), (60, 30, 20)], np.float32)
_SKIN_COLOURS = np.array([(240, 200, 170), (200, 150, 110), (150, 100, 70), (95, 60, 40)], np.float32)
_GLASS = np.array((55, 65, 80), np.float32)


def jitter(rng: np.random.Generator, colour, amount) -> np.ndarray:
    """``colour`` with each channel moved by up to ``amount`` (uniform), kept in 0..255."""
    return np.clip(colour + rng.uniform(-amount, amount, 3), 0, 255).astype(np.float32)


# ----------------------------------------------------------------------------- shapes
def grid(h: int, w: int):
    """Pixel-centre coordinates of an h x w box, broadcastable: (h, 1) and (1, w)."""
    return np.arange(h, dtype=np.float32)[:, None] + 0.5, np.arange(w, dtype=np.float32)[None, :] + 0.5


def rounded_box(yy, xx, y0, y1, x0, x1, r):
    cy, cx, hy, hx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
    r = max(0.0, min(r, hy, hx))
    dx = np.maximum(np.abs(xx - cx) - (hx - r), 0)
    dy = np.maximum(np.abs(yy - cy) - (hy - r), 0)
    return dx * dx + dy * dy <= r * r + 1e-6


def ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


# ----------------------------------------------------------------------------- kinds
def _car_mask(w: int, h: int) -> np.ndarray:
    yy, xx = grid(h, w)
    body = rounded_box(yy, xx, 0.38 * h, h, 0, w, min(0.25 * 0.62 * h, 0.15 * w))
    cabin = rounded_box(yy, xx, 0, 0.5 * h, 0.14 * w, 0.86 * w, 0.3 * 0.5 * h)
    return body | cabin


def _car_pixels(w: int, h: int, body: np.ndarray) -> np.ndarray:
    yy, xx = grid(h, w)
    shade = (1.12 - 0.3 * yy / h)[..., None]  # lit from above
    img = np.broadcast_to(body * shade, (h, w, 3)).copy()
    window = rounded_box(yy, xx, 0.08 * h, 0.4 * h, 0.2 * w, 0.8 * w, 0.1 * h)
    img[window] = 0.4 * body + 0.6 * _GLASS
    wheels = ellipse(yy, xx, 0.88 * h, 0.22 * w, 0.14 * h, 0.11 * w) | ellipse(yy, xx, 0.88 * h, 0.78 * w, 0.14 * h, 0.11 * w)
    img[wheels] = (22, 22, 22)
    return img


def _person_mask(w: int, h: int) -> np.ndarray:
    yy, xx = grid(h, w)
    head = ellipse(yy, xx, 0.1 * h, 0.5 * w, 0.1 * h, max(0.3 * w, 0.6))
    torso = rounded_box(yy, xx, 0.18 * h, 0.62 * h, 0, w, 0.25 * w)
    legs = rounded_box(yy, xx, 0.6 * h, h, 0.08 * w, 0.46 * w, 0) | rounded_box(yy, xx, 0.6 * h, h, 0.54 * w, 0.92 * w, 0)
    return head | torso | legs


def _person_pixels(w: int, h: int, skin, shirt, pants) -> np.ndarray:
    yy = grid(h, w)[0]
    rows = np.empty((h, 1, 3), np.float32)
    rows[...] = pants
    rows[(yy[:, 0] < 0.61 * h)] = shirt
    rows[(yy[:, 0] < 0.2 * h)] = skin
    return np.broadcast_to(rows, (h, w, 3)).copy()


# ----------------------------------------------------------------------------- placement
class _Thing:
    """One object: class, box (x0, y0, w, h), its silhouette and the part of it left visible;
    once placed, its instance id and (cars) the index of its body colour."""

    __slots__ = ("cls", "x0", "y0", "w", "h", "mask", "vis", "area", "visible", "order", "ident", "colour")

    def __init__(self, cls, x0, y0, w, h, mask, order):
        self.cls, self.x0, self.y0, self.w, self.h = cls, x0, y0, w, h
        self.mask = mask
        self.vis = mask.copy()
        self.area = int(mask.sum())
        self.visible = self.area
        self.order = order

    @property
    def depth(self):  # bottom row: larger is nearer the camera
        return (self.y0 + self.h, self.order)


def _overlap(a: _Thing, b: _Thing):
    """Slices of a's and b's boxes covering their intersection, or None."""
    x0, x1 = max(a.x0, b.x0), min(a.x0 + a.w, b.x0 + b.w)
    y0, y1 = max(a.y0, b.y0), min(a.y0 + a.h, b.y0 + b.h)
    if x0 >= x1 or y0 >= y1:
        return None
    sa = (slice(y0 - a.y0, y1 - a.y0), slice(x0 - a.x0, x1 - a.x0))
    sb = (slice(y0 - b.y0, y1 - b.y0), slice(x0 - b.x0, x1 - b.x0))
    return sa, sb


def _try_place(cand: _Thing, placed: List[_Thing], keep: float = 0.5) -> bool:
    """Accept ``cand`` if, painting far to near, every object (cand included) keeps at least
    ``keep`` of its pixels visible; on acceptance update the visible parts."""
    updates = []
    for other in placed:
        ov = _overlap(cand, other)
        if ov is None:
            continue
        sc, so = ov
        if other.depth < cand.depth:  # cand is nearer: it hides part of other
            new_vis = other.vis[so] & ~cand.mask[sc]
            lost = int(other.vis[so].sum()) - int(new_vis.sum())
            if other.visible - lost < keep * other.area:
                return False
            updates.append((other, so, new_vis, lost))
        else:  # other is nearer: it hides part of cand
            cand.vis[sc] &= ~other.mask[so]
    cand.visible = int(cand.vis.sum())
    if cand.visible < keep * cand.area or cand.visible == 0:
        return False
    for other, so, new_vis, lost in updates:
        other.vis[so] = new_vis
        other.visible -= lost
    return True


def _place_one(rng, cls: int, order: int, placed: List[_Thing], H: int, W: int, horizon: int, curb: int) -> Optional[_Thing]:
    """Sample the size and depth of one object and up to 25 positions for it; the placed
    object, or None when it fits nowhere (the first two cars then try each end of the picture)."""
    if cls == CAR:
        bottom = int(rng.integers(curb + 2, H + 1)) if curb + 2 <= H else H
        h = max(4, int(0.33 * (bottom - horizon)))
        w = max(7, min(int(h * rng.uniform(1.6, 2.2)), int(0.45 * W)))
    else:
        bottom = int(rng.integers(horizon + 2, H + 1))
        h = max(6, int(0.38 * (bottom - horizon)))
        w = max(2, int(h * rng.uniform(0.25, 0.35)))
    h = min(h, bottom)
    mask = _car_mask(w, h) if cls == CAR else _person_mask(w, h)
    for _ in range(25):
        cand = _Thing(cls, int(rng.integers(0, W - w + 1)), bottom - h, w, h, mask, order)
        if _try_place(cand, placed):
            return cand
    if order >= 2:
        return None
    # A scene must have two cars: the second one, at most 0.27 W wide, fits
    # beside the first (at most 0.45 W) at one end of the picture.
    if w > int(0.27 * W):
        scale = int(0.27 * W) / w
        w, h = max(4, int(0.27 * W)), max(3, int(h * scale))
        mask = _car_mask(w, h)
    for x0 in (0, W - w):
        cand = _Thing(cls, x0, bottom - h, w, h, mask, order)
        if _try_place(cand, placed):
            return cand
    return None


def place_objects(rng: np.random.Generator, H: int, W: int, horizon: int, curb: int) -> List[_Thing]:
    """Sample and place the scene's cars and persons (in placement order), give them their
    instance ids (``class * 1000 + k``, k counting each class's objects from 0 in placement
    order) and give each car, far to near, a body colour of its own."""
    n_cars, n_persons = int(rng.integers(2, 7)), int(rng.integers(1, 5))
    kinds = [CAR, CAR, PERSON] + list(rng.permutation([CAR] * (n_cars - 2) + [PERSON] * (n_persons - 1)))
    car_colours = rng.permutation(len(_CAR_COLOURS))
    placed: List[_Thing] = []
    for order, cls in enumerate(kinds):
        thing = _place_one(rng, cls, order, placed, H, W, horizon, curb)
        if thing is not None:
            placed.append(thing)
    counters = {CAR: 0, PERSON: 0}
    for thing in placed:
        thing.ident = thing.cls * 1000 + counters[thing.cls]
        counters[thing.cls] += 1
    cars_far_to_near = [thing for thing in sorted(placed, key=lambda t: t.depth) if thing.cls == CAR]
    for car, colour in zip(cars_far_to_near, car_colours):
        car.colour = colour
    return placed


def paint_objects(rng: np.random.Generator, placed: List[_Thing], label: np.ndarray, inst: np.ndarray,
                  albedo: np.ndarray) -> None:
    """Draw the placed objects far to near into ``label``, ``inst`` and ``albedo`` (in place),
    each with colours of its own."""
    for thing in sorted(placed, key=lambda t: t.depth):
        if thing.cls == CAR:
            colour = jitter(rng, _CAR_COLOURS[thing.colour], 12)
            pixels = _car_pixels(thing.w, thing.h, colour)
        else:
            skin = _SKIN_COLOURS[rng.integers(len(_SKIN_COLOURS))]
            shirt = jitter(rng, _SHIRT_COLOURS[rng.integers(len(_SHIRT_COLOURS))], 15)
            pants = jitter(rng, _PANTS_COLOURS[rng.integers(len(_PANTS_COLOURS))], 10)
            pixels = _person_pixels(thing.w, thing.h, skin, shirt, pants)
        box = (slice(thing.y0, thing.y0 + thing.h), slice(thing.x0, thing.x0 + thing.w))
        label[box][thing.mask] = thing.cls
        inst[box][thing.mask] = thing.ident
        albedo[box][thing.mask] = pixels[thing.mask]

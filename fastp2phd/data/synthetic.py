"""An embedded synthetic street-scene dataset (no download): Cityscapes-like label maps,
instance maps and photos drawn with numpy.

A scene (``render_scene``) has sky at the top, buildings and trees along the horizon, a
sidewalk strip below it, road at the bottom, maybe poles with traffic signs, and
several objects: 2-6 cars and 1-4 persons, which may overlap (every one keeps at
least half of its pixels visible). Ids follow Cityscapes: label maps hold labelIds,
instance maps hold ``class * 1000 + k`` on object pixels (k counts the objects of one
class from 0) and the class id on all other pixels. In the photo every class has a
textured base colour and every object has colours of its own (each car of a scene a
different body colour), so an instance-wise feature encoder has something to learn.

Everything is a pure function of (height, width, seed).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidArgumentError
from ..specs import DataSpec
from .folder import DatasetError, build_item, item_rng
from .labels import colorize_labels
from .transforms import _BICUBIC

__all__ = ["SyntheticDataset", "make_synthetic", "render_scene", "scene_seed"]

# labelIds used here
SKY, ROAD, SIDEWALK, BUILDING, VEGETATION, TERRAIN, POLE, SIGN, PERSON, CAR = 23, 7, 8, 11, 21, 22, 17, 20, 24, 26

# Per class: amplitude of pixel noise (grey levels) and of smooth multiplicative shading.
_FINE_AMP = np.zeros(256, np.float32)
_SHADE_AMP = np.zeros(256, np.float32)
for _cls, _fine, _shade in [
    (SKY, 1.5, 0.03), (ROAD, 7.0, 0.10), (SIDEWALK, 5.0, 0.08), (BUILDING, 5.0, 0.10),
    (VEGETATION, 20.0, 0.20), (TERRAIN, 14.0, 0.15), (POLE, 3.0, 0.05), (SIGN, 2.0, 0.03),
    (PERSON, 4.0, 0.05), (CAR, 3.0, 0.04),
]:
    _FINE_AMP[_cls], _SHADE_AMP[_cls] = _fine, _shade

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
_BUILDING_COLOURS = np.array([
    (120, 115, 110), (150, 135, 115), (140, 80, 60), (95, 95, 105), (170, 160, 140), (110, 120, 130),
], np.float32)
_GLASS = np.array((55, 65, 80), np.float32)


def scene_seed(seed: int, phase: str, index: int) -> int:
    """The ``render_scene`` seed of scene ``index`` of ``phase`` for a dataset seed (a
    64-bit hash, so train and test scenes differ and nearby seeds are unrelated)."""
    digest = hashlib.sha256(f"fastp2phd-synthetic:{int(seed)}:{phase}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


# ----------------------------------------------------------------------------- shapes
def _grid(h: int, w: int):
    """Pixel-centre coordinates of an h x w box, broadcastable: (h, 1) and (1, w)."""
    return np.arange(h, dtype=np.float32)[:, None] + 0.5, np.arange(w, dtype=np.float32)[None, :] + 0.5


def _rounded_box(yy, xx, y0, y1, x0, x1, r):
    cy, cx, hy, hx = (y0 + y1) / 2, (x0 + x1) / 2, (y1 - y0) / 2, (x1 - x0) / 2
    r = max(0.0, min(r, hy, hx))
    dx = np.maximum(np.abs(xx - cx) - (hx - r), 0)
    dy = np.maximum(np.abs(yy - cy) - (hy - r), 0)
    return dx * dx + dy * dy <= r * r + 1e-6


def _ellipse(yy, xx, cy, cx, ry, rx):
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


class _Thing:
    """One object: class, box (x0, y0, w, h), its silhouette and the part of it left visible."""

    __slots__ = ("cls", "x0", "y0", "w", "h", "mask", "vis", "area", "visible", "order", "ident")

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


def _car_mask(w: int, h: int) -> np.ndarray:
    yy, xx = _grid(h, w)
    body = _rounded_box(yy, xx, 0.38 * h, h, 0, w, min(0.25 * 0.62 * h, 0.15 * w))
    cabin = _rounded_box(yy, xx, 0, 0.5 * h, 0.14 * w, 0.86 * w, 0.3 * 0.5 * h)
    return body | cabin


def _car_pixels(w: int, h: int, body: np.ndarray) -> np.ndarray:
    yy, xx = _grid(h, w)
    shade = (1.12 - 0.3 * yy / h)[..., None]  # lit from above
    img = np.broadcast_to(body * shade, (h, w, 3)).copy()
    window = _rounded_box(yy, xx, 0.08 * h, 0.4 * h, 0.2 * w, 0.8 * w, 0.1 * h)
    img[window] = 0.4 * body + 0.6 * _GLASS
    wheels = _ellipse(yy, xx, 0.88 * h, 0.22 * w, 0.14 * h, 0.11 * w) | _ellipse(yy, xx, 0.88 * h, 0.78 * w, 0.14 * h, 0.11 * w)
    img[wheels] = (22, 22, 22)
    return img


def _person_mask(w: int, h: int) -> np.ndarray:
    yy, xx = _grid(h, w)
    head = _ellipse(yy, xx, 0.1 * h, 0.5 * w, 0.1 * h, max(0.3 * w, 0.6))
    torso = _rounded_box(yy, xx, 0.18 * h, 0.62 * h, 0, w, 0.25 * w)
    legs = _rounded_box(yy, xx, 0.6 * h, h, 0.08 * w, 0.46 * w, 0) | _rounded_box(yy, xx, 0.6 * h, h, 0.54 * w, 0.92 * w, 0)
    return head | torso | legs


def _person_pixels(w: int, h: int, skin, shirt, pants) -> np.ndarray:
    yy = _grid(h, w)[0]
    rows = np.empty((h, 1, 3), np.float32)
    rows[...] = pants
    rows[(yy[:, 0] < 0.61 * h)] = shirt
    rows[(yy[:, 0] < 0.2 * h)] = skin
    return np.broadcast_to(rows, (h, w, 3)).copy()


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Smooth noise, roughly N(0, 1) in value, varying over about ``cell`` pixels."""
    small = rng.standard_normal((max(2, height // cell + 2), max(2, width // cell + 2))).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((width, height), _BICUBIC), dtype=np.float32)


def _jitter(rng, colour, amount):
    return np.clip(colour + rng.uniform(-amount, amount, 3), 0, 255).astype(np.float32)


# ----------------------------------------------------------------------------- scene
def render_scene(height: int, width: int, seed: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw one street scene.

    Returns ``(label, inst, image)``: label (H, W) uint8 Cityscapes labelIds, inst (H, W)
    int32 instance ids (``class * 1000 + k`` on cars and persons, the class id elsewhere),
    image (H, W, 3) uint8 RGB. Deterministic in (height, width, seed); sizes from 32x64
    to 512x1024 are the intended range (at least 16x16 is required).
    """
    H, W = int(height), int(width)
    if H < 16 or W < 16:
        raise InvalidArgumentError(f"render_scene: size must be at least 16x16, got {H}x{W}")
    rng = np.random.default_rng(int(seed) % (1 << 64))

    label = np.full((H, W), SKY, np.uint8)
    albedo = np.empty((H, W, 3), np.float32)

    horizon = int(H * rng.uniform(0.38, 0.5))
    curb = min(H - 4, horizon + max(2, int(H * rng.uniform(0.07, 0.12))))

    # sky: vertical gradient, deep blue at the top to pale at the horizon
    top = _jitter(rng, np.array((60, 110, 190), np.float32), 20)
    low = _jitter(rng, np.array((175, 200, 230), np.float32), 15)
    t = np.clip(np.arange(H, dtype=np.float32) / max(horizon, 1), 0, 1)[:, None]
    albedo[:] = (top * (1 - t) + low * t)[:, None, :]

    # buildings along the horizon, with windows
    x = int(rng.integers(-W // 10, 1))
    while x < W:
        bw = max(4, int(W * rng.uniform(0.08, 0.25)))
        if rng.random() < 0.2:  # a gap showing sky
            x += bw // 2
            continue
        x0, x1 = max(x, 0), min(x + bw, W)
        y0 = max(0, horizon - max(3, int(H * rng.uniform(0.1, 0.42))))
        colour = _jitter(rng, _BUILDING_COLOURS[rng.integers(len(_BUILDING_COLOURS))], 15)
        label[y0:horizon, x0:x1] = BUILDING
        block = albedo[y0:horizon, x0:x1]
        block[:] = colour
        bh = horizon - y0
        px, py = max(3, bw // int(rng.integers(3, 7))), max(3, int(H * rng.uniform(0.03, 0.06)))
        if bh >= 2 * py and x1 - x0 >= px:
            yy = np.arange(y0, horizon)[:, None] - y0
            xx = np.arange(x0, x1)[None, :] - x
            win = ((xx % px) >= px // 3) & ((yy % py) >= py // 3) & (yy >= py // 2) & (yy < bh - py // 2)
            block[win] = 0.45 * colour + 0.55 * np.array((30, 35, 45), np.float32)
        x += bw

    # trees in front of the buildings
    for _ in range(int(rng.integers(1, 5))):
        r = max(2.0, H * rng.uniform(0.05, 0.12))
        cx, cy = rng.uniform(0, W), horizon - r * rng.uniform(0.4, 1.0)
        rx = r * rng.uniform(0.8, 1.5)
        y0, y1 = max(0, int(cy - r)), min(H, int(cy + r) + 1)
        x0, x1 = max(0, int(cx - rx)), min(W, int(cx + rx) + 1)
        yy, xx = np.arange(y0, y1)[:, None] + 0.5, np.arange(x0, x1)[None, :] + 0.5
        canopy = _ellipse(yy, xx, cy, cx, r, rx)
        green = _jitter(rng, np.array((70, 120, 40), np.float32), 20)
        label[y0:y1, x0:x1][canopy] = VEGETATION
        albedo[y0:y1, x0:x1][canopy] = green
        tw = max(1, int(r * 0.25))
        tx = int(cx) - tw // 2
        ty0, ty1 = max(0, int(cy)), min(H, horizon + max(1, (curb - horizon) // 2))
        tx0, tx1 = max(0, tx), min(W, tx + tw)
        if tx0 < tx1 and ty0 < ty1:
            label[ty0:ty1, tx0:tx1] = VEGETATION
            albedo[ty0:ty1, tx0:tx1] = (80, 60, 40)

    # sidewalk strip with tiles, maybe a strip of grass, then the road with lane marks
    label[horizon:curb] = SIDEWALK
    albedo[horizon:curb] = _jitter(rng, np.array((175, 165, 170), np.float32), 15)
    tile = max(2, (curb - horizon) // 2)
    albedo[horizon:curb:tile] *= 0.85
    albedo[horizon:curb, :: max(3, W // 40)] *= 0.85
    if rng.random() < 0.4:
        gx0 = int(rng.uniform(0, W * 0.7))
        gx1 = min(W, gx0 + int(W * rng.uniform(0.1, 0.3)))
        gy0 = horizon + (curb - horizon) // 2
        label[gy0:curb, gx0:gx1] = TERRAIN
        albedo[gy0:curb, gx0:gx1] = _jitter(rng, np.array((110, 160, 70), np.float32), 15)
    label[curb:] = ROAD
    albedo[curb:] = _jitter(rng, np.array((85, 85, 90), np.float32), 10)
    vx = W * rng.uniform(0.4, 0.6)
    d = np.arange(curb, H, dtype=np.float32)[:, None] + 0.5 - horizon
    xs = np.arange(W, dtype=np.float32)[None, :] + 0.5
    dash = (np.floor(np.log(d) * 6) % 2 == 0)
    for slope in (-0.35, 0.0, 0.35):
        if rng.random() < 0.6:
            c = slope * W / max(H - horizon, 1)
            half = np.maximum(0.5, 0.006 * W * d / max(H - horizon, 1))
            mark = (np.abs(xs - vx - c * d) < half) & dash
            albedo[curb:][mark] = (225, 225, 220)

    # poles, some carrying a traffic sign
    for _ in range(int(rng.integers(0, 4))):
        px = int(rng.integers(0, W))
        pw = max(1, int(W * 0.006))
        bottom = int(rng.integers(horizon + 1, curb + 1))
        ptop = max(0, bottom - max(4, int(H * rng.uniform(0.25, 0.45))))
        label[ptop:bottom, px:px + pw] = POLE
        albedo[ptop:bottom, px:px + pw] = _jitter(rng, np.array((130, 130, 135), np.float32), 15)
        if rng.random() < 0.5:
            s = max(2, int(H * 0.04))
            sx0, sy0 = max(0, px + pw // 2 - s // 2), ptop
            label[sy0:sy0 + s, sx0:sx0 + s] = SIGN
            sign = (210, 190, 40) if rng.random() < 0.5 else (40, 80, 180)
            albedo[sy0:sy0 + s, sx0:sx0 + s] = sign

    inst = label.astype(np.int32)

    # objects: sample sizes and depths, place them so that each keeps half its pixels
    n_cars, n_persons = int(rng.integers(2, 7)), int(rng.integers(1, 5))
    kinds = [CAR, CAR, PERSON] + list(rng.permutation([CAR] * (n_cars - 2) + [PERSON] * (n_persons - 1)))
    car_colours = rng.permutation(len(_CAR_COLOURS))
    placed: List[_Thing] = []
    for order, cls in enumerate(kinds):
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
        ok = False
        for _ in range(25):
            cand = _Thing(cls, int(rng.integers(0, W - w + 1)), bottom - h, w, h, mask, order)
            if _try_place(cand, placed):
                ok = True
                break
        if not ok and order < 2:
            # A scene must have two cars: the second one, at most 0.27 W wide, fits
            # beside the first (at most 0.45 W) at one end of the picture.
            if w > int(0.27 * W):
                scale = int(0.27 * W) / w
                w, h = max(4, int(0.27 * W)), max(3, int(h * scale))
                mask = _car_mask(w, h)
            for x0 in (0, W - w):
                cand = _Thing(cls, x0, bottom - h, w, h, mask, order)
                if _try_place(cand, placed):
                    ok = True
                    break
        if ok:
            placed.append(cand)

    # ids count each class's objects from 0 in placement order; paint far to near
    counters = {CAR: 0, PERSON: 0}
    for thing in placed:
        thing.ident = thing.cls * 1000 + counters[thing.cls]
        counters[thing.cls] += 1
    next_car_colour = 0
    for thing in sorted(placed, key=lambda t: t.depth):
        if thing.cls == CAR:
            colour = _jitter(rng, _CAR_COLOURS[car_colours[next_car_colour]], 12)
            next_car_colour += 1
            pixels = _car_pixels(thing.w, thing.h, colour)
        else:
            skin = _SKIN_COLOURS[rng.integers(len(_SKIN_COLOURS))]
            shirt = _jitter(rng, _SHIRT_COLOURS[rng.integers(len(_SHIRT_COLOURS))], 15)
            pants = _jitter(rng, _PANTS_COLOURS[rng.integers(len(_PANTS_COLOURS))], 10)
            pixels = _person_pixels(thing.w, thing.h, skin, shirt, pants)
        box = (slice(thing.y0, thing.y0 + thing.h), slice(thing.x0, thing.x0 + thing.w))
        label[box][thing.mask] = thing.cls
        inst[box][thing.mask] = thing.ident
        albedo[box][thing.mask] = pixels[thing.mask]

    # texture: smooth shading and pixel noise by class, clouds in the sky
    smooth = _smooth_noise(rng, H, W, max(4, H // 10))
    fine = rng.standard_normal((H, W), dtype=np.float32)
    sky = label == SKY
    clouds = np.clip(_smooth_noise(rng, H, W, max(4, H // 6)) - 0.4, 0, 1) * sky
    albedo += (50.0 * clouds)[..., None]
    albedo *= (1.0 + _SHADE_AMP[label] * smooth)[..., None]
    albedo += (_FINE_AMP[label] * fine)[..., None]
    image = np.clip(np.rint(albedo), 0, 255).astype(np.uint8)
    return label, inst, image


# ----------------------------------------------------------------------------- dataset
DEFAULT_SIZE = (128, 256)


def _scene_name(index: int) -> str:
    return f"scene_{index:05d}"


class SyntheticDataset(torch.utils.data.Dataset):
    """``length`` rendered scenes, as items in ``AlignedDataset``'s format.

    Scene ``i`` is ``render_scene(H, W, scene_seed(spec.seed, phase, i))`` with (H, W) =
    ``size`` (default (128, 256)) and phase = ``spec.phase``, so train and test scenes
    differ. The scene goes through the same transforms as files read by
    ``AlignedDataset`` with the same spec; crops and flips come from
    ``item_rng(spec.seed, epoch, i)`` (``set_epoch`` as in AlignedDataset), so
    ``AlignedDataset(spec)`` on ``make_synthetic(dir, seed=spec.seed, ...)`` yields the
    same items. What the spec says of the data holds: label_nc (0: the input is the
    colourised label map as an RGB image; otherwise it must be >= 35, the ids being
    Cityscapes labelIds), no_instance, read_images (photo read or zeros). There are no
    precomputed features: ``spec.load_features`` is refused.
    """

    def __init__(self, spec: DataSpec, length: int, size: Optional[Tuple[int, int]] = None):
        self.spec = spec
        self.length = int(length)
        if self.length < 0:
            raise InvalidArgumentError(f"SyntheticDataset: length must be >= 0, got {length}")
        self.seed = spec.seed
        self.phase = spec.phase
        self.size = tuple(int(s) for s in (DEFAULT_SIZE if size is None else size))
        if len(self.size) != 2 or min(self.size) < 16:
            raise InvalidArgumentError(f"SyntheticDataset: size must be (height, width), each at least 16, got {size}")
        self.label_nc = spec.label_nc
        if 0 < self.label_nc < 35:
            raise DatasetError(
                f"The synthetic dataset uses Cityscapes labelIds 0..34, so it needs --label_nc 35 (or 0), not {self.label_nc}."
            )
        if spec.load_features:
            raise DatasetError("The synthetic dataset has no precomputed feature maps; run without --load_features.")
        self.load_image = spec.read_images
        self.load_instance = not spec.no_instance
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and flips the items get."""
        self.epoch = int(epoch)

    def scene(self, index: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The untransformed arrays (label, inst, image) of scene ``index``."""
        return render_scene(self.size[0], self.size[1], scene_seed(self.seed, self.phase, index))

    def __getitem__(self, index: int):
        if index < 0:
            index += self.length
        if not 0 <= index < self.length:
            raise IndexError(f"SyntheticDataset index {index} out of range for {self.length} items")
        label, inst, image = self.scene(index)
        if self.label_nc == 0:
            label_img = Image.fromarray(colorize_labels(label, 35))
        else:
            label_img = Image.fromarray(label)
        inst_img = Image.fromarray(inst.astype(np.uint16)) if self.load_instance else None
        image_img = Image.fromarray(image) if self.load_image else None
        path = f"synthetic/{self.phase}_label/{_scene_name(index)}_gtFine_labelIds.png"
        rng = item_rng(self.seed, self.epoch, index)
        return build_item(self.spec, label_img, inst_img, image_img, None, rng, path, self.label_nc,
                          Path(path).stem)


_WRITTEN = re.compile(r"scene_\d{5}_(gtFine_labelIds|gtFine_instanceIds|leftImg8bit)\.png")


def make_synthetic(
    out_dir,
    num_train: int = 64,
    num_test: int = 16,
    height: int = 128,
    width: int = 256,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Write a Cityscapes-style folder of rendered scenes and return its Path.

    Writes ``{train,test}_label/scene_XXXXX_gtFine_labelIds.png`` (8-bit),
    ``{train,test}_inst/scene_XXXXX_gtFine_instanceIds.png`` (16-bit) and
    ``{train,test}_img/scene_XXXXX_leftImg8bit.png`` (RGB); scene i of a phase is the
    one ``SyntheticDataset(spec, n, size=(height, width))`` renders for a spec with this seed. An existing
    non-empty ``out_dir`` is refused unless ``overwrite=True``; then only files this
    function writes (``scene_XXXXX_*.png`` in those six folders) are replaced or removed,
    nothing else is touched.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DatasetError(f"Cannot write the synthetic dataset to {out}: it exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DatasetError(f"Folder {out} is not empty; choose an empty folder or pass overwrite=True.")
    if min(int(height), int(width)) < 16:
        raise InvalidArgumentError(f"make_synthetic: height and width must be at least 16, got {height}x{width}")
    for phase, count in (("train", int(num_train)), ("test", int(num_test))):
        folders = {kind: out / f"{phase}_{kind}" for kind in ("label", "inst", "img")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
            for old in folder.iterdir():  # stale scenes of an earlier call, only ours
                if old.is_file() and _WRITTEN.fullmatch(old.name):
                    old.unlink()
        for i in range(count):
            label, inst, image = render_scene(height, width, scene_seed(seed, phase, i))
            name = _scene_name(i)
            Image.fromarray(label).save(folders["label"] / f"{name}_gtFine_labelIds.png", compress_level=1)
            Image.fromarray(inst.astype(np.uint16)).save(folders["inst"] / f"{name}_gtFine_instanceIds.png", compress_level=1)
            Image.fromarray(image).save(folders["img"] / f"{name}_leftImg8bit.png", compress_level=1)
    return out


def cityscapes_like_instances(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(n, 1, h, w) int32 instance maps with Cityscapes statistics, for tests and benchmarks.

    Sky and road bands, building and vegetation blocks along the horizon and a
    sidewalk (stuff ids 7..23), and 20-40 cars and people with class*1000+k ids
    (26000+k, 24000+k), some overlapping, some one pixel wide: 25-45 segments per
    map, large uniform regions, sparse ids. Only the instance map (no photo).
    """
    rng = np.random.default_rng(seed)
    maps = np.empty((n, h, w), dtype=np.int32)
    for b in range(n):
        m = maps[b]
        horizon = int(h * rng.uniform(0.35, 0.55))
        m[:horizon] = 23  # sky
        m[horizon:] = 7  # road
        x = 0
        while x < w:  # buildings and trees along the horizon
            width = int(rng.integers(max(1, w // 16), max(2, w // 4)))
            top = int(horizon * rng.uniform(0.1, 0.7))
            m[top:horizon + h // 20, x:x + width] = rng.choice([11, 21])
            x += width
        m[int(h * 0.9):, : w // 3] = 8  # sidewalk
        for k in range(int(rng.integers(20, 41))):
            cls = int(rng.choice([24, 26]))
            ch = int(rng.integers(1, max(2, h // 6)))
            cw = int(rng.integers(1, max(2, w // 8)))
            y0 = int(rng.integers(horizon - ch // 2, max(horizon - ch // 2 + 1, h - ch)))
            x0 = int(rng.integers(0, max(1, w - cw)))
            m[max(y0, 0):y0 + ch, x0:x0 + cw] = cls * 1000 + k
    return torch.from_numpy(maps).unsqueeze(1)

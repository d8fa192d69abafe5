"""One synthetic street scene (``render_scene``): a Cityscapes-like label map, instance
map and photo drawn with numpy.

A scene has sky at the top, buildings and trees along the horizon, a sidewalk strip
below it, road at the bottom, maybe poles with traffic signs, and several objects: 2-6
cars and 1-4 persons, which may overlap (every one keeps at least half of its pixels
visible; they are drawn by ``data.scene_objects``). Ids follow Cityscapes: label maps
hold labelIds, instance maps hold ``class * 1000 + k`` on object pixels (k counts the
objects of one class from 0) and the class id on all other pixels. In the photo every
class has a textured base colour and every object has colours of its own (each car of
a scene a different body colour), so an instance-wise feature encoder has something to
learn.

Everything is a pure function of (height, width, seed): the steps below draw from one
generator in a fixed order, so they must keep that order.
"""
from __future__ import annotations

import hashlib
from typing import Tuple

import numpy as np
from PIL import Image

from ..errors import InvalidArgumentError
from .scene_objects import CAR, PERSON, ellipse, jitter, paint_objects, place_objects
from .transforms import _BICUBIC

__all__ = ["render_scene", "scene_seed"]

# labelIds used here (PERSON and CAR: the objects of scene_objects)
SKY, ROAD, SIDEWALK, BUILDING, VEGETATION, TERRAIN, POLE, SIGN = 23, 7, 8, 11, 21, 22, 17, 20

# Per class: amplitude of pixel noise (grey levels) and of smooth multiplicative shading.
_FINE_AMP = np.zeros(256, np.float32)
_SHADE_AMP = np.zeros(256, np.float32)
for _cls, _fine, _shade in [
    (SKY, 1.5, 0.03), (ROAD, 7.0, 0.10), (SIDEWALK, 5.0, 0.08), (BUILDING, 5.0, 0.10),
    (VEGETATION, 20.0, 0.20), (TERRAIN, 14.0, 0.15), (POLE, 3.0, 0.05), (SIGN, 2.0, 0.03),
    (PERSON, 4.0, 0.05), (CAR, 3.0, 0.04),
]:
    _FINE_AMP[_cls], _SHADE_AMP[_cls] = _fine, _shade

_BUILDING_COLOURS = np.array([
    (120, 115, 110), (150, 135, 115), (140, 80, 60), (95, 95, 105), (170, 160, 140), (110, 120, 130),
], np.float32)


def scene_seed(seed: int, phase: str, index: int) -> int:
    """The ``render_scene`` seed of scene ``index`` of ``phase`` for a dataset seed (a
    64-bit hash, so train and test scenes differ and nearby seeds are unrelated)."""
    digest = hashlib.sha256(f"fastp2phd-synthetic:{int(seed)}:{phase}:{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


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

    _draw_sky(rng, albedo, horizon)
    _draw_buildings(rng, label, albedo, horizon)
    _draw_trees(rng, label, albedo, horizon, curb)
    _draw_ground(rng, label, albedo, horizon, curb)
    _draw_poles(rng, label, albedo, horizon, curb)
    inst = label.astype(np.int32)
    paint_objects(rng, place_objects(rng, H, W, horizon, curb), label, inst, albedo)
    _add_texture(rng, label, albedo)
    image = np.clip(np.rint(albedo), 0, 255).astype(np.uint8)
    return label, inst, image


# ----------------------------------------------------------------------------- steps
# Each draws into label (H, W) and albedo (H, W, 3) in place.
def _draw_sky(rng, albedo, horizon):
    """A vertical gradient, deep blue at the top to pale at the horizon (and below it,
    where everything else is drawn over it)."""
    H = albedo.shape[0]
    top = jitter(rng, np.array((60, 110, 190), np.float32), 20)
    low = jitter(rng, np.array((175, 200, 230), np.float32), 15)
    t = np.clip(np.arange(H, dtype=np.float32) / max(horizon, 1), 0, 1)[:, None]
    albedo[:] = (top * (1 - t) + low * t)[:, None, :]


def _draw_buildings(rng, label, albedo, horizon):
    """Buildings along the horizon, with windows, and gaps showing sky."""
    H, W = label.shape
    x = int(rng.integers(-W // 10, 1))
    while x < W:
        bw = max(4, int(W * rng.uniform(0.08, 0.25)))
        if rng.random() < 0.2:  # a gap showing sky
            x += bw // 2
            continue
        x0, x1 = max(x, 0), min(x + bw, W)
        y0 = max(0, horizon - max(3, int(H * rng.uniform(0.1, 0.42))))
        colour = jitter(rng, _BUILDING_COLOURS[rng.integers(len(_BUILDING_COLOURS))], 15)
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


def _draw_trees(rng, label, albedo, horizon, curb):
    """1-4 trees in front of the buildings: a canopy and a trunk down into the sidewalk."""
    H, W = label.shape
    for _ in range(int(rng.integers(1, 5))):
        r = max(2.0, H * rng.uniform(0.05, 0.12))
        cx, cy = rng.uniform(0, W), horizon - r * rng.uniform(0.4, 1.0)
        rx = r * rng.uniform(0.8, 1.5)
        y0, y1 = max(0, int(cy - r)), min(H, int(cy + r) + 1)
        x0, x1 = max(0, int(cx - rx)), min(W, int(cx + rx) + 1)
        yy, xx = np.arange(y0, y1)[:, None] + 0.5, np.arange(x0, x1)[None, :] + 0.5
        canopy = ellipse(yy, xx, cy, cx, r, rx)
        green = jitter(rng, np.array((70, 120, 40), np.float32), 20)
        label[y0:y1, x0:x1][canopy] = VEGETATION
        albedo[y0:y1, x0:x1][canopy] = green
        tw = max(1, int(r * 0.25))
        tx = int(cx) - tw // 2
        ty0, ty1 = max(0, int(cy)), min(H, horizon + max(1, (curb - horizon) // 2))
        tx0, tx1 = max(0, tx), min(W, tx + tw)
        if tx0 < tx1 and ty0 < ty1:
            label[ty0:ty1, tx0:tx1] = VEGETATION
            albedo[ty0:ty1, tx0:tx1] = (80, 60, 40)


def _draw_ground(rng, label, albedo, horizon, curb):
    """A sidewalk strip with tiles, maybe a strip of grass, then the road with lane marks."""
    H, W = label.shape
    label[horizon:curb] = SIDEWALK
    albedo[horizon:curb] = jitter(rng, np.array((175, 165, 170), np.float32), 15)
    tile = max(2, (curb - horizon) // 2)
    albedo[horizon:curb:tile] *= 0.85
    albedo[horizon:curb, :: max(3, W // 40)] *= 0.85
    if rng.random() < 0.4:
        gx0 = int(rng.uniform(0, W * 0.7))
        gx1 = min(W, gx0 + int(W * rng.uniform(0.1, 0.3)))
        gy0 = horizon + (curb - horizon) // 2
        label[gy0:curb, gx0:gx1] = TERRAIN
        albedo[gy0:curb, gx0:gx1] = jitter(rng, np.array((110, 160, 70), np.float32), 15)
    label[curb:] = ROAD
    albedo[curb:] = jitter(rng, np.array((85, 85, 90), np.float32), 10)
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


def _draw_poles(rng, label, albedo, horizon, curb):
    """0-3 poles standing on the sidewalk, some carrying a traffic sign."""
    H, W = label.shape
    for _ in range(int(rng.integers(0, 4))):
        px = int(rng.integers(0, W))
        pw = max(1, int(W * 0.006))
        bottom = int(rng.integers(horizon + 1, curb + 1))
        ptop = max(0, bottom - max(4, int(H * rng.uniform(0.25, 0.45))))
        label[ptop:bottom, px:px + pw] = POLE
        albedo[ptop:bottom, px:px + pw] = jitter(rng, np.array((130, 130, 135), np.float32), 15)
        if rng.random() < 0.5:
            s = max(2, int(H * 0.04))
            sx0, sy0 = max(0, px + pw // 2 - s // 2), ptop
            label[sy0:sy0 + s, sx0:sx0 + s] = SIGN
            sign = (210, 190, 40) if rng.random() < 0.5 else (40, 80, 180)
            albedo[sy0:sy0 + s, sx0:sx0 + s] = sign


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: int) -> np.ndarray:
    """Smooth noise, roughly N(0, 1) in value, varying over about ``cell`` pixels."""
    small = rng.standard_normal((max(2, height // cell + 2), max(2, width // cell + 2))).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((width, height), _BICUBIC), dtype=np.float32)


def _add_texture(rng, label, albedo):
    """Smooth shading and pixel noise by class, clouds in the sky."""
    H, W = label.shape
    smooth = _smooth_noise(rng, H, W, max(4, H // 10))
    fine = rng.standard_normal((H, W), dtype=np.float32)
    sky = label == SKY
    clouds = np.clip(_smooth_noise(rng, H, W, max(4, H // 6)) - 0.4, 0, 1) * sky
    albedo += (50.0 * clouds)[..., None]
    albedo *= (1.0 + _SHADE_AMP[label] * smooth)[..., None]
    albedo += (_FINE_AMP[label] * fine)[..., None]

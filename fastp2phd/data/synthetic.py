"""An embedded synthetic street-scene dataset (no download): the dataset of rendered scenes
(``SyntheticDataset``), the writer of a Cityscapes-style folder of them (``make_synthetic``),
and instance maps alone for tests and benchmarks (``cityscapes_like_instances``).

A scene is drawn by ``data.scene.render_scene`` (re-exported here with ``scene_seed``):
Cityscapes-like label map, instance map and photo, a pure function of (height, width, seed).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidArgumentError
from ..specs import DataSpec
from .folder import DatasetError, build_item, item_rng
from .labels import colorize_labels
from .scene import render_scene, scene_seed

__all__ = ["SyntheticDataset", "make_synthetic", "render_scene", "scene_seed"]


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
        raise DatasetError(f"Folder {out} is not empty; choose an empty folder (or, from Python, pass overwrite=True).")
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

"""pix2pixHD's resize / crop / flip of label maps, instance maps and photos.

What they read from the ``DataSpec``: ``resize_or_crop`` (``'resize_and_crop'``, ``'crop'``,
``'scale_width'``, ``'scale_width_and_crop'`` or ``'none'``), ``loadSize``, ``fineSize``,
``train`` and ``no_flip`` (flips), and ``size_base`` (what ``'none'`` rounds sizes to).

All maps of one sample share one :func:`get_params` draw, so they are cropped and
flipped identically. Label and instance maps are resampled NEAREST (ids stay ids),
photos BICUBIC.
"""
from __future__ import annotations

import random
from typing import Dict, Tuple

import numpy as np
import torch
from PIL import Image

from ..errors import InvalidArgumentError
from ..specs import RESIZE_OR_CROP_CHOICES, DataSpec

__all__ = [
    "RESIZE_OR_CROP_MODES",
    "get_params",
    "processed_size",
    "to_image_tensor",
    "to_instance_tensor",
    "to_label_tensor",
    "transform",
]

RESIZE_OR_CROP_MODES = RESIZE_OR_CROP_CHOICES

# Pillow >= 9.1 has Image.Resampling / Image.Transpose; older ones only the module constants.
_NEAREST = getattr(getattr(Image, "Resampling", Image), "NEAREST")
_BICUBIC = getattr(getattr(Image, "Resampling", Image), "BICUBIC")
_FLIP_LEFT_RIGHT = getattr(getattr(Image, "Transpose", Image), "FLIP_LEFT_RIGHT")


def get_params(spec: DataSpec, size: Tuple[int, int], rng: random.Random) -> Dict[str, object]:
    """Draw one sample's crop position and flip: ``{'crop_pos': (x, y), 'flip': bool}``.

    ``size`` is the PIL size (w, h) of the loaded image. Draws x, then y, then the flip
    from ``rng`` (in pix2pixHD's order), whatever the mode, so every sample uses exactly
    three draws.
    """
    mode = spec.resize_or_crop
    w, h = size
    new_w, new_h = w, h
    if mode == "resize_and_crop":
        new_w = new_h = spec.loadSize
    elif mode == "scale_width_and_crop":
        new_w = spec.loadSize
        new_h = spec.loadSize * h // w
    x = rng.randint(0, max(0, new_w - spec.fineSize))
    y = rng.randint(0, max(0, new_h - spec.fineSize))
    flip = rng.random() > 0.5
    return {"crop_pos": (x, y), "flip": flip}


def processed_size(spec: DataSpec, size: Tuple[int, int]) -> Tuple[int, int]:
    """The (w, h) :func:`transform` makes of an image of PIL size ``size``, known before it is decoded."""
    mode = spec.resize_or_crop
    w, h = size
    if "resize" in mode:
        w = h = spec.loadSize
    elif "scale_width" in mode and w != spec.loadSize:
        w, h = spec.loadSize, int(spec.loadSize * h / w)
    if "crop" in mode and (w > spec.fineSize or h > spec.fineSize):
        w = h = spec.fineSize
    if mode == "none":
        base = spec.size_base
        w, h = max(base, int(round(w / base) * base)), max(base, int(round(h / base) * base))
    return w, h


def transform(img: Image.Image, spec: DataSpec, params: Dict[str, object], nearest: bool) -> Image.Image:
    """Resize / crop / flip ``img`` as pix2pixHD does, in this order:

    1. 'resize' in resize_or_crop: resize to (loadSize, loadSize);
       elif 'scale_width' in it: resize to width loadSize, height int(loadSize * h / w)
       (unless the width already is loadSize);
    2. 'crop' in resize_or_crop: cut a fineSize x fineSize square at ``params['crop_pos']``
       when the image is larger than fineSize in either dimension (parts beyond the image
       are zero, as PIL pads crops);
    3. resize_or_crop == 'none': round width and height to the nearest multiple of
       ``spec.size_base`` (Python's round: halves go to even; never below one base);
    4. mirror left-right when ``spec.train`` and not ``spec.no_flip`` and ``params['flip']``.

    ``nearest``: NEAREST resampling (label and instance maps), else BICUBIC (photos).
    """
    mode = spec.resize_or_crop
    method = _NEAREST if nearest else _BICUBIC
    if "resize" in mode:
        size = (spec.loadSize, spec.loadSize)
        if img.size != size:
            img = img.resize(size, method)
    elif "scale_width" in mode:
        w, h = img.size
        if w != spec.loadSize:
            img = img.resize((spec.loadSize, int(spec.loadSize * h / w)), method)
    if "crop" in mode:
        w, h = img.size
        size = spec.fineSize
        if w > size or h > size:
            x, y = params["crop_pos"]
            img = img.crop((x, y, x + size, y + size))
    if mode == "none":
        base = spec.size_base
        w, h = img.size
        new_w = max(base, int(round(w / base) * base))
        new_h = max(base, int(round(h / base) * base))
        if (new_w, new_h) != (w, h):
            img = img.resize((new_w, new_h), method)
    if spec.train and not spec.no_flip and params["flip"]:
        img = img.transpose(_FLIP_LEFT_RIGHT)
    return img


# Modes whose pixels are single integer ids.
_ID_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")


def _id_array(img: Image.Image, what: str) -> np.ndarray:
    if img.mode not in _ID_MODES:
        raise InvalidArgumentError(f"{what} must be a single-channel id image (PIL mode L, P, I or I;16), got mode {img.mode}")
    return np.array(img)


def to_label_tensor(img: Image.Image) -> torch.Tensor:
    """Label ids of a single-channel image ('L', 'P', 'I', 'I;16') as a LongTensor (1, H, W)."""
    ids = _id_array(img, "a label map")
    return torch.from_numpy(ids.astype(np.int64, copy=False)).unsqueeze(0)


def to_instance_tensor(img: Image.Image) -> torch.Tensor:
    """Instance ids as an int32 IntTensor (1, H, W); 16-bit ids (Cityscapes' up to 33xxx,
    or anything up to 65535) are kept exactly."""
    ids = _id_array(img, "an instance map")
    return torch.from_numpy(ids.astype(np.int32, copy=False)).unsqueeze(0)


def to_image_tensor(img: Image.Image) -> torch.Tensor:
    """An RGB photo as a FloatTensor (3, H, W) in [-1, 1]: ``(x / 255 - 0.5) / 0.5``
    (other modes are converted to RGB first)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    pixels = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    out = torch.empty(pixels.shape, dtype=torch.float32)
    out.copy_(pixels)
    return out.div_(255.0).sub_(0.5).div_(0.5)

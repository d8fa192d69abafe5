"""Which part of an edited scene's image to regenerate: with a local generator, only what the edits can reach."""
from __future__ import annotations

import torch

from .styles import grow_box

__all__ = ["regenerate", "regeneration_boxes"]


def regeneration_boxes(changed, radius: int | None, multiple: int, height: int, width: int):
    """(crop, paste) boxes (y0, y1, x0, x1) for regenerating the image after the generator's input changed in
    ``changed``, or (None, None) to regenerate it whole. A local generator (``models.generator.local_radius``:
    an eval-mode GlobalGenerator without instance norm, such as the demo model's) of radius r changes the image
    only within r of the change (paste), and those pixels see the input only within r of them (crop, its edges
    on multiples of the generator's downsampling ``multiple``, so its grid is the image's). A paint stroke on
    the demo model at 256x512 regenerates about a fifth of the image."""
    if radius is None:
        return None, None
    paste = grow_box(changed, radius, height, width)
    y0, y1, x0, x1 = grow_box(paste, radius, height, width)
    y0, x0 = y0 // multiple * multiple, x0 // multiple * multiple
    y1, x1 = min(height, -(-y1 // multiple) * multiple), min(width, -(-x1 // multiple) * multiple)
    if (y1 - y0) * (x1 - x0) > height * width // 2 or min(y1 - y0, x1 - x0) < 4 * multiple:
        return None, None  # (past half the image a crop saves little; G's deepest pads need a few pixels)
    return (y0, y1, x0, x1), paste


def regenerate(model, input: torch.Tensor, image: torch.Tensor | None, changed, radius: int | None):
    """(image, rewritten box): ``image`` (3, H, W) float32 made current after ``model``'s generator input (1, C, H, W)
    changed in ``changed``, in place on a crop (``regeneration_boxes``) or whole (a new tensor; also when
    ``image`` is None)."""
    height, width = input.shape[-2:]
    crop, paste = (None, None) if image is None else regeneration_boxes(
        changed, radius, model.spec.generator_size_multiple, height, width)
    with torch.inference_mode(), model.precision_scope(input.device):
        if crop is None:
            return model.netG(input)[0].float(), (0, height, 0, width)
        cy0, cy1, cx0, cx1 = crop
        part = model.netG(input[:, :, cy0:cy1, cx0:cx1])[0]
        py0, py1, px0, px1 = paste
        image[:, py0:py1, px0:px1] = part[:, py0 - cy0:py1 - cy0, px0 - cx0:px1 - cx0]
    return image, paste

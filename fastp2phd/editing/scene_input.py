"""The generator's input for an edited scene, rebuilt only where an edit changed the maps:
one-hot labels, the instance boundary map (``ops.boundary_map``) and the instance features,
channels in that order (the boundary map only without ``no_instance``, features only when
the model uses them)."""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from .. import ops
from ..errors import InvalidArgumentError

__all__ = ["checked_vectors", "encoder_image", "feature_channel", "new_input", "refresh_input"]


def feature_channel(spec) -> int:
    """The input's first feature channel (after the one-hot labels and the boundary map)."""
    return spec.label_nc + (0 if spec.no_instance else 1)


def new_input(spec, height: int, width: int, device) -> torch.Tensor:
    """A zero (1, C, height, width) input for ``spec``'s generator, to be filled by ``refresh_input``."""
    channels = feature_channel(spec) + (spec.feat_num if spec.uses_features else 0)
    return torch.zeros(1, channels, height, width, device=device)


def refresh_input(input: torch.Tensor, spec, box, label: torch.Tensor, inst: torch.Tensor,
                  feat: torch.Tensor | None) -> None:
    """Rebuild ``input`` (1, C, H, W) inside ``box`` (y0, y1, x0, x1) from the (H, W) ``label`` and
    ``inst`` maps and the (F, H, W) ``feat``: one-hot labels and features there, edges on the box
    grown by one pixel (a pixel's edge depends on its neighbours)."""
    y0, y1, x0, x1 = box
    height, width = label.shape
    nc = spec.label_nc
    region = input[0, :nc, y0:y1, x0:x1]
    region.zero_()
    region.scatter_(0, label[y0:y1, x0:x1][None], 1.0)
    channel = nc
    if not spec.no_instance:
        # Recompute the box grown by one pixel, from a window grown by two so the band's own
        # neighbours are present.
        gy0, gy1, gx0, gx1 = max(0, y0 - 1), min(height, y1 + 1), max(0, x0 - 1), min(width, x1 + 1)
        wy0, wy1, wx0, wx1 = max(0, y0 - 2), min(height, y1 + 2), max(0, x0 - 2), min(width, x1 + 2)
        edges = ops.boundary_map(inst[None, None, wy0:wy1, wx0:wx1])[0, 0]
        input[0, nc, gy0:gy1, gx0:gx1] = edges[gy0 - wy0:gy1 - wy0, gx0 - wx0:gx1 - wx0]
        # Window borders are not image borders: a pixel on the window's edge may have a
        # neighbour outside it. Those pixels lie outside the grown box, so they are never copied.
        channel += 1
    if feat is not None:
        input[0, channel:, y0:y1, x0:x1] = feat[:, y0:y1, x0:x1]


def checked_vectors(vectors: Mapping[int, Any], feat_num: int, device) -> dict[int, torch.Tensor]:
    """{instance id: feature vector} as {int: (feat_num,) float32 tensor on ``device``}, or a sentence saying what
    is wrong (the vectors a saved scene starts from)."""
    checked = {}
    for key, vector in vectors.items():
        vector = torch.as_tensor(np.asarray(vector, dtype=np.float32) if not isinstance(vector, torch.Tensor)
                                 else vector).to(device, torch.float32)
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)) or vector.shape != (feat_num,):
            raise InvalidArgumentError(f"feature vectors must map instance ids to ({feat_num},) vectors, "
                                       f"got {key!r}: {tuple(vector.shape)}")
        checked[int(key)] = vector
    return checked


def encoder_image(image, height: int, width: int, device) -> torch.Tensor:
    """The photo a session encodes its features from, as the (3, H, W) float32 in [-1, 1] the encoder takes: an
    (H, W, 3) uint8 picture (what ``EditSession.image`` returns, or a decoded file) is scaled as the data loader
    scales photos; a (3, H, W) floating-point tensor is taken as it is; anything else is refused in a sentence."""
    array = image if isinstance(image, torch.Tensor) else torch.as_tensor(np.asarray(image))
    if array.dtype == torch.uint8 and tuple(array.shape) == (height, width, 3):
        return (array.permute(2, 0, 1).to(device, torch.float32) / 255 - 0.5) / 0.5
    if array.is_floating_point() and tuple(array.shape) == (3, height, width):
        return array.to(device, torch.float32)
    raise InvalidArgumentError(f"the image to encode must be a ({height}, {width}, 3) uint8 picture or a (3, {height}, "
                               f"{width}) float tensor in [-1, 1], got {tuple(array.shape)} {array.dtype}")

"""An edited scene saved as a dataset that ``fastp2phd test --dataroot folder`` reads: label,
instance and image PNGs and, with instance features, each instance's feature vector."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..errors import InvalidArgumentError
from ..features import instance_vectors, write_instance_vectors

__all__ = ["check_scene_name", "save_scene"]


def check_scene_name(name: str) -> None:
    """A scene name is a plain file name, or plain names joined by '/' (as a dataset's are)."""
    parts = name.split("/")
    if not name or any(not p or p in (".", "..") or p.startswith(".") or Path(p).name != p for p in parts):
        raise InvalidArgumentError(f"a scene name must be a plain file name, or plain names joined by '/', got {name!r}")


def save_scene(folder: str | os.PathLike, name: str, phase: str, label: torch.Tensor, inst: torch.Tensor,
               feat: torch.Tensor | None, render: Callable[[], np.ndarray]) -> None:
    """Write ``<phase>_label/<name>.png`` (class ids), ``<phase>_inst/<name>.png`` (16-bit instance
    ids), ``<phase>_img/<name>.png`` (the image ``render()`` returns, called once the name and ids
    are checked) and, with ``feat``, ``<phase>_features/<name>.npz`` (each instance's feature
    vector), as one unit (``files.save_file_set``)."""
    from PIL import Image

    from ..files import save_file_set

    check_scene_name(name)
    inst_ids = inst.cpu().numpy()
    if inst_ids.min(initial=0) < 0 or inst_ids.max(initial=0) > 65535:
        raise InvalidArgumentError("instance ids outside 0..65535 do not fit a 16-bit instance PNG")
    label_ids = label.cpu().numpy()
    # 8-bit as the datasets' label maps, 16-bit where a class id needs it (ids 256 and up wrapped around: 290 -> 34)
    label_png = label_ids.astype(np.uint8 if label_ids.max(initial=0) < 256 else np.uint16)
    images = {f"{phase}_label": label_png,
              f"{phase}_inst": inst_ids.astype(np.uint16), f"{phase}_img": render()}
    with save_file_set(folder, f"save of scene {name}") as files:
        for subfolder, array in images.items():
            files.write(f"{subfolder}/{name}.png", lambda tmp, a=array: Image.fromarray(a).save(tmp, format="PNG"))
        if feat is not None:
            ids, vectors = instance_vectors(feat, inst)
            files.write(f"{phase}_features/{name}.npz", lambda tmp: write_instance_vectors(tmp, ids, vectors))

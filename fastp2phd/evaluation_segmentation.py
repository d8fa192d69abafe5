"""Segmentation scores for ``fastp2phd.evaluate``: the user's segmentation network, Cityscapes label ids to
the 19 train ids, and IoU / mIoU / pixel accuracy from a confusion matrix."""
from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import EvaluationError

# Cityscapes labelIds of the 19 train ids 0..18, in order; every other id is ignored.
TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
NUM_CLASSES = len(TRAIN_LABEL_IDS)
IGNORE_ID = 255


# ----------------------------------------------------------------------------- segmentation


def check_seg_model(path: str | os.PathLike) -> Path:
    if not Path(path).is_file():
        raise EvaluationError(f"--seg_model {path} does not exist; pass a TorchScript file of the segmentation "
                              "network")
    return Path(path)


def load_segmenter(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A segmentation network saved with its code: TorchScript (``torch.jit.script/trace(model).save``)
    or a torch.export program (``.pt2``). A state_dict has no architecture to run, so it is refused."""
    path = check_seg_model(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates TorchScript
        if path.suffix == ".pt2":
            try:
                return torch.export.load(str(path)).module().to(device)
            except Exception as exc:
                raise EvaluationError(f"--seg_model {path} is not a torch.export program ({type(exc).__name__}: "
                                      f"{str(exc)[:120]}); save one with torch.export.save(torch.export.export("
                                      "model, (example,)), path)") from None
        try:
            return torch.jit.load(str(path), map_location=device).eval()
        except Exception:
            pass
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        content = None
    script = ("save the network with its code: torch.jit.trace(model.eval(), torch.zeros(1, 3, H, W)).save(path) "
              "(or torch.jit.script(model).save(path)) and pass that file")
    if isinstance(content, dict):
        raise EvaluationError(f"--seg_model {path} is a state_dict (weights without the network's code), which "
                              f"cannot be run; {script}")
    raise EvaluationError(f"--seg_model {path} is neither a TorchScript module nor a torch.export .pt2 program; "
                          f"{script}")


def label_ids_to_train_ids(ids: np.ndarray) -> np.ndarray:
    """Cityscapes labelIds -> train ids 0..18 (uint8); every other id (and anything out of range) -> 255."""
    lut = np.full(65536, IGNORE_ID, np.uint8)
    lut[list(TRAIN_LABEL_IDS)] = np.arange(NUM_CLASSES, dtype=np.uint8)
    ids = np.asarray(ids)
    return lut[np.clip(ids, 0, 65535).astype(np.int64)] if ids.size else ids.astype(np.uint8)


def confusion_matrix(truth: np.ndarray, prediction: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """(num_classes, num_classes) int64 counts, rows the true class, columns the predicted one; pixels
    whose truth is 255 are left out."""
    truth, prediction = np.asarray(truth).ravel(), np.asarray(prediction).ravel()
    keep = truth != IGNORE_ID
    truth, prediction = truth[keep].astype(np.int64), prediction[keep].astype(np.int64)
    for name, ids in (("truth", truth), ("prediction", prediction)):  # one out of range would count in another cell
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            raise EvaluationError(f"confusion_matrix: {name} holds class {ids.min() if ids.min() < 0 else ids.max()}, "
                                  f"outside 0..{num_classes - 1} (and {IGNORE_ID} for ignored truth)")
    index = truth * num_classes + prediction
    return np.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: np.ndarray) -> dict[str, Any]:
    """Per-class IoU (NaN where a class has no union), mIoU (mean ignoring NaN) and pixel accuracy."""
    confusion = np.asarray(confusion, np.float64)
    hits = np.diag(confusion)
    union = confusion.sum(0) + confusion.sum(1) - hits
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, hits / union, np.nan)
    total = confusion.sum()
    return {"iou": iou, "miou": float(np.nanmean(iou)) if np.isfinite(iou).any() else math.nan,
            "pixel_accuracy": float(hits.sum() / total) if total > 0 else math.nan}


def as_logits(out, path, size) -> torch.Tensor:
    if isinstance(out, dict):  # torchvision's segmentation models
        out = out.get("out", next(iter(out.values()), None))
    if isinstance(out, (tuple, list)) and out:  # DRNSeg returns (log-probabilities, features)
        out = out[0]
    if not isinstance(out, torch.Tensor) or out.dim() != 4 or out.shape[0] != 1:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise EvaluationError(f"the segmentation model {path} returned {shape}; it must return logits of shape "
                              f"(N, {NUM_CLASSES}, h, w) for an (N, 3, H, W) image")
    if out.shape[1] != NUM_CLASSES:
        raise EvaluationError(f"the segmentation model {path} returns {out.shape[1]} classes, but the scores are over "
                              f"the {NUM_CLASSES} Cityscapes train ids; pass a network trained on them "
                              f"(output (N, {NUM_CLASSES}, h, w))")
    if tuple(out.shape[-2:]) != tuple(size):
        out = F.interpolate(out.float(), size=size, mode="bilinear", align_corners=False)
    return out

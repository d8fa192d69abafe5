"""Scoring generated images against the real ones: FID and KID, and segmentation scores (mIoU, pixel accuracy).

The protocol (written into every report):

* Pairs: ``<results>/images/<stem>_synthesized_image.png`` (what ``fastp2phd test`` writes) for each label map
  ``<dataroot>/<phase>_label/**/<stem>.png``; the real photo is the file of ``<phase>_img`` at the same
  sorted position (the dataset's pairing). Generated images may differ in size from one another.
* FID and KID on pool3 features (2048-d) of the FID Inception v3 (pytorch-fid's network: TensorFlow's
  ``inception-2015-12-05`` with its weights ``pt_inception-2015-12-05-6726825d.pth``). Real photos are
  first resized to their generated image's size (PIL bicubic); then every image, RGB in [0, 1], is resized
  to 299x299 (bilinear, align_corners=False) and scaled to [-1, 1], as pytorch-fid does. KID is the unbiased
  MMD^2 with the kernel (x.y/2048 + 1)^3, averaged over random subsets.
* Segmentation: a user's network (TorchScript, or a torch.export ``.pt2``) sees each generated image at
  the generated resolution, RGB in [0, 1] normalised with ``seg_mean``/``seg_std`` (ImageNet's by
  default), and returns logits (1, 19, h, w), upsampled bilinearly to the image size where they differ.
  The ground truth is the Cityscapes label-id map resized to the generated size by nearest neighbour and
  mapped to the 19 train ids; every other id is ignored (255). IoU per class over all images (NaN where a
  class is neither in the truth nor predicted), mIoU = their mean ignoring NaN, pixel accuracy over the
  pixels not ignored.

The FID Inception is rebuilt here (the same modules and state_dict keys as pytorch-fid's ``FIDInception*``
blocks on torchvision's ``Inception3``), so it needs neither torchvision nor pytorch-fid: on Linux, PyPI
has only CUDA builds of torchvision, which do not import next to a CPU-only torch. Its weights are
never downloaded here; see :func:`find_fid_weights`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from .errors import InvalidArgumentError, Pix2PixHDError
from .specs import IMAGENET_MEAN, IMAGENET_STD, EvaluationSpec  # noqa: F401  (re-exported)

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_SIZE = 299
FID_DIMS = 2048
# Cityscapes labelIds of the 19 train ids 0..18, in order; every other id is ignored.
TRAIN_LABEL_IDS = (7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33)
NUM_CLASSES = len(TRAIN_LABEL_IDS)
IGNORE_ID = 255
SYNTHESIZED_SUFFIX = "_synthesized_image"


def _train_id_names() -> tuple[str, ...]:
    from .data import CITYSCAPES_CLASSES

    return tuple(CITYSCAPES_CLASSES[i][0] for i in TRAIN_LABEL_IDS)


class EvaluationError(Pix2PixHDError, ValueError):
    """Evaluation cannot run (missing or unpaired files, missing weights, a wrong segmentation model)."""


# ----------------------------------------------------------------------------- statistics


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as pytorch-fid's ``np.cov``) of (N, D) features, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise EvaluationError(f"FID needs at least 2 images' features (an (N, D) array), got shape {f.shape}; "
                              "evaluate more images")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), in float64.

    tr sqrt(S1 S2) is the sum of the square roots of the eigenvalues of sqrt(S1) S2 sqrt(S1), which is
    symmetric positive semi-definite (and has the eigenvalues of S1 S2), so two symmetric eigendecompositions
    do it without the complex detours of a general matrix square root; eigenvalues at rounding level
    (or slightly negative) are taken as 0 (covariances of fewer samples than dimensions are singular).
    """
    mu1, mu2 = np.asarray(mu1, np.float64).ravel(), np.asarray(mu2, np.float64).ravel()
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise InvalidArgumentError(f"frechet_distance: means of length D and (D, D) covariances expected, got {mu1.shape}, "
                         f"{s1.shape}, {mu2.shape}, {s2.shape}")
    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(_nonnegative(w))) @ v.T
    m = root1 @ s2 @ root1
    tr_covmean = np.sqrt(_nonnegative(np.linalg.eigvalsh((m + m.T) / 2))).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def _nonnegative(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues at rounding level (numpy's matrix_rank tolerance) set to 0: their square roots would
    otherwise add up to a visible error where covariances are singular (fewer images than dimensions)."""
    tol = np.abs(eigenvalues).max(initial=0) * len(eigenvalues) * np.finfo(np.float64).eps
    return np.where(eigenvalues > tol, eigenvalues, 0.0)


def fid_from_features(a, b) -> float:
    """The Fréchet distance between the Gaussians fitted to two (N, D) feature sets.

    With fewer images than dimensions (500 Cityscapes scenes, 2048 features) it never forms the D x D
    covariances: with A, B the centred features, S1 = A'A/(n1-1) and S2 = B'B/(n2-1), the nonzero
    eigenvalues of S1 S2 are those of (A B')(A B')' / ((n1-1)(n2-1)), so tr sqrt(S1 S2) is the sum of the
    singular values of the n1 x n2 matrix A B' over sqrt((n1-1)(n2-1)): exact, and seconds faster.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise InvalidArgumentError(f"fid_from_features: two (N, D) feature sets expected, got {a.shape} and {b.shape}")
    if max(len(a), len(b)) > a.shape[1]:
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    feature_statistics(a), feature_statistics(b)  # (the checks)
    ca, cb = a - a.mean(0), b - b.mean(0)
    na, nb = len(a) - 1, len(b) - 1
    tr_covmean = np.linalg.svd(ca @ cb.T, compute_uv=False).sum() / math.sqrt(na * nb)
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + (ca * ca).sum() / na + (cb * cb).sum() / nb - 2 * tr_covmean)


def kernel_inception_distance(a, b, subsets: int = 100, subset_size: int = 1000,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 between (N, D) feature sets with the kernel
    k(x, y) = (x.y / D + 1)^3, on ``subsets`` random subsets of min(subset_size, n_a, n_b) of each
    set (drawn without replacement within a subset); returns the mean and standard deviation over subsets.
    """
    x_all, y_all = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x_all.ndim != 2 or y_all.ndim != 2 or x_all.shape[1] != y_all.shape[1]:
        raise InvalidArgumentError(f"kernel_inception_distance: two (N, D) feature sets expected, got {x_all.shape} and "
                         f"{y_all.shape}")
    m = min(subset_size, len(x_all), len(y_all))
    if m < 2:
        raise EvaluationError(f"KID needs at least 2 images in each set, got {len(x_all)} and {len(y_all)}; "
                              "evaluate more images")
    d = x_all.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values.append(within - 2 * kxy.mean())
    return float(np.mean(values)), float(np.std(values))


# ----------------------------------------------------------------------------- the FID Inception network


class _Conv(nn.Module):
    """torchvision's BasicConv2d: conv without bias, batch norm (eps 0.001), ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x):
    # TensorFlow's average pool leaves the zero padding out of the mean (pytorch-fid's patch).
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):  # FIDInceptionA
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 64, 1)
        self.branch5x5_1 = _Conv(cin, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_tf_avg_pool(x))], 1)


class _ReductionB(nn.Module):  # InceptionB
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = _Conv(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(cin, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _MixedC(nn.Module):  # FIDInceptionC
    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = _Conv(cin, 192, 1)
        self.branch7x7_1 = _Conv(cin, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = _Conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _Conv(cin, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _Conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _Conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _Conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = self.branch7x7dbl_1(x)
        d = self.branch7x7dbl_5(self.branch7x7dbl_4(self.branch7x7dbl_3(self.branch7x7dbl_2(d))))
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(_tf_avg_pool(x))], 1)


class _ReductionD(nn.Module):  # InceptionD
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = _Conv(cin, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(cin, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _MixedE(nn.Module):  # FIDInceptionE_1 (average pool) and FIDInceptionE_2 (max pool)
    def __init__(self, cin: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(cin, 320, 1)
        self.branch3x3_1 = _Conv(cin, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(cin, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(cin, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # The FID network max-pools in its last block (pytorch-fid's FIDInceptionE_2).
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """The FID Inception v3 up to pool3, with pytorch-fid's state_dict keys (``fid_inception_v3()``:
    torchvision's ``Inception3(num_classes=1008, aux_logits=False)`` with the FID blocks), so
    ``pt_inception-2015-12-05-6726825d.pth`` loads strictly. ``forward`` takes RGB (N, 3, H, W) in
    [0, 1] and returns (N, 2048) pool3 features, resizing and scaling as pytorch-fid's
    ``InceptionV3(resize_input=True, normalize_input=True)``.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _MixedA(192, 32)
        self.Mixed_5c = _MixedA(256, 64)
        self.Mixed_5d = _MixedA(288, 64)
        self.Mixed_6a = _ReductionB(288)
        self.Mixed_6b = _MixedC(768, 128)
        self.Mixed_6c = _MixedC(768, 160)
        self.Mixed_6d = _MixedC(768, 160)
        self.Mixed_6e = _MixedC(768, 192)
        self.Mixed_7a = _ReductionD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # in the weights file; pool3 comes before it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)


def find_fid_weights(path: str | os.PathLike | None = None) -> Path:
    """The FID Inception weights file: ``path`` if given, else ``<torch.hub.get_dir()>/checkpoints/`` +
    FID_WEIGHTS_NAME (where pytorch-fid's own download puts it). Never downloads."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    if path is not None:
        if not Path(path).is_file():
            raise EvaluationError(f"--fid_weights {path} does not exist; download {FID_WEIGHTS_NAME} from "
                                  f"{FID_WEIGHTS_URL} and pass its path (or pass --no_fid)")
        return Path(path)
    if not (cache / FID_WEIGHTS_NAME).is_file():
        raise EvaluationError(f"FID needs the Inception weights {FID_WEIGHTS_NAME}, which are not in torch's hub "
                              f"cache: download them from {FID_WEIGHTS_URL} into {cache}/ or pass "
                              "--fid_weights PATH (or skip FID with --no_fid)")
    return cache / FID_WEIGHTS_NAME


def load_fid_inception(path: str | os.PathLike, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """The FID Inception with the weights of ``path`` (loaded strictly, ``weights_only``), in eval mode."""
    from .files import load_torch

    net = FIDInceptionV3()
    state = load_torch(path, what="FID Inception weights file")
    if not isinstance(state, dict):
        raise EvaluationError(f"{path} holds a {type(state).__name__}, not the FID Inception weights "
                              f"({FID_WEIGHTS_NAME} from {FID_WEIGHTS_URL})")
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else str(exc)
        raise EvaluationError(f"{path} is not the FID Inception weights file ({first[:200]}); use "
                              f"{FID_WEIGHTS_NAME} from {FID_WEIGHTS_URL}") from None
    return net.to(device).eval()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- segmentation


def _check_seg_model(path: str | os.PathLike) -> Path:
    if not Path(path).is_file():
        raise EvaluationError(f"--seg_model {path} does not exist; pass a TorchScript file of the segmentation "
                              "network")
    return Path(path)


def load_segmenter(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """A segmentation network saved with its code: TorchScript (``torch.jit.script/trace(model).save``)
    or a torch.export program (``.pt2``). A state_dict has no architecture to run, so it is refused."""
    path = _check_seg_model(path)
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
    index = truth[keep].astype(np.int64) * num_classes + prediction[keep].astype(np.int64)
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


def _as_logits(out, path, size) -> torch.Tensor:
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


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Pair:
    name: str
    generated: Path
    label: Path
    real: Path | None


def _image_folder(results: Path) -> Path:
    """``results`` or its images/ subfolder (a ``fastp2phd test`` web folder), whichever holds the images."""
    if (results / "images").is_dir() and any((results / "images").glob(f"*{SYNTHESIZED_SUFFIX}.png")):
        return results / "images"
    return results


def _check_folders(dataroot, phase: str, results: Path | None) -> None:
    """The folders evaluation reads exist (checked before anything slow or the FID weights)."""
    if str(dataroot) == "synthetic":
        raise EvaluationError("--dataroot synthetic has no real images on disk to compare with; write the scenes "
                              "with `fastp2phd make-synthetic --out DIR` and pass --dataroot DIR")
    if results is not None and not results.is_dir():
        raise EvaluationError(f"the results folder {results} does not exist; pass the folder `fastp2phd test` "
                              "wrote (results_dir/name/<phase>_<epoch>), or --name to generate the images first")
    label_dir = Path(dataroot) / f"{phase}_label"
    if not label_dir.is_dir():
        raise EvaluationError(f"the label maps folder {label_dir} does not exist; check --dataroot and --phase")


def pair_results(results: str | os.PathLike, dataroot: str | os.PathLike, phase: str = "test",
                 how_many: float = math.inf, need_real: bool = True) -> list[Pair]:
    """Generated image, label map and real photo of each of the first ``how_many`` scenes of ``dataroot``'s
    ``phase``; every mismatch between the folders is one sentence."""
    from .data.folder import list_images

    results, root = Path(results), Path(dataroot)
    _check_folders(dataroot, phase, results)
    folder = _image_folder(results)
    generated = {p.name[:-len(SYNTHESIZED_SUFFIX) - 4]: p for p in folder.glob(f"*{SYNTHESIZED_SUFFIX}.png")}
    if not generated:
        raise EvaluationError(f"{folder} holds no *{SYNTHESIZED_SUFFIX}.png images; pass the folder `fastp2phd "
                              "test` wrote (it holds images/<name>_synthesized_image.png)")
    label_dir, real_dir = root / f"{phase}_label", root / f"{phase}_img"
    labels = list_images(str(label_dir))
    if not labels:
        raise EvaluationError(f"the label maps folder {label_dir} holds no images; check --dataroot and --phase")
    reals: list[str | None] = [None] * len(labels)
    if need_real:
        if not real_dir.is_dir():
            raise EvaluationError(f"the real images folder {real_dir} does not exist, and FID compares with them; "
                                  "check --dataroot and --phase, or pass --no_fid")
        reals = list_images(str(real_dir))
        if len(reals) != len(labels):
            raise EvaluationError(f"{real_dir} holds {len(reals)} images but {label_dir} holds {len(labels)} label "
                                  "maps; each label map needs its real image (paired by sorted path)")
    stems = [Path(p).stem for p in labels]
    repeated = [s for s, c in Counter(stems).items() if c > 1]
    if repeated:
        raise EvaluationError(f"{label_dir} holds several label maps named {repeated[0]} (in different subfolders), "
                              "so their generated images overwrite one another; give them distinct names")
    unknown = sorted(set(generated) - set(stems))
    if unknown:
        raise EvaluationError(f"{generated[unknown[0]]} has no label map named {unknown[0]} in {label_dir} "
                              f"({len(unknown)} generated images have none); the results come from another dataset "
                              "or phase: check --results, --dataroot and --phase")
    count = len(labels) if math.isinf(how_many) else min(len(labels), int(how_many))
    missing = [s for s in stems[:count] if s not in generated]
    if missing:
        raise EvaluationError(f"{folder} holds {len(generated)} generated images but {label_dir} has {count} label "
                              f"maps to score (the first missing: {missing[0]}{SYNTHESIZED_SUFFIX}.png); generate "
                              f"them all (`fastp2phd test --how_many inf`) or score the first ones with --how_many N")
    return [Pair(stems[i], generated[stems[i]], Path(labels[i]), Path(reals[i]) if reals[i] else None)
            for i in range(count)]


def _read_rgb(path: Path) -> Image.Image:
    from .data.folder import open_image

    return open_image(str(path)).convert("RGB")


def _read_label(path: Path) -> np.ndarray:
    from .data.folder import _LABEL_MODES, open_image

    img = open_image(str(path))
    if img.mode not in _LABEL_MODES:
        raise EvaluationError(f"label map {path} has PIL mode {img.mode}, not one Cityscapes label id per pixel; "
                              "pass the *_labelIds.png maps (single channel)")
    return np.asarray(img)


def _resize_nearest(ids: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest neighbour at pixel centres (as PIL's NEAREST)."""
    h, w = ids.shape
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return ids[rows[:, None], cols[None, :]]


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1).unsqueeze(0)


# Aspect ratios of a generated image and its label map may differ this much (sizes rounded to what the
# generator takes); more means a crop, which cannot be paired pixel by pixel.
_ASPECT_TOLERANCE = 0.1


def _check_aspect(pair: Pair, generated: tuple[int, int], label: tuple[int, int]) -> None:
    (gw, gh), (lw, lh) = generated, label
    if abs((gw / gh) / (lw / lh) - 1) > _ASPECT_TOLERANCE:
        raise EvaluationError(f"{pair.generated} is {gw}x{gh} but its label map {pair.label} is {lw}x{lh}, another "
                              "aspect ratio: the image was cropped and cannot be compared pixel by pixel; generate "
                              "with --resize_or_crop scale_width or none")


# ----------------------------------------------------------------------------- the evaluation


def evaluate(pairs: Sequence[Pair], spec: EvaluationSpec, device: str | torch.device = "cpu",
             progress: bool = True) -> dict[str, Any]:
    """Score ``pairs``; returns the report (scores and protocol) that :func:`write_report` writes."""
    from ._version import __version__
    from .console import progress_bar

    device = torch.device(device)
    if not spec.fid and spec.seg_model is None:
        raise EvaluationError("nothing to compute: FID is off (--no_fid) and there is no --seg_model; drop "
                              "--no_fid or pass a segmentation network")
    # Fail on missing weights or a bad segmenter before reading any image.
    weights = find_fid_weights(spec.fid_weights) if spec.fid else None
    inception = load_fid_inception(weights, device) if weights else None
    segmenter = load_segmenter(spec.seg_model, device) if spec.seg_model is not None else None
    mean = torch.tensor(spec.seg_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.seg_std, device=device).view(1, 3, 1, 1)

    fake_feats, real_feats, batch_fake, batch_real = [], [], [], []
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    sizes: Counter = Counter()
    resized_real = 0

    def flush():
        if batch_fake:
            with torch.no_grad():
                fake_feats.append(inception(torch.cat(batch_fake).to(device)).double().cpu())
                real_feats.append(inception(torch.cat(batch_real).to(device)).double().cpu())
            batch_fake.clear()
            batch_real.clear()

    bar = progress_bar(len(pairs), "evaluate", progress)
    for pair in pairs:
        fake = _read_rgb(pair.generated)
        width, height = fake.size
        sizes[f"{width}x{height}"] += 1
        label = _read_label(pair.label)
        _check_aspect(pair, (width, height), (label.shape[1], label.shape[0]))
        fake_t = _to_tensor(fake)
        if inception is not None:
            real = _read_rgb(pair.real)
            if real.size != (label.shape[1], label.shape[0]):
                raise EvaluationError(f"real image {pair.real} is {real.size[0]}x{real.size[1]} but its label map "
                                      f"{pair.label} is {label.shape[1]}x{label.shape[0]}; they must match")
            if real.size != fake.size:
                real = real.resize(fake.size, Image.BICUBIC)
                resized_real += 1
            # Resized to 299x299 one by one, so images of different sizes share a batch.
            batch_fake.append(F.interpolate(fake_t, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False))
            batch_real.append(F.interpolate(_to_tensor(real), size=(FID_SIZE, FID_SIZE), mode="bilinear",
                                            align_corners=False))
            if len(batch_fake) == spec.batch_size:
                flush()
        if segmenter is not None:
            with torch.no_grad():
                logits = _as_logits(segmenter((fake_t.to(device) - mean) / std), spec.seg_model, (height, width))
            prediction = logits.argmax(1)[0].cpu().numpy()
            truth = label_ids_to_train_ids(_resize_nearest(label, height, width))
            confusion += confusion_matrix(truth, prediction)
        bar.update(1)
    flush()
    bar.close()

    report: dict[str, Any] = {"images": len(pairs), "fid": None, "kid": None, "segmentation": None}
    protocol: dict[str, Any] = {
        "images": len(pairs),
        "resolutions (width x height: images)": dict(sizes),
        "pairing": "generated <stem>_synthesized_image.png with the label map <phase>_label/**/<stem> and the real "
                   "image at the same sorted position in <phase>_img",
        "fastp2phd": __version__,
    }
    if inception is not None:
        fake_all, real_all = torch.cat(fake_feats).numpy(), torch.cat(real_feats).numpy()
        report["fid"] = fid_from_features(fake_all, real_all)
        kid_mean, kid_std = kernel_inception_distance(fake_all, real_all, spec.kid_subsets, spec.kid_subset_size,
                                                      spec.seed)
        subset = min(spec.kid_subset_size, len(pairs))
        report["kid"] = {"mean": kid_mean, "std": kid_std, "subsets": spec.kid_subsets, "subset_size": subset}
        protocol["fid"] = {
            "network": "FID Inception v3 (pytorch-fid's network, TensorFlow inception-2015-12-05), pool3 features, "
                       "2048-d",
            "weights": str(weights),
            "weights_sha256": _sha256(weights),
            "real images": f"resized to their generated image's size with PIL bicubic ({resized_real} of "
                           f"{len(pairs)} needed it)",
            "inception input": "RGB in [0, 1] resized to 299x299 (bilinear, align_corners=False), scaled to [-1, 1]",
            "kid": f"unbiased MMD^2, kernel (x.y/2048 + 1)^3, mean and std over {spec.kid_subsets} subsets of "
                   f"{subset} images",
        }
    if segmenter is not None:
        scores = segmentation_scores(confusion)
        report["segmentation"] = {
            "miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
            "per_class_iou": {name: float(v) for name, v in zip(_train_id_names(), scores["iou"])},
            "confusion (rows: truth, columns: prediction)": confusion.tolist(),
        }
        protocol["segmentation"] = {
            "model": str(spec.seg_model),
            "input": f"the generated image at the generated resolution, RGB/255 normalised with mean "
                     f"{list(spec.seg_mean)} and std {list(spec.seg_std)}",
            "output": f"logits (1, {NUM_CLASSES}, h, w), upsampled bilinearly to the image size where they differ; "
                      "argmax",
            "ground truth": "Cityscapes label ids resized to the generated resolution by nearest neighbour, mapped "
                            "to the 19 train ids; all other ids ignored (255)",
            "label id -> train id": {str(i): t for t, i in enumerate(TRAIN_LABEL_IDS)},
            "iou": "per class over all images' pixels; NaN (null) where a class is neither true nor predicted; "
                   "mIoU = mean over the others; pixel accuracy over the pixels not ignored",
        }
    report["protocol"] = protocol
    return report


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_report(report: dict[str, Any], title: str = "Evaluation") -> str:
    """The report as a small Markdown page: scores, per-class IoU, and the protocol."""
    lines = [f"# {title}", "", "| score | value |", "| --- | --- |"]
    if report["fid"] is not None:
        kid = report["kid"]
        lines += [f"| FID | {_number(report['fid'], 3)} |",
                  f"| KID | {kid['mean']:.4g} ± {kid['std']:.2g} |"]
    seg = report["segmentation"]
    if seg is not None:
        lines += [f"| mIoU | {_number(seg['miou'])} |", f"| pixel accuracy | {_number(seg['pixel_accuracy'])} |"]
    lines.append(f"| images | {report['images']} |")
    if seg is not None:
        lines += ["", "| train id | class | IoU |", "| ---: | --- | ---: |"]
        lines += [f"| {i} | {name} | {_number(v)} |" for i, (name, v) in enumerate(seg["per_class_iou"].items())]
    lines += ["", "## Protocol", ""]
    for key, value in report["protocol"].items():
        if isinstance(value, dict):
            lines.append(f"- {key}:")
            lines += [f"  - {k}: {json.dumps(v) if isinstance(v, dict) else v}" for k, v in value.items()]
        else:
            lines.append(f"- {key}: {json.dumps(value) if isinstance(value, dict) else value}")
    return "\n".join(lines) + "\n"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_report(report: dict[str, Any], out: str | os.PathLike, title: str = "Evaluation") -> tuple[Path, Path]:
    """``out/evaluation.json`` and ``out/evaluation.md``; returns their paths."""
    from .files import write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "evaluation.json", json.dumps(_json_safe(report), indent=2) + "\n")
    write_text(out / "evaluation.md", markdown_report(report, title))
    return out / "evaluation.json", out / "evaluation.md"


# ----------------------------------------------------------------------------- the command's steps


def check_evaluation(spec: EvaluationSpec, dataroot: str | os.PathLike, phase: str, results: Path | None) -> None:
    """Everything ``fastp2phd evaluate`` can check before generating or scoring, cheapest first: the folders
    (``results`` None: they are generated first), the segmenter, then the FID weights."""
    if not spec.fid and spec.seg_model is None:
        raise EvaluationError("nothing to compute: FID is off (--no_fid) and there is no --seg_model; drop "
                              "--no_fid or pass a segmentation network")
    _check_folders(dataroot, phase, results)
    if spec.seg_model is not None:
        _check_seg_model(spec.seg_model)
    if spec.fid:
        find_fid_weights(spec.fid_weights)


def evaluate_folder(results: Path, dataroot: str | os.PathLike, phase: str, spec: EvaluationSpec,
                    device: torch.device, *, how_many: float = math.inf, out: str | os.PathLike | None = None,
                    progress: bool = True) -> tuple[dict[str, Any], Path, Path]:
    """Score the images in ``results`` against ``dataroot``'s ``phase``; writes the report into ``out``
    (default ``results``) and returns (report, its JSON path, its Markdown path)."""
    pairs = pair_results(results, dataroot, phase, how_many, need_real=spec.fid)
    report = evaluate(pairs, spec, device, progress=progress)
    json_path, md_path = write_report(report, out or results, title=f"Evaluation of {results}")
    return report, json_path, md_path

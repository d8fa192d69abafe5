"""FID and KID for ``fastp2phd.evaluate``: the statistics, and the FID Inception v3 rebuilt with pytorch-fid's
modules and state_dict keys (so it needs neither torchvision nor pytorch-fid; see the protocol in evaluate)."""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import EvaluationError, InvalidArgumentError

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_SIZE = 299
FID_DIMS = 2048


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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

"""Helpers shared by the tests: error measures, Cityscapes-like maps, and float64 definitions
the fast paths are checked against, written as plainly as possible."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastp2phd import _extension
from fastp2phd.data.synthetic import cityscapes_like_instances as cityscapes_like  # noqa: F401

requires_extension = pytest.mark.skipif(not _extension.is_loaded(), reason=f"{_extension.load_error}")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64; NaN anywhere counts as infinite error."""
    a, e = actual.double(), expected.double()
    if torch.isnan(a).any() or torch.isnan(e).any():
        return float("inf")
    scale = e.abs().max().item() if e.numel() else 1.0
    return (a - e).abs().max().item() / max(scale, 1e-30) if e.numel() else 0.0


def instance_norm_act_definition(x: torch.Tensor, activation: str, slope: float = 0.2, eps: float = 1e-5) -> torch.Tensor:
    """y = act((x - mean) / sqrt(biased var + eps)) per (n, c) plane, in float64."""
    x = x.double()
    mean = x.mean(dim=(2, 3), keepdim=True)
    var = ((x - mean) ** 2).mean(dim=(2, 3), keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps)
    if activation == "relu":
        return y.clamp_min(0)
    if activation == "leaky_relu":
        return torch.where(y > 0, y, y * slope)
    return y


def instance_mean_loop(feat: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    """The definition of instance_mean, one segment at a time, in float64."""
    out = torch.empty_like(feat, dtype=torch.float64)
    for b in range(feat.shape[0]):
        ids = inst[b, 0]
        for value in torch.unique(ids):
            mask = ids == value
            for c in range(feat.shape[1]):
                out[b, c][mask] = feat[b, c][mask].double().mean()
    return out


def pytorch_result(x, activation, slope):
    """F.instance_norm + activation in x's own precision: the yardstick for our error."""
    y = F.instance_norm(x) if x.shape[2] * x.shape[3] > 1 else x - x
    return F.relu(y) if activation == "relu" else F.leaky_relu(y, slope) if activation == "leaky_relu" else y


def grad_err(actual, expected, x, grad):
    """Error of dx relative to the size of the terms it is computed from, rstd * |dy|.

    dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) cancels almost to zero on tiny
    planes (a 1x2 plane's dx is ~1e-7 of its terms), where error relative to dx
    itself only measures rounding noise.
    """
    x64 = x.detach().double()
    rstd = 1 / torch.sqrt(x64.var(dim=(2, 3), correction=0) + 1e-5)
    scale = max(rstd.max().item() * grad.abs().max().item(), expected.abs().max().item())
    return (actual.double() - expected).abs().max().item() / scale


def pytorch_errors(x, grad, activation, slope):
    """PyTorch's own errors (forward, backward) in x's precision, against float64."""
    x64 = x.detach().double().requires_grad_(True)
    expected = instance_norm_act_definition(x64, activation, slope)
    expected.backward(grad.double())
    xp = x.detach().clone().requires_grad_(True)
    y = pytorch_result(xp, activation, slope)
    y.backward(grad)
    return rel_err(y, expected), grad_err(xp.grad, x64.grad, x, grad)


def tiny_model(features: bool = True, norm: str = "instance"):
    """An untrained, seeded Pix2PixHD small enough for tests (35 labels, instance maps, optional
    instance features with random clusters for the classes of the synthetic scenes). ``norm="batch"``: a local
    generator, as the demo model's (its running statistics made up, so that they matter)."""
    from fastp2phd.pix2pixhd import Pix2PixHD
    from fastp2phd.specs import ModelSpec

    spec = ModelSpec(ngf=4, n_downsample_global=2, n_blocks_global=1, nef=4, n_downsample_E=2, instance_feat=features,
                     norm=norm)
    torch.manual_seed(0)
    model = Pix2PixHD(spec).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2)
    if features:
        g = torch.Generator().manual_seed(1)
        model.clusters = {c: torch.randn(3, 3, generator=g) for c in (7, 8, 11, 17, 21, 23, 24, 26)}
    return model


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak range 2)."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)


def psnr_floor(model, unit_roundoff: float = 2.0 ** -9) -> float:
    """The PSNR that 16-bit autocast must reach against fp32, derived from the type's unit roundoff u
    (bfloat16 2^-9, float16 2^-11).

    Under autocast every convolution rounds its input and its weights to the 16-bit type and accumulates
    in float32, and norms and instance means keep float32 statistics.
    To first order each of the L convolutions on the generator's path adds a relative error of at most
    3u (input, weight and output roundings), and normalisation layers rescale values without changing
    relative errors, so the output's error is at most 3uL times its magnitude, which tanh bounds by 1.
    The encoder's convolutions feed the features: they add to L. RMSE <= 3uL gives
    PSNR >= 20 log10(2 / (3uL)).
    """
    convs = sum(isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d) for m in model.modules())
    return 20 * math.log10(2 / (3 * unit_roundoff * convs))


def fill_disk_at_write(monkeypatch, failing: int) -> list:
    """Make the ``failing``-th (from 0) completed write of fastp2phd.files fail as on a full disk (its fsync
    raises ENOSPC); the others go through. Returns the list of written paths, which grows as they happen."""
    import errno

    import fastp2phd.files as files

    real_fsync, calls = files._fsync_file, []

    def fsync(path):
        calls.append(path)
        if len(calls) == failing + 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(path)

    monkeypatch.setattr(files, "_fsync_file", fsync)
    return calls


# A tiny run with features, as the workflow's failure tests share it: options, the run, and a sentence check.
TINY = ["--fineSize", "64", "--loadSize", "64", "--resize_or_crop", "none", "--ngf", "4", "--n_downsample_global", "2",
        "--n_blocks_global", "1", "--nThreads", "0", "--device", "cpu", "--no_progress", "--instance_feat", "--nef", "4",
        "--n_downsample_E", "2", "--n_clusters", "2"]
TRAIN = ["--ndf", "4", "--n_layers_D", "2", "--no_vgg_loss", "--batchSize", "2", "--niter", "1", "--niter_decay", "0",
         "--print_freq", "2"]


def train_tiny_run(root):
    """(checkpoints folder, data folder) of a tiny run with features in ``root``, trained one epoch (its web page
    showing its steps) and clustered."""
    from fastp2phd.cli import main
    from fastp2phd.data import make_synthetic

    data = make_synthetic(root / "data", num_train=6, num_test=2, height=32, width=64, seed=3)
    common = ["--name", "run", "--checkpoints_dir", str(root / "ck"), "--dataroot", str(data), *TINY]
    assert main(["train", *common, *TRAIN, "--display_freq", "2"]) == 0
    assert main(["encode-features", *common]) == 0
    return root / "ck", data


def copy_run(trained, tmp_path):
    """A copy of ``train_tiny_run``'s run for a test to damage."""
    import shutil

    ck, data = trained
    shutil.copytree(ck, tmp_path / "ck")
    return tmp_path / "ck", data


def one_sentence(capsys, *expected):
    """The command's stderr: one line, no traceback, holding each of ``expected``."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    for text in expected:
        assert text in err, err
    return err


def check_instance_mean_is_the_float64_mean_rounded_once(feat: torch.Tensor, impl: str, split_row: int) -> None:
    """Two segments, each many runs long (split at ``split_row`` and column 700): every path sums in float64, so each
    mean is the float64 mean rounded once to feat's dtype (float64: within 1e-15)."""
    from fastp2phd.ops import instance_mean

    inst = torch.zeros(1, 1, *feat.shape[2:], dtype=torch.int32)
    inst[..., split_row:, 700:] = 5
    expected = instance_mean(feat.double(), inst, impl="reference")
    actual = instance_mean(feat, inst, impl=impl)
    if feat.dtype == torch.float64:
        assert rel_err(actual, expected) < 1e-15
    else:
        assert torch.equal(actual, expected.to(feat.dtype))

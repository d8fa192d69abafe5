"""Host time per call: each op on a tiny tensor, where the kernels do almost nothing and what is measured
is the Python wrapper, the dispatcher, autograd and the launch. pix2pixHD trains at batch 1, where most
layers take microseconds on a GPU, so this cost decides its step time unless the step is captured in a
CUDA graph. Each op measurement is 100 calls; the same on any device (on the CPU too, as a proxy).

The whole training step too: the 512p architecture (G with 4 downsamplings and 9 residual blocks, 2 D of 3
layers, GAN and feature-matching losses; no VGG, whose convolutions cost the same on every path) at 4
channels and 32x64, where the time is mostly what the step asks of the host: its ops, their autograd and
the optimisers."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from harness import check_agrees, measure
from torch import nn

from fastp2phd import InstanceNormAct2d, ops

CALLS = 100


def _instance_norm_act(provider: str, channels: int):
    if provider == "fastp2phd":
        return InstanceNormAct2d(channels)
    if provider == "op":
        return lambda t: ops.instance_norm_act(t)
    if provider == "reference":
        return lambda t: ops.instance_norm_act(t, impl="reference")
    return nn.Sequential(nn.InstanceNorm2d(channels), nn.ReLU(True))  # official: the unfused modules, in-place ReLU as the original builds them


@pytest.mark.parametrize("provider", ["fastp2phd", "op", "reference", "official"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_instance_norm_act_host_time(benchmark, settings, mode, provider):
    x = torch.randn(1, 8, 4, 4, device=settings.device)
    layer = _instance_norm_act(provider, 8)
    if isinstance(layer, nn.Module):
        layer.to(settings.device)
    check_agrees(settings, layer(x), ops.instance_norm_act(x, impl="reference"), what=f"host overhead {provider}",
                 atol=1e-4, rtol=1e-4)
    if mode == "fwd":
        def fn():
            for _ in range(CALLS):
                layer(x)
    else:
        leaf = x.clone().requires_grad_(True)
        dy = torch.ones_like(x)

        def fn():
            for _ in range(CALLS):
                torch.autograd.grad(layer(leaf), leaf, dy)
    measure(benchmark, settings, suite="host overhead", case=f"instance_norm_act {mode} 1x8x4x4, {CALLS} calls",
            provider=provider, fn=fn)


@pytest.mark.parametrize("provider", ["fastp2phd", "reference"])
def test_instance_mean_host_time(benchmark, settings, provider):
    feat = torch.randn(1, 3, 4, 4, device=settings.device)
    inst = torch.arange(16, device=settings.device).view(1, 1, 4, 4) // 5
    impl = "auto" if provider == "fastp2phd" else "reference"
    check_agrees(settings, ops.instance_mean(feat, inst, impl=impl), ops.instance_mean(feat, inst, impl="reference"),
                 what=f"host overhead instance_mean {provider}")

    def fn():
        for _ in range(CALLS):
            ops.instance_mean(feat, inst, impl=impl)
    measure(benchmark, settings, suite="host overhead", case=f"instance_mean fwd 1x3x4x4, {CALLS} calls",
            provider=provider, fn=fn)


def test_eager_floor_host_time(benchmark, settings):
    """The floor: one tiny ATen op per call (torch.relu), what any Python-level op pays at least."""
    x = torch.randn(1, 8, 4, 4, device=settings.device)

    def fn():
        for _ in range(CALLS):
            F.relu(x)
    measure(benchmark, settings, suite="host overhead", case=f"torch.relu 1x8x4x4, {CALLS} calls",
            provider="floor", fn=fn)


@pytest.mark.parametrize("provider", ["fastp2phd", "reference", "official"])
def test_training_step_host_time(benchmark, settings, provider, monkeypatch):
    from bench_models import _make_official, check_first_step_agrees, training_options

    from fastp2phd.training import Trainer

    opt = training_options(settings, False, (32, 64), ["--ngf", "4", "--ndf", "4"], full_depth=True)
    if provider == "reference":
        monkeypatch.setenv("FASTP2PHD_IMPL", "reference")
    torch.manual_seed(0)
    trainer = Trainer(opt, settings.device)
    step = trainer.step
    if provider == "official":
        _make_official(step)
    batch = next(iter(trainer.loader))
    if settings.smoke:
        check_first_step_agrees(settings, "host overhead training step", provider, step, batch)
    measure(benchmark, settings, suite="host overhead", case="512p training step at 4 channels and 32x64, no VGG",
            provider=provider, fn=lambda: step.step(batch))

"""instance_norm_act forward and backward at the shapes of pix2pixHD's layers: the fast path
next to the reference, the original unfused nn.InstanceNorm2d + activation modules, and
torch.compile of the reference."""
from __future__ import annotations

import pytest
import torch
from harness import check_agrees, compiled_or_skip, measure, tensor_bytes
from torch import nn

from fastp2phd.ops import instance_norm_act, instance_norm_act_reference

PROVIDERS = ["fastp2phd", "reference", "official", "compile"]


def layers(height: int, width: int) -> list[tuple[str, tuple[int, int, int], str]]:
    """(name, (C, H, W), activation) of every normalised layer of G (512p global) and D for an image."""
    g = [("G 7x7 conv", (64, height, width))] + [
        (f"G down {i}", (64 * 2**i, height // 2**i, width // 2**i)) for i in range(1, 4)
    ] + [("G blocks", (1024, height // 16, width // 16))]
    h, w = height // 2 + 1, width // 2 + 1  # D's first 4x4 stride-2 conv (padding 2) has no norm
    d = []
    for i, channels in enumerate((128, 256, 512), start=1):
        h, w = (h // 2 + 1, w // 2 + 1) if i < 3 else (h + 1, w + 1)  # the last one has stride 1
        d.append((f"D layer {i}", (channels, h, w)))
    return [(n, shape, "relu") for n, shape in g] + [(n, shape, "leaky_relu") for n, shape in d]


# The GPU targets' shapes: the first layers at 1024x512 and 2048x1024 (few huge planes), a
# middle layer with a batch, and the residual blocks' many small planes, at pix2pixHD's batch 1
# (512p G at 512x1024: 1024 planes of 32x64; 1024p G1 at 1024x512 with ngf 32: 512 planes of 32x64).
GPU_SHAPES = [("G first layer, 1024x512", (1, 64, 1024, 512)), ("G first layer, 2048x1024", (1, 64, 2048, 1024)),
              ("G down 2, batch 4", (4, 256, 256, 128)), ("G blocks, batch 8", (8, 1024, 64, 32)),
              ("G blocks, batch 1", (1, 1024, 32, 64)), ("1024p G1 blocks, batch 1", (1, 512, 32, 64))]
CPU_BF16 = ("G 7x7 conv", "G blocks", "D layer 1")  # the 16-bit CPU path (bf16 inference) at a few layers
MODES = ["fwd", "bwd", "fwd+bwd"]


def workloads(settings):
    if settings.smoke:
        return [("smoke", (1, 8, 16, 32), "relu", torch.float32)]
    if settings.cuda:
        return [(name, shape, "relu", dtype) for name, shape in GPU_SHAPES for dtype in (torch.float32, torch.bfloat16)]
    fp32 = [(f"512x1024 {name}", (1, *shape), act, torch.float32) for name, shape, act in layers(512, 1024)]
    bf16 = [(f"512x1024 {name}", (1, *shape), act, torch.bfloat16)
            for name, shape, act in layers(512, 1024) if name in CPU_BF16]
    return fp32 + bf16


def official_module(channels: int, activation: str) -> nn.Module:
    act = nn.ReLU(True) if activation == "relu" else nn.LeakyReLU(0.2, True)
    return nn.Sequential(nn.InstanceNorm2d(channels), act)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("index", range(12))
def test_instance_norm_act(benchmark, settings, index, provider, mode):
    cases = workloads(settings)
    if index >= len(cases):
        pytest.skip("no such workload on this device")
    name, shape, activation, dtype = cases[index]
    if mode == "fwd+bwd" and not (settings.smoke or shape[0] == 1 and shape[1] >= 512):
        pytest.skip("forward + backward is measured at the batch-1 deep layers, where host time dominates")
    x = torch.randn(shape, device=settings.device, dtype=dtype)
    if provider == "fastp2phd":
        op = lambda t: instance_norm_act(t, activation)  # noqa: E731
    elif provider == "reference":
        op = lambda t: instance_norm_act(t, activation, impl="reference")  # noqa: E731
    elif provider == "official":
        op = official_module(shape[1], activation).to(settings.device)
    else:
        op = compiled_or_skip(lambda t: instance_norm_act_reference(t, activation), x)
    if mode == "bwd":
        leaf = x.clone().requires_grad_(True)
        y = op(leaf)
        dy = torch.randn_like(y)
        fn = lambda: torch.autograd.grad(y, leaf, dy, retain_graph=True)  # noqa: E731
        moved = 4 * tensor_bytes(x)  # read x and dy twice (sums, then dx), write dx; (dy once more for relu's mask)
    elif mode == "fwd+bwd":
        leaf = x.clone().requires_grad_(True)
        dy = torch.randn_like(x)
        fn = lambda: torch.autograd.grad(op(leaf), leaf, dy)  # noqa: E731
        moved = 7 * tensor_bytes(x)
    else:
        fn = lambda: op(x)  # noqa: E731
        moved = 3 * tensor_bytes(x)  # read x twice (statistics, normalisation), write y
    if settings.smoke:  # the same output (or input gradient) as the reference's
        ref_leaf = x.clone().requires_grad_(mode != "fwd")
        expected = instance_norm_act_reference(ref_leaf, activation)
        if mode != "fwd":
            expected = torch.autograd.grad(expected, ref_leaf, dy)
        check_agrees(settings, fn() if mode == "fwd" else tuple(fn()), expected,
                     what=f"instance_norm_act {mode} {provider}", atol=1e-4, rtol=1e-4, layout=mode == "fwd")
    dtype_name = str(dtype).replace("torch.", "")
    # Three times the usual rounds: calls of a few ms, whose 5-round medians swung by 20-30% between runs.
    measure(benchmark, settings, suite=f"instance_norm_act {mode}",
            case=f"{name} {'x'.join(map(str, shape))} {dtype_name}", provider=provider, fn=fn, bytes_moved=moved,
            rounds=3 * settings.rounds())

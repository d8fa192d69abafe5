"""Making a trained model faster at inference without changing what it computes or its state_dict.

``optimize_for_inference`` keeps what measurement showed to pay on the CPU: **channels_last**
weights and activations, so that oneDNN's convolutions run NHWC without reordering every layer's
input and output. On a 2-core AMD EPYC (AVX512-BF16), one run, batch 1:

| generator, size | fp32 eager | channels_last | bf16 eager | bf16 channels_last |
|---|---:|---:|---:|---:|
| 1024p at 512x1024 | 2925 ms | 2351 ms (1.24x) | 1488 ms | 1239 ms (1.20x) |
| 512p at 256x512 | 1551 ms | 1482 ms (1.05x) | 737 ms | 703 ms (1.05x) |
| 512p at 512x1024 (bench run) | 5844 ms | 6228 ms (**0.94x**) | 3121 ms | 2974 ms (1.05x) |

It is not a win everywhere: oneDNN's NHWC 3x3 convolution of a wide, small plane is slower than its NCHW
one (1024 channels at 32x64, fp32: 217 ms NHWC, 188 ms NCHW), so the residual blocks of 512 channels or
more (the global generator's) stay NCHW, behind a pre-hook that makes their input contiguous. With that,
the 1024p generator at 1024x2048 in fp32 took 7.7 s instead of 8.7-10.0 s (onnxruntime 8.8-9.0 s in the
same run), and nothing changed at 512x1024 or in bf16 (one ad-hoc run, same machine, freed memory kept;
bench/REPORT.md, "inference precision", has the bench's rows beside onnxruntime's).

The generator's last convolution (7x7, to 3 image channels) is computed by rows (``RowSplitConv2d``): a 1x7
convolution to 21 channels and a sum of 7 row-shifted planes, since oneDNN spends as long on 3 outputs as on
16. At 1024x2048 the 1024p generator took 7.3 s instead of 7.7 (fp32) and 4.0 s instead of 4.2 (bf16).

The generators' first convolutions read the label map, one-hot channels and a boundary map in which 1 value
in about 30 is nonzero: ``SparseInputConv2d`` adds the weights of the nonzero values only
(``fastp2phd.ops.sparse_input_conv2d``, C++), so the 1024p generator's 7x7 layer of 36 -> 32 channels at
1024x2048 takes about 0.25 s instead of 1.05. With both, the 1024p generator at 1024x2048 took 6.1 s in fp32
(7.3 before) and 3.7 s in bf16 (4.0); at 512x1024 1.6 s (2.0) and 1.05 s (1.2) (ad-hoc). In the newest
bench run (bench/REPORT.md, "AMD EPYC (AVX512)", 2026-12-07, label maps of a street scene): 5813 ms fp32
and 3326 ms bf16 at 1024x2048 against onnxruntime's 8755 ms, and 1704 / 925 ms at 512x1024 against 2263 ms.

Folding each ``ReflectionPad2d`` into the convolution after it (``padding_mode="reflect"``) was
measured too and left out: it changed nothing on top of channels_last (2352 vs 2351 ms), since
``Conv2d`` pads with the same separate copy. Outputs equal eager float32 up to the convolution
algorithm's rounding (about 2e-5); ``--precision bf16`` is chosen separately.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .models.generator import GlobalGenerator, LocalEnhancer, ResnetBlock
from .ops.sparse_input_conv2d import sparse_input_conv2d

WIDE_BLOCK_CHANNELS = 512  # residual blocks this wide stay NCHW (measured at 1024, the published models' width)


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Switch ``model`` to channels_last (its wide residual blocks to NCHW), compute its few-output
    convolutions by rows and its generators' first convolutions from the label map's nonzero values only,
    in place; returns it.
    Weights, state_dict keys and results (to about 2e-5) stay as they were, and checkpoints load into
    it as before.

    For a model in eval mode (``load_run`` returns one; ``load_run(optimize=True)``, ``fastp2phd test
    --optimize`` and the editor call this). A model in training mode is returned unchanged, with a
    warning: a model being trained should keep the layout it was built with.
    """
    if model.training:
        warnings.warn("optimize_for_inference: the model is in training mode; call model.eval() first "
                      "(the model is returned unchanged)", stacklevel=2)
        return model
    model.to(memory_format=torch.channels_last)
    spec = getattr(model, "spec", None)  # a Pix2PixHD's: its generators' inputs end with its instance features
    features = spec.feat_num if spec is not None and spec.uses_features else 0
    for generator in model.modules():
        if isinstance(generator, (GlobalGenerator, LocalEnhancer)):
            for branch in generator.children():  # model, model1_1, ...: pad, conv, ... on the generator's input
                if (isinstance(branch, nn.Sequential) and len(branch) > 1 and isinstance(branch[0], nn.ReflectionPad2d)
                        and type(branch[1]) is nn.Conv2d and branch[1].in_channels == generator.options["input_nc"]
                        and _plain(branch[1])):
                    branch[1].__class__ = SparseInputConv2d
                    branch[1].dense_channels = features
    for module in model.modules():
        if isinstance(module, ResnetBlock) and _width(module) >= WIDE_BLOCK_CHANNELS:
            module.to(memory_format=torch.contiguous_format)
            if _nchw_input not in module._forward_pre_hooks.values():  # optimizing again adds no second hook
                module.register_forward_pre_hook(_nchw_input)
        elif type(module) is nn.Conv2d and RowSplitConv2d.suits(module):
            module.__class__ = RowSplitConv2d  # same parameters, buffers and hooks; another forward
    return model


def _width(block: ResnetBlock) -> int:
    return next(m for m in block.conv_block if isinstance(m, nn.Conv2d)).in_channels


def _plain(conv: nn.Conv2d) -> bool:
    """Stride 1, no padding, dilation or groups: what the re-expressed convolutions below compute."""
    return (conv.groups == 1 and conv.padding_mode == "zeros" and tuple(conv.padding) == (0, 0)
            and tuple(conv.stride) == (1, 1) and tuple(conv.dilation) == (1, 1))


def _nchw_input(block: nn.Module, args: tuple) -> tuple:
    return (args[0].contiguous(), *args[1:])


class RowSplitConv2d(nn.Conv2d):
    """A k x k convolution with few outputs (the generator's last: 3 image channels from 32 or 64),
    computed as a 1 x k convolution to out_channels * k channels, one per (output, kernel row), whose
    row-shifted planes are then summed (in float32 at least).

    oneDNN runs a 3-output convolution as if it had 16 (it takes as long with the weights padded to 16),
    so most of its work is thrown away; the 21-output 1 x 7 convolution keeps its vector lanes busy. The
    1024p generator's last convolution at 512x1024 (32 channels) took 45 ms instead of 118, and the sum
    of rows is at least as accurate as the direct convolution (tests/test_optimize.py).
    """

    MAX_SPLIT_OUTPUTS = 32  # out_channels * kernel rows: measured at 3 * 7

    @classmethod
    def suits(cls, conv: nn.Conv2d) -> bool:
        out_channels, _, rows, _ = conv.weight.shape
        return rows > 1 and out_channels * rows <= cls.MAX_SPLIT_OUTPUTS and _plain(conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_channels, in_channels, rows, cols = self.weight.shape
        # Inputs the split does not serve (unbatched, smaller than the kernel, other channels): nn.Conv2d's own
        # result or error, where the split would give an empty plane or a confusing error.
        if x.dim() != 4 or x.shape[1] != in_channels or x.shape[2] < rows or x.shape[3] < cols:
            return super().forward(x)
        row_weights = self.weight.transpose(1, 2).reshape(out_channels * rows, in_channels, 1, cols)
        z = F.conv2d(x, row_weights.contiguous(memory_format=torch.channels_last))
        z = z.unflatten(1, (out_channels, rows))  # (N, out, row, H, W')
        height = z.shape[3] - rows + 1
        # rows summed in float32 at least (under bf16 autocast too), the result in the convolution's dtype
        y = z[:, :, 0, :height].to(torch.promote_types(z.dtype, torch.float32), copy=True)
        for row in range(1, rows):
            y += z[:, :, row, row:row + height]
        if self.bias is not None:
            y += self.bias[:, None, None]
        return y.to(z.dtype)


class SparseInputConv2d(nn.Conv2d):
    """The generators' first convolutions, whose input is the label map: one-hot channels and a boundary map
    (average-pooled for the global generator of a 1024p model), so 1 value in about 30 is nonzero.
    ``fastp2phd.ops.sparse_input_conv2d`` adds the weights of the nonzero values only; the same function
    as the convolution, which it runs itself where the input turns out dense.

    ``dense_channels``: how many of the last input channels are dense (a model's instance features, nonzero
    everywhere), convolved by oneDNN and added: the demo model's 7x7 layer (39 -> 16 channels, 3 of them
    features) at 256x512 took 28 ms instead of 41 (2-core EPYC, AVX2)."""

    dense_channels = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:  # unbatched (C, H, W), as nn.Conv2d takes it
            return self.forward(x[None])[0]
        k = self.dense_channels
        if k == 0:
            return sparse_input_conv2d(x, self.weight, self.bias)
        y = sparse_input_conv2d(x[:, :-k], self.weight[:, :-k], self.bias)
        return y + F.conv2d(x[:, -k:], self.weight[:, -k:])

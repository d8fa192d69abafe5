"""Making a trained model faster at inference without changing what it computes or its state_dict.

``optimize_for_inference`` keeps what measurement showed to pay on the CPU: **channels_last**
weights and activations, so that oneDNN's convolutions run NHWC without reordering every layer's
input and output. On a 2-core AMD EPYC (AVX512-BF16), one run, batch 1:

| generator, size | fp32 eager | channels_last | bf16 eager | bf16 channels_last |
|---|---:|---:|---:|---:|
| 1024p at 512x1024 | 2925 ms | 2351 ms (1.24x) | 1488 ms | 1239 ms (1.20x) |
| 512p at 256x512 | 1551 ms | 1482 ms (1.05x) | 737 ms | 703 ms (1.05x) |
| 512p at 512x1024 (bench run) | 5844 ms | 6228 ms (**0.94x**) | 3121 ms | 2974 ms (1.05x) |

It is not a win everywhere: the 512p generator's 1024-channel residual blocks ran slower NHWC in fp32
at 512x1024 (bench/REPORT.md, "inference precision", has every row beside onnxruntime's).

Folding each ``ReflectionPad2d`` into the convolution after it (``padding_mode="reflect"``) was
measured too and left out: it changed nothing on top of channels_last (2352 vs 2351 ms), since
``Conv2d`` pads with the same separate copy. Outputs equal eager float32 up to the convolution
algorithm's rounding (about 2e-5); ``--precision bf16`` is chosen separately.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Switch ``model`` to channels_last, in place; returns it. Weights, state_dict keys and results
    (to about 2e-5) stay as they were, and checkpoints load into it as before.

    For a model in eval mode (``load_run`` returns one; ``load_run(optimize=True)``, ``fastp2phd test
    --optimize`` and the editor call this). A model in training mode is returned unchanged, with a
    warning: a model being trained should keep the layout it was built with.
    """
    if model.training:
        warnings.warn("optimize_for_inference: the model is in training mode; call model.eval() first "
                      "(the model is returned unchanged)", stacklevel=2)
        return model
    return model.to(memory_format=torch.channels_last)

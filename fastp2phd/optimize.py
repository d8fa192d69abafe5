"""Making a trained model faster at inference without changing what it computes or its state_dict.

``optimize_for_inference`` keeps the steps that measurement showed to pay on the CPU (512p
generator at 256x512, AMD EPYC with AVX512-BF16, 2 cores, one run; see bench/REPORT.md):

* **channels_last** weights and activations: oneDNN's convolutions run NHWC without reordering
  every layer's input and output;
* **reflection padding folded into the convolution that follows** (``padding_mode="reflect"``):
  the same arithmetic, but in bf16 channels_last the separate ``ReflectionPad2d`` layers were most of
  the time (fp32 eager 3880 ms, fold + channels_last 3508 ms; bf16 autocast 2821 ms, bf16 with both
  1077 ms).

Neither changes a weight or a state_dict key (a folded pad becomes an ``nn.Identity``), so
checkpoints load into the optimized model as before. Outputs equal eager float32 up to the
convolution algorithm's rounding (about 1e-5); ``--precision bf16`` is chosen separately.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

_PAD_MODES = {nn.ReflectionPad2d: "reflect", nn.ReplicationPad2d: "replicate"}


def fold_padding(model: nn.Module) -> int:
    """Fold every reflection/replication pad that directly precedes an unpadded Conv2d in a Sequential
    into that convolution (``padding_mode``); returns how many were folded."""
    folded = 0
    for sequential in model.modules():
        if not isinstance(sequential, nn.Sequential):
            continue
        children = list(sequential._modules.items())
        for (name, pad), (_, conv) in zip(children, children[1:]):
            mode = _PAD_MODES.get(type(pad))
            if mode is None or type(conv) is not nn.Conv2d or conv.padding != (0, 0):
                continue
            left, right, top, bottom = pad.padding
            if left != right or top != bottom:
                continue
            conv.padding, conv.padding_mode = (top, left), mode
            conv._reversed_padding_repeated_twice = [left, right, top, bottom]
            sequential._modules[name] = nn.Identity()  # no parameters: the state_dict keys stay
            folded += 1
    return folded


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """Fold padding into convolutions and switch ``model`` to channels_last, in place; returns it.

    For a model in eval mode (``load_run`` returns one; ``load_run(optimize=True)`` and
    ``fastp2phd test --optimize`` call this). A model in training mode is returned unchanged, with a
    warning: training would not benefit, and a model being trained should keep its modules as built.
    """
    if model.training:
        warnings.warn("optimize_for_inference: the model is in training mode; call model.eval() first "
                      "(the model is returned unchanged)", stacklevel=2)
        return model
    fold_padding(model)
    model.to(memory_format=torch.channels_last)
    return model

"""The ``fastp2phd memory`` command: the options it takes, the ones it refuses or notes, and what it prints.

The estimates themselves are ``fastp2phd.memory``'s.
"""
from __future__ import annotations

import sys

import torch

from .errors import InvalidArgumentError
from .memory import default_size, estimate_inference, estimate_training_step, measure_training_step, parse_size
from .pix2pixhd import fastest_precision
from .specs import WHOLE_SCENE_MODES, TrainSpec


def main_memory(spec: TrainSpec, *, size: str | None, inference: bool, as_json: bool, measure: bool,
                device_type: str, precision: str = "fp32") -> int:
    """``fastp2phd memory``: print (or --json) the estimate; with --measure, the real step's CUDA peak beside it.
    ``precision``: test's --precision, for ``inference``."""
    from .train_step import TrainingError

    notes = []
    try:
        if spec.compile != "off":  # (a compiled step keeps other tensors, which fake tensors cannot tell)
            raise InvalidArgumentError("the memory model runs the networks eagerly: estimate without --compile")
        data = spec.data
        if inference and data.resize_or_crop in WHOLE_SCENE_MODES and not size:
            data = data.replace(resize_or_crop=WHOLE_SCENE_MODES[data.resize_or_crop])
            notes.append(f"test reads a run trained on crops whole (--resize_or_crop {data.resize_or_crop}), as "
                         "here; --size gives another size")
        shape = parse_size(size) if size else default_size(data, spec.model)
        if inference:
            if precision == "auto":  # what test would pick on the device modelled
                if device_type == "cuda" and not torch.cuda.is_available():
                    raise InvalidArgumentError("--precision auto is bf16 or fp32 by the GPU, and this machine has "
                                               "none: give --precision bf16, fp16 or fp32")
                precision = fastest_precision(device_type)
            if spec.fp16:  # (as test says of it)
                notes.append(f"--fp16 is a training option; inference runs in --precision {precision}"
                             + (" (use --precision bf16 or fp16)" if precision == "fp32" else ""))
            if spec.batchSize > 1:
                notes.append(f"test generates one image at a time; this is {spec.batchSize} at once (--batchSize)")
            estimate = estimate_inference(spec.model, shape, spec.batchSize, device_type, precision)
        elif precision != "fp32":
            raise InvalidArgumentError(f"--precision {precision} is inference's (with --inference); a training step's "
                                       "precision is --fp16 (and --amp_dtype)")
        else:
            if spec.niter_fix_global:
                notes.append("with --niter_fix_global: the peak of the epochs after it, which train all of G (the "
                             "first ones need less)")
            estimate = estimate_training_step(spec, shape, device_type)
    except (ValueError, TrainingError) as exc:
        print(f"fastp2phd memory: {exc}", file=sys.stderr)
        return 1
    estimate.notes += notes
    status = 0
    if measure:
        if inference:
            estimate.notes.append("--measure measures training steps only")
            status = 1
        elif not torch.cuda.is_available():
            estimate.notes.append("--measure needs a CUDA device, and this machine has none: the estimate is all "
                                  "there is")
            status = 1
        else:
            estimate.measured_bytes = measure_training_step(spec, shape)
    print(estimate.to_json() if as_json else estimate.format())
    if status:
        print(f"fastp2phd memory: {estimate.notes[-1]}", file=sys.stderr)
    return status

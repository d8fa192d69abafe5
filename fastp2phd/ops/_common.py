"""Shared by the ops: input validation (one sentence per problem, saying how to fix it) and layout."""
from __future__ import annotations

import torch

_ID_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def check_instance_map(op: str, inst: torch.Tensor, name: str = "inst") -> None:
    """An (N, 1, H, W) tensor of integer ids (integer dtype, or float holding integers)."""
    if not isinstance(inst, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(inst).__name__}")
    if inst.dim() != 4 or inst.shape[1] != 1:
        raise ValueError(
            f"{op}: {name} must have shape (N, 1, H, W), got {tuple(inst.shape)}; "
            "for a single (H, W) map use inst[None, None]"
        )
    if inst.dtype not in _ID_DTYPES and not inst.is_floating_point():
        raise TypeError(f"{op}: {name} must hold integer ids (uint8, int8..int64 or float), got {inst.dtype}")
    # Data-dependent check: costs a pass (and a host sync on CUDA), so only for
    # float maps, and skipped while torch.compile traces (it cannot branch on data).
    if inst.is_floating_point() and inst.numel() and inst.device.type != "meta" and not torch.compiler.is_compiling():
        if not bool(torch.all(inst == torch.trunc(inst))):
            raise ValueError(
                f"{op}: {name} is a float tensor with fractional or NaN values; instance ids must be "
                "whole numbers (load instance maps with nearest-neighbour resizing, or pass an integer tensor)"
            )


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{op}: tensors must be on one device, got {listing}; move them with .to(device)")


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """channels_last for an (N, C, H, W) tensor laid out that way, contiguous_format otherwise."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format

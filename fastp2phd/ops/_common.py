"""Shared by the ops: input validation (one sentence per problem, saying how to fix it) and layout."""
from __future__ import annotations

import torch

from ..errors import InvalidArgumentError

_ID_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)

# instance_norm_act's activations (the Triton kernels number them in this order).
ACTIVATIONS = ("none", "relu", "leaky_relu")


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """instance_norm_act's compute dtype and the dtype of its rstd: float64 for float64 input, float32
    otherwise (its mean is float64 for every input, and its sums are accumulated in float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# The floating types the ops compute in (float8 types have no arithmetic on the CPU).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    """``t`` holds one of FLOAT_DTYPES."""
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {t.dtype}; convert it with "
                        ".float()")


def check_instance_map(op: str, inst: torch.Tensor, name: str = "inst") -> None:
    """An (N, 1, H, W) tensor of integer ids (integer dtype, or float holding integers)."""
    if not isinstance(inst, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(inst).__name__}")
    if inst.dim() != 4 or inst.shape[1] != 1:
        raise InvalidArgumentError(
            f"{op}: {name} must have shape (N, 1, H, W), got {tuple(inst.shape)}; "
            "for a single (H, W) map use inst[None, None]"
        )
    if inst.dtype not in _ID_DTYPES and inst.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must hold integer ids (uint8, int8..int64, or float16..float64 holding whole "
                        f"numbers), got {inst.dtype}; convert it with .long()")
    # Data-dependent check: costs a pass (and a host sync on CUDA), so only for
    # float maps, and skipped while torch.compile or an exporter traces (they cannot branch on data).
    if inst.is_floating_point() and inst.numel() and inst.device.type != "meta" and not torch.compiler.is_compiling() \
            and not exporting() and not is_fake(inst):
        # Ids become int64 inside the kernels: they must be whole numbers in int64's range (not NaN or inf).
        # isfinite is needed: in float16 the bound -2**63 rounds to -inf, which the comparisons alone let through.
        ids = _unbatched(inst)
        valid = torch.isfinite(ids) & (ids == torch.trunc(ids)) & (ids >= -2.0**63) & (ids < 2.0**63)
        if not bool(torch.all(valid)):
            raise InvalidArgumentError(
                f"{op}: {name} is a float tensor holding values that are not whole numbers within int64's range "
                "(fractions, NaN, inf or beyond ±9.2e18); instance ids must be such numbers: load instance maps "
                "with nearest-neighbour resizing, or pass an integer tensor"
            )


def _unbatched(t: torch.Tensor) -> torch.Tensor:
    """``t`` without torch.func's wrappers: under vmap a tensor cannot be branched on, but the whole
    batch beneath it can be checked at once."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if isinstance(t, torch.Tensor)}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise InvalidArgumentError(f"{op}: tensors must be on one device, got {listing}; move them with .to(device)")


def memory_format_of(t: torch.Tensor) -> torch.memory_format:
    """The layout an op's output takes for input ``t``: channels_last when ``t``'s strides are
    channels-last-like (a channels_last tensor or a slice, step or crop of one), contiguous otherwise.

    This is PyTorch's own rule (``suggest_memory_format``, which ``empty_like`` applies to
    tensors that are not dense): strides ordered channels < width < height < batch.
    """
    if t.dim() != 4 or t.is_contiguous():
        return torch.contiguous_format
    sizes, strides = t.shape, t.stride()
    if strides[1] == 0:
        return torch.contiguous_format
    smallest = 0
    for d in (1, 3, 2, 0):
        if sizes[d] == 0 or strides[d] < smallest or (d == 0 and smallest == strides[1]):
            return torch.contiguous_format
        smallest = strides[d] * (sizes[d] if sizes[d] > 1 else 1)
    return torch.channels_last


def empty_like_format(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A new tensor of ``t``'s shape in ``memory_format_of(t)``: what the ops return for input ``t``."""
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device, memory_format=memory_format_of(t))


def tangents_may_flow() -> bool:
    """Whether forward-mode AD (a dual level) or a torch.func transform (grad, jvp, vmap) is active.

    The autograd that ``torch.library`` registers for an op serves backward only and silently
    drops forward tangents, so the ops take an ``autograd.Function`` with a jvp then. False while
    torch.compile traces (it cannot trace a custom jvp, and needs neither), including AOTAutograd's
    functionalized tracing of the backward, which must keep the fast backward kernels.
    """
    if torch.compiler.is_compiling():
        return False
    if forward_ad_active():
        return True
    transform = functorch_transform()
    return transform is not None and transform.key() in _GRAD_TRANSFORMS


def forward_ad_active() -> bool:
    """Whether a forward-mode AD dual level (``torch.autograd.forward_ad.dual_level``) is open."""
    return torch.autograd.forward_ad._current_level >= 0


def functorch_transform():
    """The innermost torch.func transform (grad, jvp, vmap, ...) running, or None; None while torch.compile
    traces, which handles the transforms itself."""
    if torch.compiler.is_compiling():
        return None
    return torch._C._functorch.peek_interpreter_stack()


_GRAD_TRANSFORMS = (torch._C._functorch.TransformType.Grad, torch._C._functorch.TransformType.Jvp,
                    torch._C._functorch.TransformType.Vmap)


def exporting() -> bool:
    """Whether an exporter is tracing: torch.export (and the ONNX exporter built on it), or torch.jit.trace
    (and the TorchScript-based ONNX exporter). The ops then record their PyTorch reference, in standard
    ops every exporter and runtime knows, instead of fastp2phd's kernels."""
    return torch.compiler.is_exporting() or torch.jit.is_tracing()


def is_fake(t) -> bool:
    """Whether ``t`` is a fake tensor: shape, dtype and device, no values. The memory model (fastp2phd/memory.py)
    runs whole training steps on such tensors, so production code asks this where it would read values (a data
    check, a host read of the losses) or compile networks, and skips that work: there is nothing to read."""
    from torch._subclasses.fake_tensor import is_fake as _is_fake

    return isinstance(t, torch.Tensor) and _is_fake(t)

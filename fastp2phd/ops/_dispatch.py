"""Choosing between an op's fast paths and its PyTorch reference.

Every public op takes ``impl``:

* ``"auto"``: the first fast path that serves the tensor's device and can run
  here; the reference otherwise. The environment variable ``FASTP2PHD_IMPL=reference``
  makes ``auto`` pick the reference everywhere (for debugging and comparisons).
* ``"reference"``: the pure-PyTorch implementation beside the op.
* a fast path's name (``"cpp"``, ``"cuda"``, ``"triton"``): that path or a clear
  error, never a silent fallback.

While a model is exported (``torch.export``, ``torch.onnx.export``, ``torch.jit.trace``)
every op records its reference, whatever ``impl`` says: the exported graph then holds
standard operators (ONNX: InstanceNormalization, Relu, ScatterElements, ...) and runs
without fastp2phd. The function it computes is the same. Triton paths also take CPU tensors by name when
  Triton's interpreter is on (``TRITON_INTERPRET=1``), which is how they are tested
  without a GPU; ``"auto"`` never picks the interpreter for CPU tensors.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ._common import exporting

IMPL_ENV = "FASTP2PHD_IMPL"
_DEFAULTS = ("auto", "reference")


@dataclass(frozen=True)
class FastPath:
    name: str  # what users pass as impl=
    device_type: str  # the tensors it serves: "cpu" or "cuda"
    unavailable: Optional[str]  # None when it can run here, else why not (decided at import)
    run: Callable
    interpreted: bool = False  # a Triton path running in the interpreter: also takes CPU tensors by name
    registered_anywhere: bool = False  # its torch.library op (and fake kernel) exists even where it cannot run


_emulated_device: Optional[str] = None


@contextlib.contextmanager
def emulate_device(device_type: str):
    """Inside, ``"auto"`` picks the fast paths of ``device_type`` whatever the tensors' device, including
    paths that cannot run here but whose op is registered. Only for fake tensors, where nothing but fake
    kernels runs: the memory model estimates a CUDA step on a machine without one this way."""
    global _emulated_device
    previous, _emulated_device = _emulated_device, device_type
    try:
        yield
    finally:
        _emulated_device = previous


def default_impl() -> str:
    value = os.environ.get(IMPL_ENV, "auto")
    if value not in _DEFAULTS:
        raise ValueError(f"{IMPL_ENV}={value!r} is not understood; set it to 'auto' or 'reference' or unset it")
    return value


def select(op: str, impl: str, device: torch.device, fast_paths: Sequence[FastPath]) -> Optional[FastPath]:
    """The fast path to run, or None for the reference implementation."""
    if exporting():
        return None
    if impl == "auto":
        if default_impl() == "reference":
            return None
        device_type = _emulated_device or device.type
        for path in fast_paths:
            usable = path.unavailable is None or (_emulated_device is not None and path.registered_anywhere)
            if path.device_type == device_type and usable:
                return path
        return None
    if impl == "reference":
        return None
    for path in fast_paths:
        if path.name != impl:
            continue
        if path.device_type != device.type and not (path.interpreted and device.type == "cpu"):
            interpreter = " (or on CPU tensors when TRITON_INTERPRET=1 is set before import)" if impl == "triton" else ""
            raise ValueError(
                f"{op}: impl={impl!r} runs on {path.device_type} tensors{interpreter} but got a {device.type} "
                f"tensor; move the tensor to {path.device_type} or use impl='auto'"
            )
        if path.unavailable is not None:
            raise RuntimeError(f"{op}: impl={impl!r} is not available: {path.unavailable}")
        return path
    choices = ", ".join(repr(name) for name in ("auto", "reference", *(p.name for p in fast_paths)))
    raise ValueError(f"{op}: unknown impl={impl!r}; choose one of {choices}")


def triton_missing(exc: ImportError) -> str:
    """Why a Triton fast path is unavailable, in one sentence."""
    return f"the Triton kernels could not be imported ({exc}); install Triton with `pip install triton`"

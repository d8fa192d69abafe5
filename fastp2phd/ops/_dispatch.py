"""Choosing between an op's fast paths and its PyTorch reference.

Every public op takes ``impl``:

* ``"auto"``: the first fast path that serves the tensor's device and can run
  here; the reference otherwise. The environment variable ``FASTP2PHD_IMPL=reference``
  makes ``auto`` pick the reference everywhere (for debugging and comparisons).
* ``"reference"``: the pure-PyTorch implementation beside the op.
* ``"cpu"`` or ``"cuda"``: the op's fast kernel for that device (C++ on the CPU; Triton,
  or CUDA C++ for boundary_map, on the GPU), or a clear error, never a silent fallback.
  Every op takes the same names, so ``impl="cpu"`` works for a whole network. The names
  of earlier releases still work: ``"cpp"`` for ``"cpu"``, ``"triton"`` for a Triton ``"cuda"``.

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
    device_type: str  # the tensors it serves, and what users pass as impl=: "cpu" or "cuda"
    kernel: str  # what runs, for reports: "C++", "Triton", "CUDA C++"
    unavailable: Optional[str]  # None when it can run here, else why not (decided at import)
    run: Callable
    aliases: tuple[str, ...] = ()  # earlier names that still select it
    interpreted: bool = False  # a Triton path running in the interpreter: also takes CPU tensors by name
    registered_anywhere: bool = False  # its torch.library op (and fake kernel) exists even where it cannot run

    @property
    def name(self) -> str:
        return self.device_type


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
        if impl != path.name and impl not in path.aliases:
            continue
        if path.device_type != device.type and not (path.interpreted and device.type == "cpu"):
            interpreter = (" (or on CPU tensors when TRITON_INTERPRET=1 is set before import)"
                           if path.kernel == "Triton" else "")
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

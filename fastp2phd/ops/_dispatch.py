"""Choosing between an op's fast paths and its PyTorch reference.

Every public op takes ``impl``:

* ``"auto"``: the first fast path that serves the tensor's device and can run
  here; the reference otherwise (with one warning per op where that device's fast
  path exists but cannot run here: a build without the extension, Triton missing).
  The environment variable ``FASTP2PHD_IMPL=reference`` makes ``auto`` pick the
  reference everywhere (for debugging and comparisons).
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

Under ``torch.use_deterministic_algorithms(True)`` a path that adds with float atomics
(``deterministic=False``) is not taken: ``"auto"`` runs the reference and says so once (a
warning), asking for it by name raises, and with ``warn_only=True`` it runs with a warning,
as PyTorch's own nondeterministic ops do. ``fastp2phd info`` lists such paths.
"""
from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from ..errors import InvalidArgumentError
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
    deterministic: bool = True  # False: float atomics add in no fixed order, so bits may differ run to run
    off_on_purpose: bool = False  # unavailable by design (the interpreter process): "auto" falls back without a word

    @property
    def name(self) -> str:
        return self.device_type


_memory_model_device: Optional[str] = None


@contextlib.contextmanager
def memory_model_device(device_type: str):
    """The memory model's one seam in op dispatch (fastp2phd/memory.py): inside, ``"auto"`` picks the fast
    paths of ``device_type`` whatever device the tensors are on, and takes a path that cannot run here when
    its op is registered (its fake kernel is all that runs on fake tensors).

    Production code has it because ``fastp2phd memory`` and the image-size checks of training and
    inference estimate a CUDA step on fake tensors, on any machine: without it, those tensors' CPU device
    would select the CPU paths, whose memory is not the GPU's. Only the memory model enters it: around steps
    on fake tensors, and (``device_type="cpu"``) around the real CPU step its tests compare the estimate with."""
    global _memory_model_device
    previous, _memory_model_device = _memory_model_device, device_type
    try:
        yield
    finally:
        _memory_model_device = previous


def default_impl() -> str:
    value = os.environ.get(IMPL_ENV, "auto")
    if value not in _DEFAULTS:
        raise InvalidArgumentError(f"{IMPL_ENV}={value!r} is not understood; set it to 'auto' or 'reference' or unset it")
    return value


def select(op: str, impl: str, device: torch.device, fast_paths: Sequence[FastPath]) -> Optional[FastPath]:
    """The fast path to run, or None for the reference implementation."""
    if exporting():
        return None
    if impl == "auto":
        if default_impl() == "reference":
            return None
        device_type = _memory_model_device or device.type
        for path in fast_paths:
            usable = path.unavailable is None or (_memory_model_device is not None and path.registered_anywhere)
            if path.device_type == device_type and usable:
                return path if _allowed_by_deterministic_mode(op, path, asked_by_name=False) else None
            if path.device_type == device_type and _memory_model_device is None and not path.off_on_purpose:
                _say_fallback(op, path)
        return None
    if impl == "reference":
        return None
    for path in fast_paths:
        if impl != path.name and impl not in path.aliases:
            continue
        if path.device_type != device.type and not (path.interpreted and device.type == "cpu"):
            interpreter = (" (or on CPU tensors when TRITON_INTERPRET=1 is set before import)"
                           if path.kernel == "Triton" else "")
            raise InvalidArgumentError(
                f"{op}: impl={impl!r} runs on {path.device_type} tensors{interpreter} but got a {device.type} "
                f"tensor; move the tensor to {path.device_type} or use impl='auto'"
            )
        if path.unavailable is not None:
            raise RuntimeError(f"{op}: impl={impl!r} is not available: {path.unavailable}")
        if not _allowed_by_deterministic_mode(op, path, asked_by_name=True):
            raise RuntimeError(
                f"{op}: impl={impl!r} adds with float atomics, whose bits may differ from run to run, and "
                "torch.use_deterministic_algorithms(True) is on; use impl='auto' (it runs the deterministic "
                "reference then) or impl='reference', or pass warn_only=True to use_deterministic_algorithms")
        return path
    check_impl_name(op, impl, fast_paths)
    raise AssertionError("unreachable: check_impl_name refuses what no path took")


def check_impl_name(op: str, impl: str, fast_paths: Sequence[FastPath]) -> None:
    """Refuse an ``impl`` that names none of ``op``'s paths (modules check it when built, not at their first call)."""
    if impl in ("auto", "reference") or any(impl == p.name or impl in p.aliases for p in fast_paths):
        return
    choices = ", ".join(repr(name) for name in ("auto", "reference", *(p.name for p in fast_paths)))
    raise InvalidArgumentError(f"{op}: unknown impl={impl!r}; choose one of {choices}")


_warned: set[tuple[str, str]] = set()


def _say_fallback(op: str, path: FastPath) -> None:
    """Once per op and device: "auto" runs the reference because the fast path cannot run here (a build without
    the extension, Triton missing), which would otherwise only show as slowness."""
    if (op, path.name) in _warned or torch.compiler.is_compiling():
        return
    _warned.add((op, path.name))
    warnings.warn(f"{op}: the {path.kernel} fast path for {path.device_type} tensors cannot run here, so "
                  f"impl='auto' runs the slower PyTorch reference: {path.unavailable} (`fastp2phd info` lists every "
                  f"path; FASTP2PHD_IMPL=reference picks the reference without this warning)", stacklevel=3)


def _allowed_by_deterministic_mode(op: str, path: FastPath, asked_by_name: bool) -> bool:
    """Whether ``path`` may run under the current deterministic-algorithms setting (warning where PyTorch would)."""
    if path.deterministic or not torch.are_deterministic_algorithms_enabled():
        return True
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if asked_by_name and not warn_only:
        return False
    if (op, path.name) not in _warned and not torch.compiler.is_compiling():
        _warned.add((op, path.name))
        warnings.warn(
            f"{op}: its {path.name} path ({path.kernel}) adds with float atomics, so under "
            "torch.use_deterministic_algorithms(True) " + (
                "it runs anyway (warn_only=True)" if warn_only else "impl='auto' runs the deterministic reference instead"),
            stacklevel=3)
    return warn_only


def triton_missing(exc: ImportError) -> str:
    """Why a Triton fast path is unavailable, in one sentence."""
    return f"the Triton kernels could not be imported ({exc}); install Triton with `pip install triton`"

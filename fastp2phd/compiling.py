"""``--compile``: run pix2pixHD's networks through torch.compile, and on CUDA capture them in CUDA graphs.

pix2pixHD trains at batch 1, where most layers take microseconds on a GPU and a step is bound by the
host: Python, dispatch and kernel launches. ``torch.compile`` fuses the networks' small ops, and its
``reduce-overhead`` mode records each compiled forward and backward in a CUDA graph that replays with
one launch. Every fastp2phd op is graph-safe for this (no host synchronisation inside an op), and the
networks compile without graph breaks (tests/test_compiling.py checks it with torch._dynamo.explain).

Modes: ``default`` (Inductor), ``reduce-overhead`` (Inductor + CUDA graphs; on the CPU the same as
``default``), ``max-autotune`` (also tunes kernels; slow to compile). Modules are compiled in place
(``nn.Module.compile``), so their state_dict keys, and the checkpoints, are the same as without it.

For inference (``freeze=True``: ``load_run``, ``test --compile``), calls without autograd compile with
Inductor's *freezing*: the weights become constants of the compiled code, so convolutions run on
oneDNN-prepacked weights and constant work folds away. Measured on a 2-core AMD EPYC (AVX512-BF16),
1024p generator at 512x1024, channels_last, one bench run: fp32 2440 ms eager, 2259 ms frozen; bf16
1271 ms eager, 1041 ms frozen (bench/REPORT.md, "inference precision"). Frozen code would silently keep (part of) the old weights after an in-place change
(``load_state_dict``, an optimizer step under ``no_grad``), so each call compares the weights' version
counters with those it froze, and compiles afresh when they changed.
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch
from torch import nn

from .errors import Pix2PixHDError

COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


class CompileError(Pix2PixHDError, ValueError):
    """A compiled run cannot go on as asked (say, a new image size under CUDA graphs); the message says why."""


def compiler_problem(device: torch.device, mode: str) -> str | None:
    """None when torch.compile works on ``device`` in ``mode``, else why not, in a few words."""
    try:
        probe = torch.compile(lambda t: t * 2 + 1, mode=mode, fullgraph=True, dynamic=False)
        if not torch.equal(probe(torch.ones(4, device=device)), torch.full((4,), 3.0, device=device)):
            return "a test function compiled to a wrong result"
    except Exception as exc:  # no C++ compiler, no Triton for the GPU, an unsupported Python, ...
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''}"
    finally:
        torch._dynamo.reset()
    return None


def compile_networks(modules: Iterable[nn.Module | None], mode: str, device: torch.device, *,
                     what: str = "training", freeze: bool = False) -> bool:
    """Compile each module in place for ``mode`` (``COMPILE_MODES``; "off" does nothing). Returns whether it did:
    where torch.compile cannot work here, one warning says why and the modules stay eager. ``freeze``: calls
    without autograd compile with the weights frozen in (inference; see the module's docstring)."""
    if mode not in COMPILE_MODES:
        raise CompileError(f"--compile must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    if mode == "off":
        return False
    problem = compiler_problem(device, mode)
    if problem is not None:
        warnings.warn(f"--compile {mode}: torch.compile does not work here ({problem}); {what} runs eagerly",
                      stacklevel=2)
        return False
    for module in modules:
        if module is not None:
            module.compile(mode=mode, fullgraph=True, dynamic=False)
            if freeze:
                module._compiled_call_impl = FrozenCall(module, module._compiled_call_impl)
    return True


class FrozenCall:
    """A compiled module's call that, without autograd, compiles with Inductor's freezing (``config.freezing``
    is read at compile time: ``torch.compile(options={"freezing": True})`` does not freeze). It remembers
    the weights' version counters and storage it froze, and when they changed, drops the compiled code
    (``torch._dynamo.reset()``: every compiled function recompiles on its next call) so the next call freezes
    the new weights instead of mixing old and new."""

    def __init__(self, module: nn.Module, compiled):
        self.module, self.compiled = module, compiled
        self.frozen: tuple | None = None

    def _weights(self) -> tuple:
        return tuple((t._version, t.data_ptr()) for t in (*self.module.parameters(), *self.module.buffers()))

    def __call__(self, *args: Any, **kwargs: Any):
        if torch.is_grad_enabled():  # (training, or a gradient through the network: nothing frozen)
            return self.compiled(*args, **kwargs)
        weights = self._weights()
        if self.frozen is not None and weights != self.frozen:
            torch._dynamo.reset()
        self.frozen = weights
        with torch._inductor.config.patch(freezing=True):
            return self.compiled(*args, **kwargs)


class OneSize:
    """CUDA graphs replay for the image size they were recorded at: under ``reduce-overhead`` on CUDA, a batch
    of another size would record new graphs (memory) and recompile. ``check(tensor)`` refuses it instead."""

    def __init__(self, mode: str, device: torch.device, compiled: bool):
        self.active = compiled and mode == "reduce-overhead" and device.type == "cuda"
        self.size: tuple[int, ...] | None = None

    def check(self, tensor: torch.Tensor) -> None:
        if not self.active:
            return
        size = tuple(tensor.shape)
        if self.size is None:
            self.size = size
        elif size != self.size:
            raise CompileError(
                f"--compile reduce-overhead records CUDA graphs for one input size, {_size(self.size)}, but this "
                f"batch is {_size(size)}: give every image one size (--resize_or_crop resize_and_crop, crop or "
                "scale_width_and_crop, and a full last batch), or use --compile default")


def _size(shape: tuple[int, ...]) -> str:
    return f"{shape[0]}x{shape[-2]}x{shape[-1]}"

"""Loads the optional C++/CUDA extension ``fastp2phd._C`` and says what it provides.

Importing ``_C`` runs its ``TORCH_LIBRARY`` registrations, which define the
``torch.ops.fastp2phd.*`` operators and their CPU/CUDA kernels. When the
extension is missing or fails to load, the package still works through the
PyTorch reference implementations; ``load_error`` says why.
"""
from __future__ import annotations

import torch

try:
    from fastp2phd import _C  # noqa: F401  (imported for its op registrations)

    load_error: str | None = None
except ImportError as exc:  # not built, or built against another torch
    load_error = (
        f"the C++ extension fastp2phd._C could not be loaded ({exc}); "
        "build it with `pip install --no-build-isolation -e .` in the repository"
    )


def is_loaded() -> bool:
    return load_error is None


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``fastp2phd::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    if load_error is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fastp2phd::{op}", dispatch_key)


def missing_kernel_reason(op: str, dispatch_key: str) -> str | None:
    """None when the kernel is built and registered, else one sentence saying why not."""
    if load_error is not None:
        return load_error
    if not has_kernel(op, dispatch_key):
        return (
            f"fastp2phd._C was built without {dispatch_key} kernels; rebuild it with a "
            f"{dispatch_key} toolchain (FORCE_CUDA=1 for CUDA)"
        )
    return None  # (a CUDA kernel needs a CUDA device too, but so does a CUDA tensor)

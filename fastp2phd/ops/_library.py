"""The fastp2phd operators: every schema, defined once, and which kernel serves each device.

``torch.ops.fastp2phd.<op>`` is one operator per op, with one schema (below), one fake
kernel and, where it is differentiable, one autograd formula (registered in the op's
module, beside its reference). Its kernels:

==================== =============================================== =====================================
op                   CPU                                             CUDA
==================== =============================================== =====================================
boundary_map         C++ (``csrc/``), else the PyTorch reference     CUDA C++, else the reference
instance_mean        C++, else the reference                         Triton (``kernels/``), else the reference
instance_norm_act    C++, else the reference                         Triton, else the reference
sparse_input_conv2d  C++, else the reference                         the reference (``F.conv2d``)
==================== =============================================== =====================================

The C++ extension registers its kernels (``TORCH_LIBRARY_IMPL``) when it is imported,
which happens here, after the schemas exist; the op modules register Python kernels
for whatever it did not provide. Under ``TRITON_INTERPRET=1`` the CPU kernels of the
Triton ops run the Triton kernels in Triton's interpreter (how the tests run them
without a GPU), and the C++ CPU kernels of the Triton ops are not used.
"""
from __future__ import annotations

import warnings

import torch

from .. import _extension

NAMESPACE = "fastp2phd"

SCHEMAS = {
    # (N, 1, H, W) ids -> (N, 1, H, W) 4-neighbour boundary map in ``dtype``.
    "boundary_map": "boundary_map(Tensor inst, ScalarType dtype) -> Tensor",
    # Every pixel of each (batch item, id) segment gets the segment's mean feature.
    "instance_mean": "instance_mean(Tensor feat, Tensor inst) -> Tensor",
    # (y, mean, rstd): y = act((x - mean) * rstd) per (n, c) plane; mean, rstd (N*C,).
    "instance_norm_act": "instance_norm_act(Tensor x, str activation, float negative_slope, float eps) "
                         "-> (Tensor, Tensor, Tensor)",
    # dx from dy, x and the forward's statistics.
    "instance_norm_act_backward": "instance_norm_act_backward(Tensor grad, Tensor x, Tensor mean, Tensor rstd, "
                                  "str activation, float negative_slope) -> Tensor",
    # dx from the gradients of all three outputs, differentiable (a composite of PyTorch ops where grad
    # mode is on): what the C++ autograd calls for double backward and gradients of mean or rstd.
    "instance_norm_act_input_grad": "instance_norm_act_input_grad(Tensor? grad_y, Tensor? grad_mean, "
                                    "Tensor? grad_rstd, Tensor x, Tensor mean, Tensor rstd, str activation, "
                                    "float negative_slope) -> Tensor",
    # F.conv2d(x, weight, bias), stride 1, no padding, for x with few nonzero channels per pixel.
    "sparse_input_conv2d": "sparse_input_conv2d(Tensor x, Tensor weight, Tensor? bias) -> Tensor",
}

LIBRARY = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS.values():
    LIBRARY.define(_schema)
_extension.load()  # the C++/CUDA kernels register themselves against the schemas above
# What the extension provides, noted before any Python kernel is registered.
_EXTENSION_KERNELS = frozenset(
    (name, key) for name in SCHEMAS for key in ("CPU", "CUDA", "Autograd")
    if _extension.is_loaded() and torch._C._dispatch_has_kernel_for_dispatch_key(f"{NAMESPACE}::{name}", key)
)


def op(name: str) -> torch._ops.OpOverload:
    return getattr(getattr(torch.ops, NAMESPACE), name).default


def extension_kernel_missing(name: str, dispatch_key: str) -> str | None:
    """None when fastp2phd._C provides ``name``'s kernel for ``dispatch_key``, else one sentence saying why not."""
    if not _extension.is_loaded():
        return _extension.load_error
    if (name, dispatch_key) not in _EXTENSION_KERNELS:
        return (f"fastp2phd._C was built without {dispatch_key} kernels; rebuild it with a {dispatch_key} "
                f"toolchain (FORCE_CUDA=1 for CUDA)")
    return None  # (a CUDA kernel needs a CUDA device too, but so does a CUDA tensor)


def register_kernel(name: str, dispatch_key: str, kernel, *, replace: bool = False) -> None:
    """Register ``kernel`` for ``dispatch_key`` ("CPU", "CUDA") where the extension provides none
    (or, with ``replace``, instead of the extension's)."""
    if (name, dispatch_key) not in _EXTENSION_KERNELS:
        LIBRARY.impl(name, kernel, dispatch_key)
    elif replace:
        with warnings.catch_warnings():  # (the override is the point)
            warnings.filterwarnings("ignore", message=".*[Oo]verrid")
            LIBRARY.impl(name, kernel, dispatch_key)

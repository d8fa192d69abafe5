"""instance_mean: instance-wise average pooling of features (pix2pixHD's encoder output).

Contract: ``feat`` (N, C, H, W) floating point and ``inst`` (N, 1, H, W) ids
(uint8..int64, or float holding whole numbers; ids may be sparse and large,
such as Cityscapes' class*1000+k). A segment is the set of pixels of one batch
item sharing one id; every pixel gets the mean of its segment's features,
channel by channel. The output has feat's dtype and memory format.

The op is linear and self-adjoint (a projection onto segment-wise constant
maps), so its backward is the same projection applied to the gradient.

Fast paths:

* ``"cpp"`` (CPU): per-thread hash tables over runs of equal ids, two passes; in
  the extension as ``torch.ops.fastp2phd.instance_mean``. Sums are accumulated in
  float64 across rows, so results do not depend on the thread count beyond the last bit.
* ``"triton"`` (CUDA): run sums inside pixel tiles, one float64 atomic per run
  (``fastp2phd/kernels/instance_mean.py``); registered as
  ``torch.ops.fastp2phd.instance_mean_triton``, whose CPU kernel is the reference
  (the Triton kernels under ``TRITON_INTERPRET=1``). With
  ``torch.use_deterministic_algorithms(True)`` its CUDA kernel runs the reference
  instead, since float atomics do not add in a fixed order.
"""
from __future__ import annotations

import torch

from .. import _extension
from .._triton import interpreted, load_kernels
from ._common import (check_instance_map, check_same_device, empty_like_format, exporting, memory_format_of,
                      tangents_may_flow)
from ._dispatch import FastPath, select


def instance_mean_reference(feat: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    """Vectorised PyTorch reference: unique ids -> scatter_add sums and counts -> gather.

    Accumulates in float32 at least (float64 for float64 input); differentiable
    through PyTorch's own scatter/gather backward.
    """
    N, C, H, W = feat.shape
    # One dense index space for the ids of all batch items; segments of different
    # items stay apart because sums are kept per item.
    ids, segment = torch.unique(inst.reshape(N, H * W), return_inverse=True)  # segment: (N, HW)
    num_ids = ids.numel()
    acc_dtype = torch.promote_types(feat.dtype, torch.float32)
    values = feat.reshape(N, C, H * W).to(acc_dtype)
    index = segment.unsqueeze(1).expand(N, C, H * W)
    sums = values.new_zeros(N, C, num_ids).scatter_add(2, index, values)
    counts = values.new_zeros(N, 1, num_ids).scatter_add(2, segment.unsqueeze(1), values.new_ones(N, 1, H * W))
    means = sums / counts.clamp_min(1)
    out = means.gather(2, index).reshape(N, C, H, W).to(feat.dtype)
    return out.contiguous(memory_format=memory_format_of(feat))


_kernels, _triton_unavailable = load_kernels("instance_mean")
_INTERPRETED = interpreted()


@torch.library.custom_op("fastp2phd::instance_mean_triton", mutates_args=())
def _triton_op(feat: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    if feat.is_cuda and torch.are_deterministic_algorithms_enabled():
        return instance_mean_reference(feat, inst)
    return _kernels.forward(feat, inst)


@_triton_op.register_kernel("cpu")
def _triton_op_cpu(feat, inst):
    return _kernels.forward(feat, inst) if _INTERPRETED else instance_mean_reference(feat, inst)


@_triton_op.register_fake
def _triton_op_fake(feat, inst):
    return empty_like_format(feat)


# The op is a linear projection P with P = P^T: backward applies it to the gradient, forward-mode
# AD to the tangent. Both call the op again, so the gradient is differentiable in turn.


def _autograd(op):
    """(run, backward, setup_context) for ``op``: backward and setup_context for ``register_autograd``,
    and ``run``, which calls ``op`` through that registered autograd, or, when tangents may flow
    (forward-mode AD, torch.func transforms, which the registered autograd does not serve: it would
    drop tangents), through an autograd.Function with the same backward, a jvp and a vmap rule."""

    def run(feat, inst):
        return ForwardADFunction.apply(feat, inst) if tangents_may_flow() else op(feat, inst)

    def save_inst(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    def project_grad(ctx, grad):
        (inst,) = ctx.saved_tensors
        return run(grad, inst), None

    class ForwardADFunction(torch.autograd.Function):
        @staticmethod
        def forward(feat, inst):
            return op(feat, inst)

        @staticmethod
        def setup_context(ctx, inputs, output):
            save_inst(ctx, inputs, output)
            ctx.save_for_forward(inputs[1])

        backward = staticmethod(project_grad)

        @staticmethod
        def jvp(ctx, feat_tangent, inst_tangent):
            (inst,) = ctx.saved_tensors
            return run(feat_tangent, inst)

        @staticmethod
        def vmap(info, in_dims, feat, inst):
            # Segments are per (batch item, id): the vmapped dimension joins the batch.
            def batched(t, dim):
                return t.movedim(dim, 0) if dim is not None else t.expand(info.batch_size, *t.shape)

            f, i = batched(feat, in_dims[0]), batched(inst, in_dims[1])
            return ForwardADFunction.apply(f.flatten(0, 1), i.flatten(0, 1)).unflatten(0, f.shape[:2]), 0

    return run, project_grad, save_inst


def instance_mean_exportable(feat: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    """The reference with no data-dependent shapes, for exporters (ONNX: TopK, ScatterElements, GatherElements).

    Segment indices come from sorting each item's ids and counting where the sorted ids change,
    so the tables have one slot per pixel rather than one per distinct id.
    """
    N, C, H, W = feat.shape
    keys = inst.reshape(N, H * W)
    order = torch.argsort(keys, dim=1)
    sorted_keys = keys.gather(1, order)
    changes = (sorted_keys[:, 1:] != sorted_keys[:, :-1]).to(torch.int64)
    rank = torch.cat([torch.zeros_like(changes[:, :1]), changes], dim=1).cumsum(1)  # segment, in sorted order
    segment = torch.zeros_like(rank).scatter(1, order, rank)  # segment of every pixel, in pixel order
    acc_dtype = torch.promote_types(feat.dtype, torch.float32)
    values = feat.reshape(N, C, H * W).to(acc_dtype)
    index = segment.unsqueeze(1).expand(N, C, H * W)
    sums = torch.zeros_like(values).scatter_add(2, index, values)
    counts = torch.zeros_like(values[:, :1]).scatter_add(2, segment.unsqueeze(1), torch.ones_like(values[:, :1]))
    means = sums / counts.clamp_min(1)
    return means.gather(2, index).reshape(N, C, H, W).to(feat.dtype)


def _instance_mean_extension(feat: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    return torch.ops.fastp2phd.instance_mean(feat, inst)


_run_triton, _triton_backward, _triton_setup = _autograd(_triton_op)
_triton_op.register_autograd(_triton_backward, setup_context=_triton_setup)
_run_cpp, _cpp_backward, _cpp_setup = _autograd(_instance_mean_extension)
if _extension.is_loaded():
    torch.library.register_fake("fastp2phd::instance_mean")(lambda feat, inst: empty_like_format(feat))
    torch.library.register_autograd("fastp2phd::instance_mean", _cpp_backward, setup_context=_cpp_setup)

FAST_PATHS = (
    FastPath("cpp", "cpu", _extension.missing_kernel_reason("instance_mean", "CPU"), _run_cpp),
    FastPath("triton", "cuda", _triton_unavailable, _run_triton, interpreted=_INTERPRETED, registered_anywhere=True),
)


def instance_mean(feat: torch.Tensor, inst: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Replace every pixel's features by the mean over its (batch item, instance id) segment.

    ``impl``: "auto", "reference", "cpp" (CPU) or "triton" (CUDA; CPU under TRITON_INTERPRET=1).
    Differentiable with respect to ``feat``.
    """
    if not isinstance(feat, torch.Tensor) or feat.dim() != 4:
        shape = tuple(feat.shape) if isinstance(feat, torch.Tensor) else type(feat).__name__
        raise ValueError(f"instance_mean: feat must be an (N, C, H, W) tensor, got {shape}")
    if not feat.is_floating_point():
        raise TypeError(f"instance_mean: feat must be floating point, got {feat.dtype}; convert it with .float()")
    check_same_device("instance_mean", feat=feat, inst=inst)
    check_instance_map("instance_mean", inst)
    if feat.shape[0] != inst.shape[0] or feat.shape[2:] != inst.shape[2:]:
        raise ValueError(
            f"instance_mean: feat {tuple(feat.shape)} and inst {tuple(inst.shape)} must share batch size, "
            "height and width; resize the instance map (nearest neighbour) to the feature size"
        )
    if feat.numel() == 0:
        return empty_like_format(feat)
    path = select("instance_mean", impl, feat.device, FAST_PATHS)
    if path is None:
        return instance_mean_exportable(feat, inst) if exporting() else instance_mean_reference(feat, inst)
    return path.run(feat, inst)

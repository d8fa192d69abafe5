"""instance_mean: instance-wise average pooling of features (pix2pixHD's encoder output).

Contract: ``feat`` (N, C, H, W) floating point and ``inst`` (N, 1, H, W) ids
(uint8..int64, or float holding whole numbers; ids may be sparse and large,
such as Cityscapes' class*1000+k). A segment is the set of pixels of one batch
item sharing one id; every pixel gets the mean of its segment's features,
channel by channel. The output has feat's dtype and memory format.

The op is linear and self-adjoint (a projection onto segment-wise constant
maps), so its backward is the same projection applied to the gradient.

Both fast paths are kernels of one operator, ``torch.ops.fastp2phd.instance_mean``:

* ``"cpp"``, its CPU kernel (the C++ extension): per-thread hash tables over runs of
  equal ids, two passes. Sums are accumulated in float64 across rows, so results do
  not depend on the thread count beyond the last bit.
* ``"triton"``, its CUDA kernel (``kernels/instance_mean.py``): run sums inside pixel
  tiles, one float64 atomic per run. With ``torch.use_deterministic_algorithms(True)``
  it runs the reference instead, since float atomics do not add in a fixed order.

Where a kernel is missing (no extension, no Triton) the operator runs the reference;
under ``TRITON_INTERPRET=1`` its CPU kernel runs the Triton kernels in the interpreter.
"""
from __future__ import annotations

import torch

from ._common import (check_instance_map, check_same_device, empty_like_format, exporting, memory_format_of,
                      tangents_may_flow)
from ._dispatch import FastPath, select, triton_missing
from ._library import extension_kernel_missing, op, register_kernel


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


try:
    from ..kernels import INTERPRETED as _INTERPRETED
    from ..kernels import instance_mean as _kernels
except ImportError as exc:  # Triton missing or broken
    _kernels, _INTERPRETED, _TRITON_MISSING = None, False, triton_missing(exc)
else:
    _TRITON_MISSING = None


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


# ----------------------------------------------------------------------------- the operator


def _cuda_kernel(feat: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    # Float atomics do not add in a fixed order: deterministic mode gets the reference.
    if _kernels is None or torch.are_deterministic_algorithms_enabled():
        return instance_mean_reference(feat, inst)
    return _kernels.forward(feat, inst)


_OP = op("instance_mean")
register_kernel("instance_mean", "CUDA", _cuda_kernel)
# The C++ CPU kernel where the extension has one; the reference where not; the Triton kernels when interpreted.
register_kernel("instance_mean", "CPU", _kernels.forward if _INTERPRETED else instance_mean_reference,
                replace=_INTERPRETED)


@torch.library.register_fake("fastp2phd::instance_mean")
def _instance_mean_fake(feat: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    torch._check(feat.dim() == 4, lambda: f"instance_mean: feat must be (N, C, H, W), got {tuple(feat.shape)}")
    torch._check(feat.is_floating_point(), lambda: f"instance_mean: feat must be floating point, got {feat.dtype}")
    torch._check(inst.dim() == 4 and inst.shape[1] == 1,
                 lambda: f"instance_mean: inst must have shape (N, 1, H, W), got {tuple(inst.shape)}")
    torch._check(feat.shape[0] == inst.shape[0] and feat.shape[2] == inst.shape[2] and feat.shape[3] == inst.shape[3],
                 lambda: f"instance_mean: feat {tuple(feat.shape)} and inst {tuple(inst.shape)} must share batch, "
                         "height and width")
    torch._check(feat.device == inst.device,
                 lambda: f"instance_mean: feat is on {feat.device} and inst on {inst.device}; use one device")
    return empty_like_format(feat)


# The op is a linear projection P with P = P^T: backward applies it to the gradient, forward-mode
# AD to the tangent. Both call the op again, so the gradient is differentiable in turn.


def instance_mean_op(feat: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    """The operator through its registered autograd, or, when tangents may flow (forward-mode AD,
    torch.func transforms, which the registered autograd does not serve: it would drop tangents),
    through an autograd.Function with the same backward, a jvp and a vmap rule."""
    return _ForwardADFunction.apply(feat, inst) if tangents_may_flow() else _OP(feat, inst)


def _save_inst(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _project_grad(ctx, grad):
    (inst,) = ctx.saved_tensors
    return instance_mean_op(grad, inst), None


torch.library.register_autograd("fastp2phd::instance_mean", _project_grad, setup_context=_save_inst)


class _ForwardADFunction(torch.autograd.Function):
    @staticmethod
    def forward(feat, inst):
        return _OP(feat, inst)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _save_inst(ctx, inputs, output)
        ctx.save_for_forward(inputs[1])

    backward = staticmethod(_project_grad)

    @staticmethod
    def jvp(ctx, feat_tangent, inst_tangent):
        (inst,) = ctx.saved_tensors
        return instance_mean_op(feat_tangent, inst)

    @staticmethod
    def vmap(info, in_dims, feat, inst):
        # Segments are per (batch item, id): the vmapped dimension joins the batch.
        def batched(t, dim):
            return t.movedim(dim, 0) if dim is not None else t.expand(info.batch_size, *t.shape)

        f, i = batched(feat, in_dims[0]), batched(inst, in_dims[1])
        return _ForwardADFunction.apply(f.flatten(0, 1), i.flatten(0, 1)).unflatten(0, f.shape[:2]), 0


FAST_PATHS = (
    FastPath("cpp", "cpu", "the interpreter process (TRITON_INTERPRET=1) runs the Triton kernels on the CPU"
             if _INTERPRETED else extension_kernel_missing("instance_mean", "CPU"), instance_mean_op),
    FastPath("triton", "cuda", _TRITON_MISSING, instance_mean_op, interpreted=_INTERPRETED, registered_anywhere=True),
)


def instance_mean(feat: torch.Tensor, inst: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Instance-wise average pooling: every pixel gets the mean feature of its instance.

    ``feat``: (N, C, H, W) float16, bfloat16, float32 or float64. ``inst``: (N, 1, H, W) ids,
    uint8..int64, or float holding whole numbers within int64's range (sparse and large ids,
    such as Cityscapes' class*1000+k, are fine). A segment is the set of pixels of one batch
    item that share an id; each channel is averaged over its segment (accumulated in float32
    at least). Returns a new tensor of feat's dtype and layout (channels_last stays so); any
    strided views are accepted.

    Differentiable in ``feat`` in every mode (backward, double backward, forward-mode AD,
    vmap): the op is a projection, so its gradient is the same pooling of the gradient.
    ``impl``: "auto", "reference" (PyTorch), "cpp" (CPU) or "triton" (CUDA; CPU tensors
    under TRITON_INTERPRET=1); a named path that cannot run here raises.
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

"""instance_mean: instance-wise average pooling of features (pix2pixHD's encoder output).

Contract: ``feat`` (N, C, H, W) floating point and ``inst`` (N, 1, H, W) ids
(uint8..int64, or float holding whole numbers; ids may be sparse and large,
such as Cityscapes' class*1000+k). A segment is the set of pixels of one batch
item sharing one id; every pixel gets the mean of its segment's features,
channel by channel. The output has feat's dtype and memory format.

The op is linear and self-adjoint (a projection onto segment-wise constant
maps), so its backward is the same projection applied to the gradient.

The reference (``instance_mean_reference``) numbers each item's segments by sorting its
ids (``segment_index``), sums with scatter_add in float64 and gathers the means back:
no shape depends on the data, so one reference serves eager use, vmap, torch.compile
and exporters (ONNX included).

Both fast paths are kernels of one operator, ``torch.ops.fastp2phd.instance_mean``:

* ``"cpu"`` (earlier ``"cpp"``), its CPU kernel (the C++ extension): per-thread hash tables over runs of
  equal ids, two passes. Sums are accumulated in float64 across rows, so results do
  not depend on the thread count beyond the last bit.
* ``"cuda"`` (earlier ``"triton"``), its CUDA kernel (Triton, ``kernels/instance_mean.py``): segments numbered by
  ``segment_index`` (on the device, so the op never waits for it and a CUDA graph can
  hold it), run sums inside pixel tiles, one float64 atomic per run. Float atomics do
  not add in a fixed order, so under ``torch.use_deterministic_algorithms(True)`` ``"auto"``
  runs the reference with a warning, and ``impl="cuda"`` raises (see ``_dispatch``).

Where a kernel is missing (no extension, no Triton) the operator runs the reference;
under ``TRITON_INTERPRET=1`` its CPU kernel runs the Triton kernels in the interpreter.
"""
from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from ._common import (check_float, check_instance_map, check_same_device, empty_like_format, memory_format_of,
                      tangents_may_flow)
from ._dispatch import FastPath, select, triton_missing
from ._library import extension_kernel_missing, op, register_kernel


def segment_index(inst: torch.Tensor) -> torch.Tensor:
    """(N, H*W) int64: each pixel's segment, numbered 0, 1, ... in order of id within its batch item.

    Sorting an item's ids puts equal ids side by side, and counting where the sorted ids change
    numbers them. Nothing has a data-dependent size (the numbers are below H*W however many ids
    there are), so this serves vmap, exporters (ONNX: TopK, CumSum, ScatterElements), torch.compile
    and the Triton launcher, which must not wait for the GPU to learn how many ids there are.
    """
    N, _, H, W = inst.shape
    sorted_ids, order = torch.sort(inst.reshape(N, H * W), dim=1)
    changes = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    first = torch.zeros_like(sorted_ids[:, :1], dtype=torch.bool)  # the first pixel starts segment 0
    rank = torch.cat([first, changes], dim=1).cumsum(1, dtype=torch.int64)
    return torch.zeros_like(order).scatter(1, order, rank)  # back to pixel order (out of place: vmap batches it)


def instance_mean_reference(feat: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    """Vectorised PyTorch reference: segment indices -> scatter_add sums and counts -> gather.

    Sums in float64 whatever feat's dtype, rounded once to feat's dtype: this is the exact path
    (float32 sums were off by 1.7e-3 on a one-segment 1024x1024 map). Differentiable through
    PyTorch's own scatter/gather backward; no data-dependent shapes, so it also runs under vmap,
    torch.export, ONNX export and torch.compile(fullgraph=True).
    """
    N, C, H, W = feat.shape
    segment = segment_index(inst).unsqueeze(1)  # (N, 1, HW)
    index = segment.expand(N, C, H * W)
    values = feat.reshape(N, C, H * W).to(torch.float64)
    sums = torch.zeros_like(values).scatter_add(2, index, values)  # out of place: vmap may batch index alone
    ones = torch.ones_like(segment, dtype=torch.float64)
    counts = torch.zeros_like(ones).scatter_add_(2, segment, ones)
    means = sums / counts.clamp_min(1)  # slots of no segment divide by 1 and are never read
    # Gathered in float64: gather's backward sums the gradient of each segment, in the gathered dtype.
    out = means.gather(2, index).to(feat.dtype).reshape(N, C, H, W)
    return out.contiguous(memory_format=memory_format_of(feat))


try:
    from ..kernels import INTERPRETED as _INTERPRETED
    from ..kernels import instance_mean as _kernels
except ImportError as exc:  # Triton missing or broken
    _kernels, _INTERPRETED, _TRITON_MISSING = None, False, triton_missing(exc)
else:
    _TRITON_MISSING = None


# ----------------------------------------------------------------------------- the operator


def _triton_kernel(feat: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    return _kernels.forward(feat, segment_index(inst))


def _cuda_kernel(feat: torch.Tensor, inst: torch.Tensor) -> torch.Tensor:
    # The operator called directly (not through select): deterministic mode gets the reference here too.
    strict = torch.are_deterministic_algorithms_enabled() and not torch.is_deterministic_algorithms_warn_only_enabled()
    if _kernels is None or strict:
        return instance_mean_reference(feat, inst)
    return _triton_kernel(feat, inst)


_OP = op("instance_mean")
register_kernel("instance_mean", "CUDA", _cuda_kernel)
# The C++ CPU kernel where the extension has one; the reference where not; the Triton kernels when interpreted.
register_kernel("instance_mean", "CPU", _triton_kernel if _INTERPRETED else instance_mean_reference,
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
    FastPath("cpu", "C++", "the interpreter process (TRITON_INTERPRET=1) runs the Triton kernels on the CPU"
             if _INTERPRETED else extension_kernel_missing("instance_mean", "CPU"), instance_mean_op, aliases=("cpp",),
             off_on_purpose=_INTERPRETED),
    FastPath("cuda", "Triton", _TRITON_MISSING, instance_mean_op, aliases=("triton",), interpreted=_INTERPRETED,
             registered_anywhere=True, deterministic=_INTERPRETED),  # the interpreter runs programs in order
)


def instance_mean(feat: torch.Tensor, inst: torch.Tensor, *, impl: str = "auto") -> torch.Tensor:
    """Instance-wise average pooling: every pixel gets the mean feature of its instance.

    ``feat``: (N, C, H, W) float16, bfloat16, float32 or float64. ``inst``: (N, 1, H, W) ids,
    uint8..int64, or float holding whole numbers within int64's range (sparse and large ids,
    such as Cityscapes' class*1000+k, are fine). A segment is the set of pixels of one batch
    item that share an id; each channel is averaged over its segment (summed in float64). Returns
    a new tensor of feat's dtype and layout (channels_last stays so); any strided views are
    accepted. Empty inputs give an empty result that autograd still connects to ``feat``.

    Differentiable in ``feat`` in every mode (backward, double backward, forward-mode AD,
    vmap): the op is a projection, so its gradient is the same pooling of the gradient.
    ``impl``: "auto", "reference" (PyTorch), "cpu" (C++; earlier "cpp") or "cuda" (Triton, earlier
    "triton"; CPU tensors too under TRITON_INTERPRET=1); a named path that cannot run here raises.
    """
    if not isinstance(feat, torch.Tensor) or feat.dim() != 4:
        shape = tuple(feat.shape) if isinstance(feat, torch.Tensor) else type(feat).__name__
        raise InvalidArgumentError(f"instance_mean: feat must be an (N, C, H, W) tensor, got {shape}")
    check_float("instance_mean", "feat", feat)
    check_same_device("instance_mean", feat=feat, inst=inst)
    check_instance_map("instance_mean", inst)
    if feat.shape[0] != inst.shape[0] or feat.shape[2:] != inst.shape[2:]:
        raise InvalidArgumentError(
            f"instance_mean: feat {tuple(feat.shape)} and inst {tuple(inst.shape)} must share batch size, "
            "height and width; resize the instance map (nearest neighbour) to the feature size"
        )
    path = select("instance_mean", impl, feat.device, FAST_PATHS)
    if feat.numel() == 0:  # nothing to pool; a clone keeps feat's strides and stays in its autograd graph
        return feat.clone()
    if path is None:
        return instance_mean_reference(feat, inst)
    return path.run(feat, inst)

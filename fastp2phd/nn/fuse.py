"""fuse_modules: run the InstanceNorm2d + activation pairs of any model as one op, changing nothing else.

Why no module is replaced: rewriting the pair (InstanceNorm2d, ReLU) into (InstanceNormAct2d,
Identity), as ``torch.ao.quantization.fuse_modules`` does, keeps state_dict keys but changes what
``seq[0]`` and ``seq[:k]`` mean, and what hooks added later see (issue 18, finding 6). Detecting such
uses to leave a Sequential unfused cannot be done reliably: any code, now or later, may index into
it. So fuse_modules switches the class of a module to a subclass instead, and keeps its children:

* An ``nn.Sequential`` (or a subclass that keeps Sequential's ``forward``) that holds an InstanceNorm2d
  becomes a ``FusedSequential``. Only its ``forward`` differs: at every call it runs each
  (InstanceNorm2d, ReLU | LeakyReLU) pair, and each norm with no activation after it, as one
  ``ops.instance_norm_act``. Indexing, slicing, state_dict, printing, hooks and children added later
  keep their meaning: ``seq[0]`` is still the norm alone.
* An InstanceNorm2d anywhere else becomes a ``FusedInstanceNorm2d``: still an ``nn.InstanceNorm2d``,
  normalising through the op with activation "none". Only a Sequential's order is known, so a
  ModuleList or a custom ``forward`` keeps its activation as a module of its own.

The op is taken only where it is exact; this is checked at every call. The norm must be exactly an
InstanceNorm2d with no affine parameters or running statistics and a finite eps >= 0. The activation
must be exactly a ReLU, or a LeakyReLU with a finite slope. Neither may have hooks, and no global
module hooks may be set. The input must be a 3D or 4D float tensor with ``num_features`` channels and
more than one pixel per plane. Otherwise the modules run themselves. The result then differs from the
unfused model by the op's rounding only; ``impl="reference"`` is bit-identical.

``torch.jit.script`` runs PyTorch's own modules, so a scripted model needs nothing of fastp2phd.
``torch.fx.symbolic_trace`` records each fused pair as one ``fused_instance_norm_act`` call.
``torch.save`` and ``deepcopy`` keep the fused classes. pix2pixHD's own networks are built with
InstanceNormAct2d (``models/layers.py``) and do not need any of this.
"""
from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_globals

from ..errors import InvalidArgumentError
from .. import ops
from ..ops._dispatch import check_impl_name
from ..ops.instance_norm_act import FAST_PATHS

__all__ = ["FusedInstanceNorm2d", "FusedSequential", "fuse_modules", "fused_instance_norm_act"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


# ----------------------------------------------------------------------------- run-time checks


def _has_hooks(module: nn.Module) -> bool:
    """Hooks of the module, or a forward of its own (set on the instance)."""
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks or "forward" in module.__dict__)


def _global_hooks() -> bool:
    return any(getattr(_module_globals, name, None) for name in _GLOBAL_HOOKS)


def _is_norm(module: nn.Module | None) -> bool:
    """An InstanceNorm2d (plain or FusedInstanceNorm2d) without affine, running statistics or hooks."""
    return (_base(module) is nn.InstanceNorm2d and _plain_norm_state(module) and not _has_hooks(module))


def _plain_norm_state(norm: nn.InstanceNorm2d) -> bool:
    """No affine parameters or running statistics (flags and tensors), and a finite eps >= 0."""
    eps, parameters, buffers = norm.eps, norm._parameters, norm._buffers
    return (not norm.affine and not norm.track_running_stats
            and parameters.get("weight") is None and parameters.get("bias") is None
            and buffers.get("running_mean") is None and buffers.get("running_var") is None
            and isinstance(eps, (int, float)) and 0 <= eps < math.inf)


def _activation(module: nn.Module | None) -> tuple[str, float] | None:
    """("relu" | "leaky_relu", slope) for a hook-free ReLU or LeakyReLU, else None."""
    if type(module) is nn.ReLU and not _has_hooks(module):
        return "relu", 0.0
    if type(module) is nn.LeakyReLU and not _has_hooks(module):
        slope = module.negative_slope
        if isinstance(slope, (int, float)) and not isinstance(slope, bool) and -math.inf < slope < math.inf:
            return "leaky_relu", float(slope)
    return None


def _op_fits(x: Tensor, num_features: int) -> bool:
    """Whether the op gives what nn.InstanceNorm2d gives, warnings and errors included."""
    return (x.dim() in (3, 4) and x.dtype in _DTYPES and x.shape[-3] == num_features
            and x.shape[-1] * x.shape[-2] > 1 and x.numel() > 0)


def _run_op(x: Tensor, activation: str, negative_slope: float, eps: float, impl: str) -> Tensor:
    if x.dim() == 3:
        return ops.instance_norm_act(x[None], activation, negative_slope, float(eps), impl=impl)[0]
    return ops.instance_norm_act(x, activation, negative_slope, float(eps), impl=impl)


def fused_instance_norm_act(
    x: Tensor, num_features: int, eps: float, activation: str, negative_slope: float, impl: str
) -> Tensor:
    """``act(nn.InstanceNorm2d(num_features, eps=eps)(x))`` through ``ops.instance_norm_act`` where that is
    exact, through the modules otherwise. torch.fx records it as one call (``torch.fx.wrap`` below)."""
    if _op_fits(x, num_features):
        return _run_op(x, activation, negative_slope, eps, impl)
    y = nn.InstanceNorm2d(num_features, eps=eps)(x)
    if activation == "relu":
        return torch.relu(y)
    if activation == "leaky_relu":
        return nn.functional.leaky_relu(y, negative_slope)
    return y


torch.fx.wrap("fused_instance_norm_act")


def _restore(base: type, impl: str) -> nn.Module:
    """Unpickling and deepcopy: a bare instance of the fused class of ``base`` (pickle then sets its state)."""
    cls = _fused_class(base, impl)
    return cls.__new__(cls)


class _Fused:
    """What the fused classes share: the class they replace, the impl, printing and pickling."""

    _fastp2phd_base = nn.Module
    _fastp2phd_impl = "auto"

    def _get_name(self) -> str:  # prints as the class it replaces
        get_name = self._fastp2phd_base._get_name
        return self._fastp2phd_base.__name__ if get_name is nn.Module._get_name else get_name(self)

    def __reduce__(self):
        return _restore, (self._fastp2phd_base, self._fastp2phd_impl), self.__getstate__()


# ----------------------------------------------------------------------------- the fused classes


class FusedSequential(_Fused, nn.Sequential):
    """An nn.Sequential that runs its (InstanceNorm2d, activation) pairs as one op. See the module docstring."""

    _fastp2phd_base = nn.Sequential

    def forward(self, input):
        if torch.jit.is_scripting():
            for module in self:
                input = module(input)
            return input
        return self._forward_fused(input)

    @torch.jit.unused
    def _forward_fused(self, input):
        modules = list(self._modules.values())
        fusable = not _global_hooks()
        tracing = isinstance(input, torch.fx.Proxy)  # torch.fx: record one call, which checks the input
        i = 0
        while i < len(modules):
            module = modules[i]
            i += 1
            if not (fusable and (tracing or isinstance(input, Tensor)) and _is_norm(module)):
                input = module(input)
                continue
            act = _activation(modules[i] if i < len(modules) else None)
            activation, slope = act if act is not None else ("none", 0.0)
            if tracing:
                input = fused_instance_norm_act(input, module.num_features, module.eps, activation, slope,
                                                self._fastp2phd_impl)
            elif _op_fits(input, module.num_features):
                input = _run_op(input, activation, slope, module.eps, self._fastp2phd_impl)
            else:
                input = module(input)
                continue  # the activation, if any, runs as a module of its own
            if act is not None:
                i += 1  # the activation ran in the op
        return input


class FusedInstanceNorm2d(_Fused, nn.InstanceNorm2d):
    """An nn.InstanceNorm2d that normalises through ``ops.instance_norm_act`` where that is exact."""

    _fastp2phd_base = nn.InstanceNorm2d

    def forward(self, input: Tensor) -> Tensor:
        if torch.jit.is_scripting():  # nn.InstanceNorm2d.forward, which TorchScript cannot call from here
            self._check_input_dim(input)
            if input.size(input.dim() - 3) != self.num_features:
                if self.affine:
                    raise InvalidArgumentError(
                        f"expected input's size at dim={input.dim() - 3} to match num_features"
                        f" ({self.num_features}), but got: {input.size(input.dim() - 3)}."
                    )
                warnings.warn(f"input's size at dim={input.dim() - 3} does not match num_features. "
                              "You can silence this warning by not passing in num_features, "
                              "which is not used because affine=False")
            if input.dim() == 3:
                return self._apply_instance_norm(input.unsqueeze(0)).squeeze(0)
            return self._apply_instance_norm(input)
        return self._forward_fused(input)

    @torch.jit.unused
    def _forward_fused(self, input: Tensor) -> Tensor:
        if isinstance(input, torch.fx.Proxy) and _plain_norm_state(self):
            return fused_instance_norm_act(input, self.num_features, self.eps, "none", 0.0, self._fastp2phd_impl)
        if isinstance(input, Tensor) and _plain_norm_state(self) and _op_fits(input, self.num_features):
            return _run_op(input, "none", 0.0, self.eps, self._fastp2phd_impl)
        return nn.InstanceNorm2d.forward(self, input)


_CLASSES: dict[tuple[type, str], type] = {
    (nn.Sequential, "auto"): FusedSequential,
    (nn.InstanceNorm2d, "auto"): FusedInstanceNorm2d,
}


def _fused_class(base: type, impl: str) -> type:
    """The fused class of ``base`` (nn.InstanceNorm2d, nn.Sequential or a subclass of it that keeps
    Sequential.forward) for ``impl``. Classes other than the two above are made once and cached. All
    their instances pickle through ``_restore``, so a class need not be importable by name."""
    cls = _CLASSES.get((base, impl))
    if cls is None:
        fused = FusedInstanceNorm2d if issubclass(base, nn.InstanceNorm2d) else FusedSequential
        bases = (fused,) if base is fused._fastp2phd_base else (fused, base)
        cls = type(base.__name__, bases, {"_fastp2phd_base": base, "_fastp2phd_impl": impl,
                                          "__module__": __name__,
                                          "__qualname__": f"{fused.__name__}_{len(_CLASSES)}"})
        _CLASSES[(base, impl)] = cls
    return cls


# ----------------------------------------------------------------------------- fuse_modules


def _base(module: nn.Module) -> type:
    return getattr(type(module), "_fastp2phd_base", type(module))


def _runs_in_registration_order(module: nn.Module) -> bool:
    base = _base(module)
    return issubclass(base, nn.Sequential) and base.forward is nn.Sequential.forward


def _eligible_norm(module: nn.Module | None) -> bool:
    return _base(module) is nn.InstanceNorm2d and _plain_norm_state(module) and "forward" not in module.__dict__


def fuse_modules(model: nn.Module, impl: str = "auto") -> nn.Module:
    """Run every eligible InstanceNorm2d of ``model`` (and the activation after it) as one fused op, in place.

    Returns ``model``. No module is replaced and no state_dict key changes: the class of each
    Sequential that holds an InstanceNorm2d, and of each InstanceNorm2d held elsewhere, is
    switched to a subclass that takes ``ops.instance_norm_act`` where the run-time check allows
    (module docstring). ``impl`` is passed to the op ("auto" by default). Calling it again
    only changes ``impl``.
    """
    if not isinstance(impl, str):
        raise TypeError(f"fuse_modules: impl must be a string, got {type(impl).__name__}")
    check_impl_name("fuse_modules", impl, FAST_PATHS)
    modules = list(model.modules())
    in_sequentials = set()
    for parent in modules:
        if _runs_in_registration_order(parent):
            norms = [child for child in parent.children() if _eligible_norm(child)]
            in_sequentials.update(map(id, norms))
            if norms:
                parent.__class__ = _fused_class(_base(parent), impl)
    for module in modules:
        if id(module) not in in_sequentials and _eligible_norm(module):
            module.__class__ = _fused_class(nn.InstanceNorm2d, impl)
    return model

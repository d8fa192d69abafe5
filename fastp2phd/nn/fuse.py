"""fuse_modules: rewrite InstanceNorm2d + activation pairs of any model into InstanceNormAct2d.

Follows ``torch.ao.quantization.fuse_modules``: in an ``nn.Sequential``, the pair
(InstanceNorm2d, ReLU | LeakyReLU) becomes (InstanceNormAct2d, Identity), so the
index of every later module, and therefore every state_dict key, is unchanged.

The rewrite changes nothing but speed:

* Pairs are fused only inside a plain ``nn.Sequential`` (or a subclass that keeps
  its ``forward``), where children run in registration order. Anywhere else (a
  Sequential subclass with its own ``forward``, a ModuleList, a custom module)
  the order is unknown, so a norm is replaced alone, by InstanceNormAct2d("none").
* A norm or activation with hooks is left as it is (a hooked activation lets its
  norm be replaced alone): the hooks would no longer see what they saw before.
* Only norms without affine parameters and running statistics, with eps >= 0, are
  rewritten: the others carry state or behave differently in eval mode.
* New modules take the ``training`` flag of the module they replace.

One thing does change: slicing a fused Sequential between a norm and its
activation (``seq[:k]``, where ``seq[k]`` was the activation) now returns the
activated output, because the activation moved into the norm's slot. Slice
before fusing, or don't fuse, where you need pre-activation features. Global
module hooks (``torch.nn.modules.module.register_module_forward_hook``) see the
new modules.
"""
from __future__ import annotations

import math

from torch import nn

from .norm_act import InstanceNormAct2d

_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU)


def _has_hooks(module: nn.Module) -> bool:
    return any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"))


def _fusable_norm(module: nn.Module) -> bool:
    return (type(module) is nn.InstanceNorm2d and not module.affine and not module.track_running_stats
            and math.isfinite(module.eps) and module.eps >= 0 and not _has_hooks(module))


def _fusable_activation(module: nn.Module | None) -> bool:
    return type(module) in _ACTIVATIONS and not _has_hooks(module)


def _runs_in_registration_order(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _fused(norm: nn.InstanceNorm2d, act: nn.Module | None, impl: str) -> InstanceNormAct2d:
    if isinstance(act, nn.ReLU):
        fused = InstanceNormAct2d(norm.num_features, "relu", eps=norm.eps, impl=impl)
    elif isinstance(act, nn.LeakyReLU):
        fused = InstanceNormAct2d(norm.num_features, "leaky_relu", act.negative_slope, eps=norm.eps, impl=impl)
    else:
        fused = InstanceNormAct2d(norm.num_features, "none", eps=norm.eps, impl=impl)
    return fused.train(norm.training)


def fuse_modules(model: nn.Module, impl: str = "auto") -> nn.Module:
    """Fuse every eligible InstanceNorm2d (and the activation after it) in ``model``, in place.

    Returns ``model``. ``impl`` is passed to the new modules ("auto" by default).
    """
    for parent in list(model.modules()):
        names = list(parent._modules)
        ordered = _runs_in_registration_order(parent)
        for i, name in enumerate(names):
            child = parent._modules[name]
            if child is None or not _fusable_norm(child):
                continue
            act = None
            if ordered and i + 1 < len(names) and _fusable_activation(parent._modules[names[i + 1]]):
                act = parent._modules[names[i + 1]]
                parent._modules[names[i + 1]] = nn.Identity().train(act.training)
            parent._modules[name] = _fused(child, act, impl)
    return model

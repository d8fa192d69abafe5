"""fuse_modules: rewrite InstanceNorm2d + activation pairs of any model into InstanceNormAct2d.

Follows ``torch.ao.quantization.fuse_modules``: in an ``nn.Sequential``, the pair
(InstanceNorm2d, ReLU | LeakyReLU) becomes (InstanceNormAct2d, Identity), so the
index of every later module, and therefore every state_dict key, is unchanged.
An InstanceNorm2d with no activation after it becomes InstanceNormAct2d("none").
Only norms without affine parameters and running statistics are rewritten:
the others carry state or behave differently in eval mode.
"""
from __future__ import annotations

from torch import nn

from .norm_act import InstanceNormAct2d


def _fusable(module: nn.Module) -> bool:
    return type(module) is nn.InstanceNorm2d and not module.affine and not module.track_running_stats


def _fused(norm: nn.InstanceNorm2d, act: nn.Module | None, impl: str) -> InstanceNormAct2d:
    if isinstance(act, nn.ReLU):
        return InstanceNormAct2d(norm.num_features, "relu", eps=norm.eps, impl=impl)
    if isinstance(act, nn.LeakyReLU):
        return InstanceNormAct2d(norm.num_features, "leaky_relu", act.negative_slope, eps=norm.eps, impl=impl)
    return InstanceNormAct2d(norm.num_features, "none", eps=norm.eps, impl=impl)


def fuse_modules(model: nn.Module, impl: str = "auto") -> nn.Module:
    """Fuse every eligible InstanceNorm2d (and the activation after it) in ``model``, in place.

    Returns ``model``. ``impl`` is passed to the new modules ("auto" by default).
    """
    for parent in list(model.modules()):
        names = list(parent._modules)
        for i, name in enumerate(names):
            child = parent._modules[name]
            if child is None or not _fusable(child):
                continue
            act = None
            if isinstance(parent, nn.Sequential) and i + 1 < len(names):
                following = parent._modules[names[i + 1]]
                if type(following) in (nn.ReLU, nn.LeakyReLU):
                    act = following
                    parent._modules[names[i + 1]] = nn.Identity()
            parent._modules[name] = _fused(child, act, impl)
    return model

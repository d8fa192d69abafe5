"""Modules: InstanceNormAct2d, InstanceMeanPool and fuse_modules."""
from __future__ import annotations

import pytest
import torch
from support import rel_err
from torch import nn

from fastp2phd import InstanceMeanPool, InstanceNormAct2d, fuse_modules
from fastp2phd.ops import instance_mean


@pytest.mark.parametrize(
    "activation, module",
    [("relu", nn.ReLU()), ("leaky_relu", nn.LeakyReLU(0.2)), ("none", nn.Identity())],
)
def test_instance_norm_act_equals_pytorch_modules(activation, module):
    x = torch.randn(2, 5, 7, 9, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    fused = InstanceNormAct2d(5, activation)
    plain = nn.Sequential(nn.InstanceNorm2d(5), module)
    grad = torch.randn(2, 5, 7, 9)
    fused(x).backward(grad)
    plain(x2).backward(grad)
    assert rel_err(fused(x), plain(x2)) < 1e-6
    assert rel_err(x.grad, x2.grad) < 1e-5


def test_instance_norm_act_unbatched_and_state():
    module = InstanceNormAct2d(3, "leaky_relu", 0.1)
    x = torch.randn(3, 4, 5)
    assert torch.equal(module(x), module(x[None])[0])
    assert module.state_dict() == {}
    assert "leaky_relu, negative_slope=0.1" in repr(module)


def test_instance_norm_act_rejects_wrong_channels_and_options():
    with pytest.raises(ValueError, match="expected input of shape \\(N, 3, H, W\\)"):
        InstanceNormAct2d(3)(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="activation must be one of"):
        InstanceNormAct2d(3, "tanh")
    with pytest.raises(ValueError, match="num_features must be positive"):
        InstanceNormAct2d(0)


def test_instance_mean_pool_module():
    feat = torch.randn(2, 3, 6, 8)
    inst = torch.randint(0, 4, (2, 1, 6, 8))
    assert torch.equal(InstanceMeanPool()(feat, inst), instance_mean(feat, inst))
    assert torch.equal(InstanceMeanPool("reference")(feat, inst), instance_mean(feat, inst, impl="reference"))


class Custom(nn.Module):
    """A user model: norms in Sequentials, a norm held as an attribute, and norms that must stay."""

    def __init__(self):
        super().__init__()
        shared = nn.ReLU(True)  # one activation object used twice, as pix2pixHD does
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(8), shared,
            nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8), nn.LeakyReLU(0.1, True),
            nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8),
            nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8, affine=True), shared,
            nn.Conv2d(8, 8, 3, padding=1), nn.InstanceNorm2d(8, track_running_stats=True), nn.ReLU(),
        )
        self.norm = nn.InstanceNorm2d(8)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.norm(self.body(x)))


def test_fuse_modules_keeps_keys_and_outputs():
    torch.manual_seed(0)
    model = Custom().eval()
    x = torch.randn(2, 3, 10, 12)
    expected = model(x)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse_modules(model) is model
    body = model.body
    assert isinstance(body[1], InstanceNormAct2d) and body[1].activation == "relu" and isinstance(body[2], nn.Identity)
    assert isinstance(body[4], InstanceNormAct2d) and body[4].activation == "leaky_relu"
    assert body[4].negative_slope == pytest.approx(0.1) and isinstance(body[5], nn.Identity)
    assert isinstance(body[7], InstanceNormAct2d) and body[7].activation == "none"
    # Norms with parameters or running statistics are left alone, and so is their activation.
    assert type(body[9]) is nn.InstanceNorm2d and isinstance(body[10], nn.ReLU)
    assert type(body[12]) is nn.InstanceNorm2d and isinstance(body[13], nn.ReLU)
    # Outside a Sequential there is no order to trust: the norm alone is replaced.
    assert isinstance(model.norm, InstanceNormAct2d) and model.norm.activation == "none"
    assert isinstance(model.act, nn.ReLU)
    assert model.state_dict().keys() == keys.keys()
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
    assert rel_err(model(x), expected) < 1e-6


def test_fuse_modules_on_unfused_generator_matches_fused_build():
    from fastp2phd.models import GlobalGenerator

    torch.manual_seed(1)
    plain = GlobalGenerator(5, 3, ngf=4, n_downsampling=2, n_blocks=1, fused=False)
    fused = GlobalGenerator(5, 3, ngf=4, n_downsampling=2, n_blocks=1)
    fuse_modules(plain)
    assert [type(m) for m in plain.modules()] == [type(m) for m in fused.modules()]
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(1, 5, 16, 16)
    assert torch.equal(plain(x), fused(x))

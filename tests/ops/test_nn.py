"""Modules: InstanceNormAct2d, InstanceMeanPool and fuse_modules."""
from __future__ import annotations

import copy

import pytest
import torch
from support import rel_err
from torch import nn

from fastp2phd import InstanceMeanPool, InstanceNormAct2d, fuse_modules
from fastp2phd.nn.fuse import FusedInstanceNorm2d, FusedSequential
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


def test_instance_norm_act_channels_and_options():
    # As InstanceNorm2d(affine=False), which has no per-channel state: a channel count that differs warns.
    x = torch.randn(1, 4, 5, 5)
    with pytest.warns(UserWarning, match="input has 4 channels but num_features is 3"):
        assert torch.equal(InstanceNormAct2d(3)(x), InstanceNormAct2d(4)(x))
    with pytest.raises(ValueError, match="expected input of shape \\(N, 3, H, W\\)"):
        InstanceNormAct2d(3)(torch.randn(3, 5))
    with pytest.raises(ValueError, match="activation must be one of"):
        InstanceNormAct2d(3, "tanh")
    with pytest.raises(ValueError, match="num_features must be positive"):
        InstanceNormAct2d(0)
    # An impl that names no path is refused when the module is built, as by fuse_modules, not at the first call.
    with pytest.raises(ValueError, match="InstanceNormAct2d: unknown impl='cudnn'; choose one of 'auto', 'reference'"):
        InstanceNormAct2d(3, impl="cudnn")
    with pytest.raises(ValueError, match="fuse_modules: unknown impl='cudnn'"):
        fuse_modules(torch.nn.Sequential(torch.nn.InstanceNorm2d(3), torch.nn.ReLU()), impl="cudnn")
    assert InstanceNormAct2d(3, impl="triton").impl == "triton"  # an alias; where it runs is checked per call


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


def count_op_calls(monkeypatch):
    """Record the (activation, negative_slope) of every call to ops.instance_norm_act."""
    from fastp2phd import ops

    calls, op = [], ops.instance_norm_act

    def counting(x, activation="relu", negative_slope=0.2, *args, **kwargs):
        calls.append((activation, negative_slope))
        return op(x, activation, negative_slope, *args, **kwargs)

    monkeypatch.setattr(ops, "instance_norm_act", counting)
    return calls


def test_fuse_modules_keeps_keys_and_outputs(monkeypatch):
    # fuse_modules replaces no module: it switches the class of the Sequential that holds the pairs
    # (whose forward then runs each pair as one op) and of norms held elsewhere (fastp2phd.nn.fuse).
    torch.manual_seed(0)
    model = Custom().eval()
    x = torch.randn(2, 3, 10, 12)
    expected = model(x)
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    children = list(model.body)
    text = repr(model)
    assert fuse_modules(model) is model
    body = model.body
    assert type(body) is FusedSequential and isinstance(body, nn.Sequential)
    assert list(body) == children and all(type(m) in (nn.Conv2d, nn.InstanceNorm2d, nn.ReLU, nn.LeakyReLU)
                                          for m in body)
    # Outside a Sequential there is no order to trust: the norm alone takes the op, still an InstanceNorm2d.
    assert type(model.norm) is FusedInstanceNorm2d and isinstance(model.norm, nn.InstanceNorm2d)
    assert type(model.act) is nn.ReLU
    assert repr(model) == text
    assert model.state_dict().keys() == keys.keys()
    assert all(torch.equal(v, keys[k]) for k, v in model.state_dict().items())
    calls = count_op_calls(monkeypatch)
    assert rel_err(model(x), expected) < 1e-5  # five normalisations in float32, each within rounding
    # body[1:3] and body[4:6] are pairs, body[7] a norm alone; body[9] (affine) and body[12] (running
    # statistics) run as PyTorch modules; model.norm runs the op alone, its ReLU after it.
    assert calls == [("relu", 0.0), ("leaky_relu", pytest.approx(0.1)), ("none", 0.0), ("none", 0.0)]


def test_fuse_modules_on_unfused_generator_matches_fused_build(monkeypatch):
    from fastp2phd.models import GlobalGenerator

    torch.manual_seed(1)
    plain = GlobalGenerator(5, 3, ngf=4, n_downsampling=2, n_blocks=1, fused=False)
    fused = GlobalGenerator(5, 3, ngf=4, n_downsampling=2, n_blocks=1)
    types = [type(m) for m in plain.modules() if not isinstance(m, nn.Sequential)]
    fuse_modules(plain)
    assert [type(m) for m in plain.modules() if not isinstance(m, nn.Sequential)] == types
    assert plain.state_dict().keys() == fused.state_dict().keys()
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(1, 5, 16, 16)
    calls = count_op_calls(monkeypatch)
    assert torch.equal(plain(x), fused(x))  # the same op, called with the same arguments
    assert len(calls) == sum(isinstance(m, InstanceNormAct2d) for m in fused.modules())


# ----------------------------------------------------------------------------- fuse_modules changes nothing but speed


class Skip(nn.Sequential):
    """A Sequential subclass with its own forward: registration order is not execution order."""

    def forward(self, x):
        y = self[0](x)
        return self[1](y) + y


class Reversed(nn.Sequential):
    def forward(self, x):
        for module in reversed(self):
            x = module(x)
        return x


class NormConvAct(nn.Sequential):
    """Registered (norm, activation, conv), run norm -> conv -> activation."""

    def forward(self, x):
        return self[1](self[2](self[0](x)))


SUBCLASSES = {
    "skip connection": lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), Skip(nn.InstanceNorm2d(4), nn.ReLU())),
    "reversed order": lambda: nn.Sequential(nn.Conv2d(4, 4, 3, padding=1),
                                            Reversed(nn.InstanceNorm2d(4), nn.LeakyReLU(0.3))),
    "norm, conv, activation": lambda: NormConvAct(nn.InstanceNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1)),
}


def fused_copy(model):
    return fuse_modules(copy.deepcopy(model))


@pytest.mark.parametrize("build", SUBCLASSES.values(), ids=SUBCLASSES.keys())
def test_fuse_modules_leaves_the_order_of_subclasses_alone(build):
    torch.manual_seed(0)
    model = build()
    x = torch.randn(2, 4, 6, 7)
    fused = fused_copy(model)
    assert rel_err(fused(x), model(x)) < 1e-6
    # the norm alone takes the op (its class switched), the activation and the subclass kept as they were
    assert sum(type(m) is FusedInstanceNorm2d for m in fused.modules()) == 1
    assert sum(type(m) in (nn.ReLU, nn.LeakyReLU) for m in fused.modules()) == 1
    assert not any(isinstance(m, FusedSequential) for m in fused.modules())


def test_fuse_modules_subclass_that_keeps_sequential_forward_is_fused(monkeypatch):
    class Named(nn.Sequential):
        pass

    torch.manual_seed(0)
    model = Named(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4), nn.ReLU())
    x = torch.randn(2, 3, 6, 5)
    expected = model(x)
    fuse_modules(model)
    assert isinstance(model, Named) and isinstance(model, FusedSequential) and repr(model).startswith("Named(")
    assert type(model[1]) is nn.InstanceNorm2d and type(model[2]) is nn.ReLU
    calls = count_op_calls(monkeypatch)
    assert rel_err(model(x), expected) < 1e-6 and calls == [("relu", 0.0)]


@pytest.mark.parametrize("hooked", ["norm", "activation"])
@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_fuse_modules_keeps_hooked_modules(hooked, kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.InstanceNorm2d(4), nn.ReLU())
    seen = []
    target = model[1] if hooked == "norm" else model[2]
    getattr(target, f"register_{kind}_hook")(lambda module, *args: seen.append(args[0][0].clone()) and None)
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    model(x).sum().backward()
    expected = seen[:]
    seen.clear()
    fused = fuse_modules(model)
    fused(x).sum().backward()
    assert len(seen) == len(expected) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(seen, expected))
    # nothing is replaced; a hooked norm runs as a module, a hooked activation gets its own call
    assert type(fused[1]) is nn.InstanceNorm2d and type(fused[2]) is nn.ReLU


def test_fuse_modules_keeps_training_flags_and_eps():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, eps=0.0), nn.LeakyReLU(0.1)).eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    fuse_modules(model)
    assert not any(m.training for m in model.modules())
    assert model[1].eps == 0.0
    assert torch.allclose(model(x), expected, atol=1e-6)
    model.train()
    assert all(m.training for m in model.modules())


def test_slicing_a_fused_sequential_returns_the_pre_activation_output():
    """Before issue 18 (finding 6) the activation moved into the norm's slot, and seq[:2] was activated."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4), nn.ReLU())
    x = torch.randn(1, 3, 6, 6)
    before = model[:2](x)
    fuse_modules(model)
    assert (before < 0).any() and torch.allclose(model[:2](x), before, atol=1e-6)


def test_fused_models_trace_and_script_like_plain_ones():
    torch.manual_seed(0)
    model = Custom().eval()
    x = torch.randn(2, 3, 10, 12)
    expected = model(x)
    fused = fused_copy(model)
    traced = torch.fx.symbolic_trace(fused)
    assert rel_err(traced(x), expected) < 1e-5  # five normalisations in float32, each within rounding
    assert "fused_instance_norm_act" in traced.code
    scripted = torch.jit.script(fused)  # runs PyTorch's own modules
    assert torch.equal(scripted(x), expected)


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "none"])
def test_scripted_instance_norm_act_runs_pytorch_ops(activation):
    module = InstanceNormAct2d(3, activation, 0.3)
    scripted = torch.jit.script(module)
    x = torch.randn(2, 3, 5, 4)
    assert rel_err(scripted(x), module(x)) < 1e-6
    assert rel_err(scripted(x[1]), module(x[1])) < 1e-6  # unbatched
    assert "fastp2phd" not in scripted.code


@pytest.mark.parametrize("shape", [(2, 3, 1, 1), (3, 1, 1)])
def test_instance_norm_act2d_refuses_one_pixel_planes_as_instance_norm2d_does(shape):
    """The op normalises a one-pixel plane to 0; the module it replaces raises, in training and in eval."""
    x = torch.randn(shape)
    for training in (True, False):
        with pytest.raises(ValueError, match="[Ee]xpected more than 1 spatial element"):
            nn.InstanceNorm2d(3).train(training)(x)
        with pytest.raises(ValueError, match="[Ee]xpected more than 1 spatial element"):
            InstanceNormAct2d(3, "relu").train(training)(x)

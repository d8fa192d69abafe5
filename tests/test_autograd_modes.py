"""Every autograd mode through the ops' registered (torch.library) paths on the CPU: forward-mode AD,
vmap, double backward. Before, forward-mode AD silently returned zero tangents here."""
from __future__ import annotations

import importlib

import pytest
import torch
from autograd_modes import assert_forward_ad_matches, assert_vmap_matches
from support import rel_err, requires_extension

from fastp2phd import ops
from fastp2phd.models import Encoder

norm_module = importlib.import_module("fastp2phd.ops.instance_norm_act")

INST = torch.tensor([[0, 0, 3, 3, 3], [0, 7, 7, 3, 3], [7, 7, 7, 3, 9], [0, 0, 9, 9, 9]]).view(1, 1, 4, 5)


def feats(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@requires_extension
def test_cpp_instance_mean_forward_ad():
    inst = INST.expand(2, 1, 4, 5)
    assert_forward_ad_matches(lambda f: ops.instance_mean(f, inst, impl="cpp"),
                              lambda f: ops.instance_mean(f, inst, impl="reference"),
                              feats(2, 3, 4, 5), feats(2, 3, 4, 5, seed=1))


@requires_extension
def test_cpp_instance_mean_vmap_and_double_backward():
    assert_vmap_matches(lambda f: ops.instance_mean(f, INST, impl="cpp"),
                        lambda f: ops.instance_mean(f, INST, impl="reference"), feats(3, 1, 2, 4, 5))
    # inst vmapped too: each vmapped item has its own segments
    insts = torch.stack([INST, INST.flip(3), INST.transpose(2, 3).reshape(1, 1, 4, 5)])
    f = feats(3, 1, 2, 4, 5)
    out = torch.func.vmap(lambda a, b: ops.instance_mean(a, b, impl="cpp"))(f, insts)
    assert rel_err(out, torch.stack([ops.instance_mean(a, b, impl="reference") for a, b in zip(f, insts)])) < 1e-12
    f = feats(1, 2, 4, 5).requires_grad_(True)
    assert torch.autograd.gradgradcheck(lambda t: ops.instance_mean(t, INST, impl="cpp") ** 2, (f,))


@requires_extension
def test_encoder_forward_ad_through_instance_pooling():
    torch.manual_seed(0)
    fast = Encoder(3, 3, ngf=4, n_downsampling=1).double()  # auto: the C++ instance_mean
    reference = Encoder(3, 3, ngf=4, n_downsampling=1, impl="reference").double()
    reference.load_state_dict(fast.state_dict())
    inst = INST.repeat(1, 1, 2, 2)[..., :8]
    assert_forward_ad_matches(lambda x: fast(x, inst), lambda x: reference(x, inst),
                              feats(1, 3, 8, 8), feats(1, 3, 8, 8, seed=1))


# instance_norm_act's fast path is Triton (CUDA, or the interpreter), but its registered op runs on CPU
# tensors with the reference as kernel, so its autograd formulas (backward of all three outputs, the
# differentiable backward, jvp, vmap) are checked here; tests/interpreter checks them with the kernels.
ACT_CASES = [("relu", 0.0), ("leaky_relu", 0.2), ("leaky_relu", -0.3), ("leaky_relu", 0.0), ("none", 0.0)]


@pytest.mark.parametrize("activation, slope", ACT_CASES)
def test_registered_instance_norm_act_op_backward_of_every_output_and_double_backward(activation, slope):
    x = feats(2, 3, 4, 5).requires_grad_(True)
    op = torch.ops.fastp2phd.instance_norm_act
    assert torch.autograd.gradcheck(lambda t: op(t, activation, slope, 1e-5), (x,))
    assert torch.autograd.gradgradcheck(lambda t: op(t, activation, slope, 1e-5), (x,))


@pytest.mark.parametrize("activation, slope", ACT_CASES)
def test_instance_norm_act_forward_ad_and_vmap_formulas(activation, slope):
    def fast(t):
        return norm_module._ForwardADFunction.apply(t, activation, slope, 1e-5)[0]

    def reference(t):
        return ops.instance_norm_act(t, activation, slope, impl="reference")

    assert_forward_ad_matches(fast, reference, feats(2, 3, 4, 5), feats(2, 3, 4, 5, seed=1))
    assert_vmap_matches(fast, reference, feats(3, 2, 2, 3, 4))
    cube_sum = lambda fn: lambda t: fn(t).pow(3).sum()  # noqa: E731
    x = feats(1, 2, 2, 3)
    assert rel_err(torch.func.hessian(cube_sum(fast))(x), torch.func.hessian(cube_sum(reference))(x)) < 1e-10
    x = feats(1, 2, 3, 4).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: norm_module._ForwardADFunction.apply(t, activation, slope, 1e-5), (x,),
                                    check_forward_ad=True)

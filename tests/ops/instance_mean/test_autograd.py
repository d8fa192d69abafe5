"""instance_mean under every autograd mode: gradcheck and gradgradcheck, vmap (ids batched too), forward-mode AD
through the C++ path and through an Encoder's instance pooling."""
from __future__ import annotations

import pytest
import torch
from autograd_modes import assert_forward_ad_matches, assert_vmap_matches
from support import instance_mean_loop as loop_oracle
from support import rel_err, requires_extension

from fastp2phd import ops
from fastp2phd.models import Encoder
from fastp2phd.ops import instance_mean

from .cases import IMPLS, make_inputs


INST = torch.tensor([[0, 0, 3, 3, 3], [0, 7, 7, 3, 3], [7, 7, 7, 3, 9], [0, 0, 9, 9, 9]]).view(1, 1, 4, 5)


def feats(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck(impl):
    feat, inst = make_inputs(2, 2, 5, 4, num_ids=3, dtype=torch.float64, seed=9)
    feat.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda f: instance_mean(f, inst, impl=impl), (feat,))
    assert torch.autograd.gradgradcheck(lambda f: instance_mean(f, inst, impl=impl), (feat,))


@pytest.mark.parametrize("impl", ["auto", *IMPLS])
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.uint8, torch.float32])
def test_vmap_with_batched_ids(impl, id_dtype):
    # Before, the reference's torch.unique could not be vmapped ("vmap over aten::_unique2").
    g = torch.Generator().manual_seed(16)
    feat = torch.randn(3, 2, 2, 5, 7, generator=g, dtype=torch.float64)
    inst = (torch.randint(0, 4, (3, 2, 1, 5, 7), generator=g) * 60).to(id_dtype)
    out = torch.func.vmap(lambda f, i: instance_mean(f, i, impl=impl))(feat, inst)
    assert rel_err(out, torch.stack([loop_oracle(f, i) for f, i in zip(feat, inst)])) < 1e-12
    shared_feat = torch.func.vmap(lambda i: instance_mean(feat[0], i, impl=impl))(inst)  # only the ids batched
    assert rel_err(shared_feat, torch.stack([loop_oracle(feat[0], i) for i in inst])) < 1e-12


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

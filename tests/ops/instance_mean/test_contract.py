"""instance_mean's contract: bad input (also under vmap), empty inputs that stay in the graph, how ids number
segments, and its registered operator (opcheck, torch.compile, one operator for every device)."""
from __future__ import annotations

import pytest
import torch
from support import instance_mean_loop as loop_oracle
from support import rel_err, requires_extension

from fastp2phd.nn import InstanceMeanPool
from fastp2phd.ops import instance_mean
from fastp2phd.ops.instance_mean import segment_index

from .cases import IMPLS, make_inputs


@pytest.mark.parametrize(
    "feat, inst, error, message",
    [
        (torch.zeros(3, 4, 4), torch.zeros(1, 1, 4, 4), ValueError, "feat must be an \\(N, C, H, W\\)"),
        (torch.zeros(1, 3, 4, 4, dtype=torch.int32), torch.zeros(1, 1, 4, 4), TypeError, "float16, bfloat16, float32"),
        # (float8 features and ids have no arithmetic on the CPU: refused in a sentence, not a kernel's error)
        (torch.zeros(1, 3, 4, 4, dtype=torch.float8_e4m3fn), torch.zeros(1, 1, 4, 4), TypeError,
         "feat must be float16, bfloat16, float32 or float64, got torch.float8_e4m3fn"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4, dtype=torch.float8_e5m2), TypeError, "integer ids"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), ValueError, "shape \\(N, 1, H, W\\)"),
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 5), ValueError, "share batch size, height and width"),
        (torch.zeros(2, 3, 4, 4), torch.zeros(1, 1, 4, 4), ValueError, "share batch size"),
        (torch.zeros(1, 3, 4, 4), torch.full((1, 1, 4, 4), 1.5), ValueError, "not whole numbers"),
        (torch.zeros(1, 3, 4, 4), torch.full((1, 1, 4, 4), 1e20), ValueError, "within int64.s range"),
        (torch.zeros(1, 3, 4, 4), torch.full((1, 1, 4, 4), float("-inf")), ValueError, "NaN, inf"),
        *[(torch.zeros(1, 3, 4, 4), torch.full((1, 1, 4, 4), value, dtype=dtype), ValueError, "NaN, inf")
          for dtype in (torch.float16, torch.bfloat16) for value in (float("-inf"), float("inf"), float("nan"))],
        (torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 4, device="meta"), ValueError, "one device"),
    ],
)
@pytest.mark.parametrize("impl", ["auto", *IMPLS])
def test_bad_input(feat, inst, error, message, impl):
    with pytest.raises(error, match=message):
        instance_mean(feat, inst, impl=impl)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_vmap_refuses_bad_float_ids_in_any_item(impl):
    inst = torch.zeros(3, 1, 1, 4, 4)
    inst[2, 0, 0, 1, 1] = 0.5
    with pytest.raises(ValueError, match="not whole numbers"):
        torch.func.vmap(lambda f, i: instance_mean(f, i, impl=impl))(torch.zeros(3, 1, 2, 4, 4), inst)


@pytest.mark.parametrize("impl", ["auto", *IMPLS])
@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_empty_inputs_give_empty_outputs_that_backward_flows_through(impl, shape, layout):
    # PyTorch's own modules keep empty batches in the graph; before, the op returned a tensor outside it.
    feat = torch.randn(shape, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_(True)
    inst = torch.zeros(shape[0], 1, *shape[2:], dtype=torch.int64)
    for module in (lambda f: instance_mean(f, inst, impl=impl), lambda f: InstanceMeanPool(impl)(f, inst)):
        out = module(feat)
        assert out.shape == shape and out.dtype == feat.dtype and out.requires_grad
        assert out.is_contiguous(memory_format=layout)
        out.sum().backward()
        assert feat.grad.shape == shape
        feat.grad = None


def test_segment_index_numbers_ids_in_order_within_each_item():
    inst = torch.tensor([[[[26001, 7], [7, -3]]], [[[5, 5], [5, 5]]]])
    assert segment_index(inst).tolist() == [[2, 1, 1, 0], [0, 0, 0, 0]]
    assert segment_index(torch.zeros(2, 1, 0, 3, dtype=torch.int64)).shape == (2, 0)


@requires_extension
def test_opcheck():
    feat, inst = make_inputs(2, 3, 6, 7, seed=12)
    torch.library.opcheck(torch.ops.fastp2phd.instance_mean.default, (feat.requires_grad_(True), inst))
    torch.library.opcheck(torch.ops.fastp2phd.instance_mean.default, (feat.detach().double(), inst.int()))


@requires_extension
def test_torch_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    feat, inst = make_inputs(2, 3, 8, 12, seed=13)

    def step(f, i):
        return (instance_mean(f, i) * f).sum()

    compiled = torch.compile(step, fullgraph=True)
    f1 = feat.clone().requires_grad_(True)
    f2 = feat.clone().requires_grad_(True)
    compiled(f1, inst).backward()
    step(f2, inst).backward()
    assert rel_err(f1.grad, f2.grad) < 1e-6


def test_reference_under_torch_compile_fullgraph():
    torch._dynamo.reset()
    feat, inst = make_inputs(2, 3, 8, 12, seed=17)
    compiled = torch.compile(lambda f, i: instance_mean(f, i, impl="reference"), fullgraph=True)
    assert rel_err(compiled(feat, inst), loop_oracle(feat, inst)) < 1e-6


def test_the_operator_on_cpu_with_autograd_and_compile():
    """One operator for every device: on the CPU its kernel is C++ (or the reference without the extension)."""
    feat, inst = make_inputs(2, 3, 6, 7, seed=14)
    feat.requires_grad_(True)
    out = torch.ops.fastp2phd.instance_mean(feat, inst)
    assert rel_err(out, loop_oracle(feat.detach(), inst)) < 1e-6
    torch._dynamo.reset()
    compiled = torch.compile(lambda f, i: torch.ops.fastp2phd.instance_mean(f, i).sum(), fullgraph=True)
    compiled(feat, inst).backward()
    assert rel_err(feat.grad, loop_oracle(torch.ones_like(feat), inst)) < 1e-6
    assert not hasattr(torch.ops.fastp2phd, "instance_mean_triton")

"""The operators: one per op, every schema defined once, fake kernels that check their inputs."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastp2phd.ops import _library


def test_every_schema_is_defined_once_in_python():
    assert set(_library.SCHEMAS) == {"boundary_map", "instance_mean", "instance_norm_act",
                                     "instance_norm_act_backward", "instance_norm_act_input_grad", "sparse_input_conv2d"}
    for name, schema in _library.SCHEMAS.items():
        assert str(_library.op(name)._schema) == f"fastp2phd::{schema}"
    assert {name for name in dir(torch.ops.fastp2phd) if not name.startswith("_")} >= set(_library.SCHEMAS)


@pytest.mark.parametrize("name", ["boundary_map", "instance_mean", "instance_norm_act", "instance_norm_act_backward",
                                  "sparse_input_conv2d"])
def test_every_operator_has_cpu_and_cuda_kernels(name):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastp2phd::{name}", key), (name, key)


def test_the_differentiable_input_grad_is_one_composite_for_every_device():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastp2phd::instance_norm_act_input_grad",
                                                           "CompositeImplicitAutograd")


CALLS = {
    "instance_mean, sizes differ": (lambda: torch.ops.fastp2phd.instance_mean(torch.empty(1, 3, 4, 4),
                                                                              torch.empty(1, 1, 4, 5)),
                                    "must share batch, height and width"),
    "instance_mean, integer features": (lambda: torch.ops.fastp2phd.instance_mean(
        torch.empty(1, 3, 4, 4, dtype=torch.int32), torch.empty(1, 1, 4, 4)), "must be floating point"),
    "instance_mean, 3-channel ids": (lambda: torch.ops.fastp2phd.instance_mean(torch.empty(1, 3, 4, 4),
                                                                               torch.empty(1, 3, 4, 4)),
                                     r"inst must have shape \(N, 1, H, W\)"),
    "boundary_map, 2 channels": (lambda: torch.ops.fastp2phd.boundary_map(torch.empty(1, 2, 4, 4), torch.float32),
                                 r"inst must have shape \(N, 1, H, W\)"),
    "instance_norm_act, 3-d": (lambda: torch.ops.fastp2phd.instance_norm_act(torch.empty(3, 4, 4), "relu", 0.0, 1e-5),
                               r"x must be a floating-point \(N, C, H, W\) tensor"),
    "instance_norm_act, activation": (lambda: torch.ops.fastp2phd.instance_norm_act(torch.empty(1, 3, 4, 4), "gelu",
                                                                                    0.0, 1e-5),
                                      "activation must be one of"),
    "backward, statistics": (lambda: torch.ops.fastp2phd.instance_norm_act_backward(
        torch.empty(1, 3, 4, 4), torch.empty(1, 3, 4, 4), torch.empty(2, dtype=torch.float64), torch.empty(3), "relu",
        0.0), r"mean must be \(3,\) torch.float64"),
    "backward, float32 mean": (lambda: torch.ops.fastp2phd.instance_norm_act_backward(
        torch.empty(1, 3, 4, 4), torch.empty(1, 3, 4, 4), torch.empty(3), torch.empty(3), "relu", 0.0),
        r"mean must be \(3,\) torch.float64"),
    "sparse_input_conv2d, channels": (lambda: torch.ops.fastp2phd.sparse_input_conv2d(
        torch.empty(1, 3, 8, 8), torch.empty(2, 4, 3, 3), None), "do not match"),
    "sparse_input_conv2d, small input": (lambda: torch.ops.fastp2phd.sparse_input_conv2d(
        torch.empty(1, 3, 2, 8), torch.empty(2, 3, 3, 3), None), "smaller than the kernel"),
}


@pytest.mark.parametrize("call", CALLS.values(), ids=CALLS.keys())
def test_fake_kernels_check_their_inputs(call):
    fn, message = call
    with FakeTensorMode(), pytest.raises(RuntimeError, match=message):
        fn()

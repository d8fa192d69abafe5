"""instance_mean's Triton path on a GPU never waits for the device: CUDA's sync debug mode finds no
synchronisation, and a CUDA graph holds forward and backward and replays them on other ids.
(Without a GPU, tests/interpreter/instance_mean/test_no_host_sync.py checks the same launcher for syncs.)"""
from __future__ import annotations

import pytest
import torch
from support import cityscapes_like, instance_mean_loop, rel_err

from fastp2phd import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def inputs(seed):
    feat = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(seed))
    return feat.cuda(), cityscapes_like(2, 64, 96, seed=seed).cuda()


def forward_backward(feat, inst):
    out = ops.instance_mean(feat, inst, impl="triton")
    out.backward(torch.ones_like(out))
    return out


def test_forward_and_backward_make_no_host_sync():
    feat, inst = inputs(0)
    feat.requires_grad_(True)
    forward_backward(feat, inst)  # compiles the kernels first
    feat.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising CUDA call raises
    try:
        out = forward_backward(feat, inst)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = instance_mean_loop(feat.detach().cpu(), inst.cpu())
    assert rel_err(out.cpu(), expected) < 1e-6
    assert rel_err(feat.grad.cpu(), instance_mean_loop(torch.ones_like(expected), inst.cpu())) < 1e-6


def test_a_cuda_graph_holds_forward_and_backward():
    feat, inst = inputs(1)
    feat.requires_grad_(True)
    side = torch.cuda.Stream()  # warm-up on a side stream, as torch.cuda.graph asks
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        forward_backward(feat, inst)
    torch.cuda.current_stream().wait_stream(side)
    feat.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = forward_backward(feat, inst)
    other_feat, other_inst = inputs(2)  # other values and other ids (another number of segments)
    assert torch.unique(other_inst).numel() != torch.unique(inst).numel()
    with torch.no_grad():
        feat.copy_(other_feat)
        inst.copy_(other_inst)
    graph.replay()
    torch.cuda.synchronize()
    expected = instance_mean_loop(other_feat.cpu(), other_inst.cpu())
    assert rel_err(out.cpu(), expected) < 1e-6
    assert rel_err(feat.grad.cpu(), instance_mean_loop(torch.ones_like(expected), other_inst.cpu())) < 1e-6

"""Triton instance_mean never makes the host wait for the device (so a CUDA graph can hold it), checked in the
interpreter by refusing every syncing operator. (On a GPU: tests/ops/instance_mean/test_cuda_graph_safe.py.)"""
from __future__ import annotations

import contextlib

import pytest
import torch
from support import instance_mean_loop as loop_oracle
from support import rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from fastp2phd.ops import instance_mean

from .cases import CASES


class _NoHostSync(TorchDispatchMode):
    """Fails on the operators that make the host wait for the device: reading a value back (.item(),
    bool(), .tolist() of a CUDA tensor) and those whose output size depends on the data."""

    SYNCING = {torch.ops.aten._local_scalar_dense, torch.ops.aten.nonzero, torch.ops.aten.masked_select,
               torch.ops.aten._unique2, torch.ops.aten.unique_dim, torch.ops.aten.unique_consecutive}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.SYNCING:
            raise AssertionError(f"{func} makes the host wait for the device")
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def no_host_sync(monkeypatch):
    # .tolist() of a CPU tensor reads memory without an operator: refuse it by hand.
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail(".tolist() makes the host wait"))
    with _NoHostSync():
        yield
    monkeypatch.undo()


def test_no_host_sync_catches_syncs(monkeypatch):
    ids = torch.tensor([3, 1, 3])
    for sync in (lambda: ids.tolist(), lambda: bool(ids[0]), lambda: ids.max().item(), lambda: torch.unique(ids)):
        with pytest.raises((AssertionError, pytest.fail.Exception)), no_host_sync(monkeypatch):
            sync()


@pytest.mark.parametrize("case", ["Cityscapes-like", "float ids", "uint8 ids"])
def test_forward_and_backward_never_wait_for_the_device(case, monkeypatch):
    # Issue 19: the launcher read aminmax().tolist() (and could run torch.unique), so no CUDA graph could hold it.
    feat, inst = CASES[case]
    feat = feat.clone().requires_grad_(True)
    grad = torch.randn(feat.shape, generator=torch.Generator().manual_seed(7))
    with no_host_sync(monkeypatch):
        outs = [torch.ops.fastp2phd.instance_mean(feat, inst)]
        if not inst.is_floating_point():  # the Python wrapper checks float ids first: one pass, and a sync
            outs.append(instance_mean(feat, inst, impl="triton"))
        grads = [torch.autograd.grad(out, feat, grad)[0] for out in outs]
    for out, feat_grad in zip(outs, grads):
        assert rel_err(out, loop_oracle(feat.detach(), inst)) < 1e-6
        assert rel_err(feat_grad, loop_oracle(grad, inst)) < 1e-6

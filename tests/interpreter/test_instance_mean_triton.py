"""Triton instance_mean against the plain-loop definition, in the interpreter."""
from __future__ import annotations

import contextlib

import pytest
import torch
from support import cityscapes_like, rel_err
from support import instance_mean_loop as loop_oracle
from torch.utils._python_dispatch import TorchDispatchMode

from fastp2phd.ops import instance_mean


def random_inputs(n, c, h, w, num_ids, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g).to(dtype), torch.randint(0, num_ids, (n, 1, h, w), generator=g)


CASES = {
    "one pixel": (torch.randn(1, 2, 1, 1), torch.zeros(1, 1, 1, 1, dtype=torch.int64)),
    "one segment": (torch.randn(2, 3, 9, 7), torch.full((2, 1, 9, 7), 26001)),
    "one-pixel segments": (torch.randn(1, 2, 6, 5), torch.arange(30).view(1, 1, 6, 5)),
    "hundreds of segments": (torch.randn(1, 2, 30, 40), torch.randint(0, 500, (1, 1, 30, 40)) * 1000),
    "Cityscapes-like": (torch.randn(2, 3, 24, 48), cityscapes_like(2, 24, 48, seed=1)),
    "ids beyond 32 bits": (torch.randn(2, 2, 8, 9), torch.randint(-5, 5, (2, 1, 8, 9)) * 2**40),
    "uint8 ids": (torch.randn(1, 3, 5, 11), torch.randint(0, 255, (1, 1, 5, 11), dtype=torch.uint8)),
    "float ids": (torch.randn(1, 3, 5, 11), torch.randint(0, 4, (1, 1, 5, 11)).float() * 1000),
    "tile boundary": (torch.randn(1, 1, 3, 700), torch.randint(0, 3, (1, 1, 3, 700))),  # 2100 pixels: 3 tiles
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_matches_loop_oracle(case, poisoned_empty):
    feat, inst = case
    out = instance_mean(feat, inst, impl="triton")
    assert out.shape == feat.shape and out.dtype == feat.dtype
    assert rel_err(out, loop_oracle(feat, inst)) < 1e-6


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


def test_empty_inputs_stay_in_the_graph():
    for shape in [(0, 3, 4, 4), (2, 0, 4, 4), (2, 3, 0, 4)]:
        feat = torch.randn(shape, requires_grad=True)
        inst = torch.zeros(shape[0], 1, *shape[2:], dtype=torch.int64)
        for out in (instance_mean(feat, inst, impl="triton"), torch.ops.fastp2phd.instance_mean(feat, inst)):
            assert out.shape == shape and out.requires_grad
            out.sum().backward()
            assert feat.grad.shape == shape


def test_same_ids_in_different_batch_items_stay_apart():
    feat = torch.stack([torch.full((2, 5, 5), 1.0), torch.full((2, 5, 5), 7.0)])
    inst = torch.full((2, 1, 5, 5), 26001)
    assert torch.equal(instance_mean(feat, inst, impl="triton"), feat)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dtypes(dtype):
    feat, inst = random_inputs(2, 3, 10, 12, 5, dtype=dtype, seed=2)
    expected = loop_oracle(feat, inst)
    bound = 1e-12 if dtype == torch.float64 else 2 * rel_err(expected.to(dtype), expected) + 1e-12
    assert rel_err(instance_mean(feat, inst, impl="triton"), expected) <= bound


def test_layouts_are_kept():
    feat, inst = random_inputs(2, 6, 8, 10, 4, seed=3)
    expected = loop_oracle(feat, inst)
    out = instance_mean(feat.contiguous(memory_format=torch.channels_last), inst, impl="triton")
    assert out.is_contiguous(memory_format=torch.channels_last) and rel_err(out, expected) < 1e-6
    wide = torch.randn(2, 6, 8, 13)[..., 2:12]  # a crop: copied to contiguous inside
    assert rel_err(instance_mean(wide, inst, impl="triton"), loop_oracle(wide, inst)) < 1e-6


def test_backward_is_the_projection_of_the_gradient():
    feat, inst = random_inputs(2, 3, 9, 11, 4, seed=4)
    grad = torch.randn(2, 3, 9, 11, generator=torch.Generator().manual_seed(5))
    feat.requires_grad_(True)
    instance_mean(feat, inst, impl="triton").backward(grad)
    assert rel_err(feat.grad, loop_oracle(grad, inst)) < 1e-6
    f64 = feat.detach().double().requires_grad_(True)
    # fast_mode checks random directional derivatives: a few calls instead of one per input element.
    assert torch.autograd.gradcheck(lambda f: instance_mean(f, inst, impl="triton"), (f64,), fast_mode=True)


def test_opcheck():
    feat, inst = random_inputs(1, 2, 5, 6, 3, seed=6)
    torch.library.opcheck(torch.ops.fastp2phd.instance_mean.default, (feat.requires_grad_(True), inst))

"""Checks that an op serves every autograd mode like its reference: forward-mode AD (torch.func.jvp
and dual tensors), vmap, and double backward. Shared by the C++ tests and the Triton ones."""
from __future__ import annotations

import torch
from support import rel_err
from torch.autograd import forward_ad as fwAD


def assert_forward_ad_matches(fast, reference, primal: torch.Tensor, tangent: torch.Tensor, tol: float = 1e-10) -> None:
    """The tangent of ``fast`` at ``primal`` equals the reference's, through torch.func.jvp and dual tensors."""
    out, out_tangent = torch.func.jvp(fast, (primal,), (tangent,))
    expected, expected_tangent = torch.func.jvp(reference, (primal,), (tangent,))
    assert expected_tangent.abs().max() > 0  # a case where dropping the tangent would show
    assert rel_err(out, expected) < tol
    assert rel_err(out_tangent, expected_tangent) < tol
    with fwAD.dual_level():
        dual_tangent = fwAD.unpack_dual(fast(fwAD.make_dual(primal, tangent))).tangent
    assert dual_tangent is not None, "forward-mode AD dropped the tangent"
    assert rel_err(dual_tangent, expected_tangent) < tol


def assert_vmap_matches(fast, reference, batched: torch.Tensor, tol: float = 1e-10) -> None:
    """vmap over dim 0 of ``batched`` equals the reference item by item, and jacfwd (vmap of jvp) equals jacrev."""
    out = torch.func.vmap(fast)(batched)
    expected = torch.stack([reference(item) for item in batched])
    assert rel_err(out, expected) < tol
    item = batched[0]
    assert rel_err(torch.func.jacfwd(fast)(item), torch.func.jacrev(reference)(item)) < tol


def assert_same_gradients(actual, expected, tol: float = 1e-10) -> None:
    """Parameter gradients (None where a parameter does not reach the loss) equal, relative to the
    largest gradient: biases before an instance norm get gradients that are zero up to rounding."""
    assert [a is None for a in actual] == [e is None for e in expected]
    scale = max(e.abs().max().item() for e in expected if e is not None)
    for a, e in zip(actual, expected):
        assert a is None or (a - e).abs().max().item() <= tol * scale

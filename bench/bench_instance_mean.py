"""instance_mean forward and forward + backward: the fast path next to the reference
(sort + scatter_add + gather), a straightforward unique + index_add + gather, the original
Python-loop pooling, torch.compile, and the floor (read the ids, copy the features)."""
from __future__ import annotations

import pytest
import torch
from harness import check_agrees, compiled_or_skip, instance_maps, measure, tensor_bytes
from official import index_add_instance_mean, official_instance_pool

from fastp2phd.ops import instance_mean, instance_mean_reference

PROVIDERS = ["floor", "fastp2phd", "reference", "index_add", "official", "compile"]
SIZE_IDS = ["small", "medium", "large"]


def provider_fn(provider, inst):
    if provider == "fastp2phd":
        return lambda f: instance_mean(f, inst)
    if provider == "reference":
        return lambda f: instance_mean(f, inst, impl="reference")
    if provider == "index_add":
        return lambda f: index_add_instance_mean(f, inst)
    if provider == "official":
        return lambda f: official_instance_pool(f, inst)
    raise KeyError(provider)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", range(3), ids=SIZE_IDS)
def test_instance_mean(benchmark, settings, size, provider, backward):
    sizes = settings.map_sizes()
    if size >= len(sizes):
        pytest.skip("smoke run")
    n, h, w = sizes[size]
    inst = instance_maps(settings, n, h, w, seed=size)
    feat = torch.randn(n, 3, h, w, device=settings.device)
    grad = torch.randn_like(feat)
    floor_bytes = tensor_bytes(inst) + 2 * tensor_bytes(feat)  # read ids and features, write features
    if provider == "floor":
        # A pass that reads the ids and copies the features: what any implementation must move.
        fn = (lambda: (inst.max(), feat.clone(), inst.max(), grad.clone())) if backward else (
            lambda: (inst.max(), feat.clone()))
    else:
        if provider == "compile":
            op = compiled_or_skip(lambda f, i: instance_mean_reference(f, i), feat, inst)
            op = (lambda c: lambda f: c(f, inst))(op)
        else:
            op = provider_fn(provider, inst)
        if backward:
            leaf = feat.clone().requires_grad_(True)

            def fn():
                (g,) = torch.autograd.grad(op(leaf), leaf, grad)
                return g
        else:
            fn = lambda: op(feat)  # noqa: E731
        if backward:
            ref_leaf = feat.clone().requires_grad_(True)
            (expected,) = torch.autograd.grad(instance_mean_reference(ref_leaf, inst), ref_leaf, grad)
        else:
            expected = instance_mean_reference(feat, inst)
        check_agrees(settings, fn(), expected, what=f"instance_mean {provider}{' gradient' if backward else ''}",
                     atol=1e-4, rtol=1e-4, layout=not backward)
    measure(benchmark, settings, suite="instance_mean fwd+bwd" if backward else "instance_mean fwd",
            case=f"{n}x3x{h}x{w} float32", provider=provider, fn=fn,
            bytes_moved=floor_bytes * (2 if backward else 1), images=n, slow=provider == "official")

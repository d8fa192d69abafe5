"""Every network built twice from one seed, reference ops vs Triton kernels: same outputs and gradients, and a
gradient penalty (double backward) through a discriminator."""
from __future__ import annotations

import pytest
import torch
from autograd_modes import assert_same_gradients
from support import rel_err

from fastp2phd.models import Encoder, GlobalGenerator, LocalEnhancer, MultiscaleDiscriminator

NETWORKS = {
    "GlobalGenerator": (lambda impl: GlobalGenerator(6, 3, ngf=4, n_downsampling=2, n_blocks=1, impl=impl), (1, 6, 16, 16)),
    "LocalEnhancer": (lambda impl: LocalEnhancer(6, 3, ngf=4, n_downsample_global=1, n_blocks_global=1,
                                                n_local_enhancers=1, n_blocks_local=1, impl=impl), (1, 6, 16, 16)),
    "Encoder": (lambda impl: Encoder(3, 3, ngf=4, n_downsampling=2, impl=impl), (2, 3, 16, 16)),
    "MultiscaleDiscriminator": (lambda impl: MultiscaleDiscriminator(6, ndf=4, n_layers=2, num_D=2, impl=impl),
                                (1, 6, 32, 32)),
}


def flatten(output):
    if isinstance(output, torch.Tensor):
        return [output]
    return [t for item in output for t in flatten(item)]


@pytest.mark.parametrize("name", NETWORKS)
def test_triton_network_matches_reference_network(name):
    build, shape = NETWORKS[name]
    nets = {}
    for impl in ("reference", "triton"):
        torch.manual_seed(0)
        nets[impl] = build(impl).double()
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    inst = torch.randint(0, 3, (shape[0], 1) + shape[2:], generator=torch.Generator().manual_seed(2)) * 1000
    outputs = {}
    for impl, net in nets.items():
        out = flatten(net(x, inst) if name == "Encoder" else net(x))
        sum(o.square().sum() for o in out).backward()
        outputs[impl] = out
    for ref, tri in zip(outputs["reference"], outputs["triton"]):
        assert rel_err(tri, ref) < 1e-10
    # Relative to the largest gradient: biases just before an instance norm have a true
    # gradient of 0, so their error can only be judged against the others.
    reference = dict(nets["reference"].named_parameters())
    scale = max(p.grad.abs().max().item() for p in reference.values())
    for key, p in nets["triton"].named_parameters():
        assert (p.grad - reference[key].grad).abs().max().item() <= 1e-10 * scale, key


def feats(*shape, seed=0):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_r1_penalty_through_the_triton_discriminator():
    """R1: the penalty's parameter gradients need the gradient of dD/dx; equal to the reference network's."""
    nets = {}
    for impl in ("triton", "reference"):
        torch.manual_seed(0)
        nets[impl] = MultiscaleDiscriminator(3, ndf=4, n_layers=2, num_D=2, impl=impl).double()
    grads = {}
    for impl, net in nets.items():
        x = feats(2, 3, 32, 32).requires_grad_(True)
        score = sum(scale[-1].sum() for scale in net(x))
        (dx,) = torch.autograd.grad(score, x, create_graph=True)
        grads[impl] = torch.autograd.grad(dx.pow(2).sum(), list(net.parameters()), allow_unused=True)
    assert_same_gradients(grads["triton"], grads["reference"])

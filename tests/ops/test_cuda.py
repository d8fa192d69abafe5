"""The fast paths together on a CUDA device: impl="auto" picks them, networks match the reference, forward-mode
AD and double backward, ONNX export, 16-bit inference. Each op's own GPU tests are in tests/ops/<op>/test_cuda.py.

Skipped without a GPU; ``bench/gpu_check.sh`` runs it on one.
"""
from __future__ import annotations

import pytest
import torch
from autograd_modes import assert_forward_ad_matches
from export_checks import assert_no_fastp2phd_ops, export_and_run_onnx
from support import cityscapes_like, rel_err

from fastp2phd import ops
from fastp2phd.ops._dispatch import select

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def test_auto_selects_the_gpu_fast_paths():
    paths = ops.fast_paths()
    assert select("boundary_map", "auto", CUDA, paths["boundary_map"]).name == "cuda"
    assert select("instance_mean", "auto", CUDA, paths["instance_mean"]).name == "cuda"
    assert select("instance_norm_act", "auto", CUDA, paths["instance_norm_act"]).name == "cuda"


def test_networks_default_to_the_fast_paths_and_match_the_reference():
    from fastp2phd.models import Encoder, LocalEnhancer, MultiscaleDiscriminator

    builds = [
        (lambda impl: LocalEnhancer(36, 3, ngf=8, n_blocks_global=2, n_blocks_local=1, impl=impl), (1, 36, 128, 256)),
        (lambda impl: Encoder(3, 3, impl=impl), (2, 3, 128, 256)),
        (lambda impl: MultiscaleDiscriminator(39, ndf=16, impl=impl), (1, 39, 128, 256)),
    ]
    inst = cityscapes_like(2, 128, 256, seed=3).to(CUDA)
    for build, shape in builds:
        nets = {}
        for impl in ("reference", "auto"):
            torch.manual_seed(0)
            nets[impl] = build(impl).to(CUDA).double()
        x = torch.randn(shape, device=CUDA, dtype=torch.float64)
        grads = {}
        for impl, net in nets.items():
            out = net(x, inst[: shape[0]]) if isinstance(net, Encoder) else net(x)
            out = out if isinstance(out, torch.Tensor) else torch.cat([o[-1].flatten() for o in out])
            out.square().sum().backward()
            grads[impl] = (out.detach(), [p.grad for p in net.parameters()])
        assert rel_err(grads["auto"][0], grads["reference"][0]) < 1e-9
        scale = max(g.abs().max().item() for g in grads["reference"][1])
        for ours, theirs in zip(grads["auto"][1], grads["reference"][1]):
            assert (ours - theirs).abs().max().item() <= 1e-9 * scale


def test_forward_ad_and_double_backward_on_cuda():
    x = torch.randn(2, 3, 5, 6, device=CUDA, dtype=torch.float64)
    inst = cityscapes_like(2, 5, 6, seed=5).to(CUDA)
    assert_forward_ad_matches(lambda t: ops.instance_norm_act(t, "leaky_relu", impl="triton"),
                              lambda t: ops.instance_norm_act(t, "leaky_relu", impl="reference"), x, torch.randn_like(x))
    assert_forward_ad_matches(lambda t: ops.instance_mean(t, inst, impl="triton"),
                              lambda t: ops.instance_mean(t, inst, impl="reference"), x, torch.randn_like(x))
    for activation in ("relu", "leaky_relu", "none"):
        assert torch.autograd.gradgradcheck(lambda t: ops.instance_norm_act(t, activation, impl="triton"),
                                            (x[:1, :2].clone().requires_grad_(True),))


def test_cuda_encoder_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    from fastp2phd.models import Encoder

    torch.manual_seed(0)
    netE = Encoder(3, 3, ngf=4, n_downsampling=2).eval().to(CUDA)
    exported = torch.export.export(netE, (torch.randn(1, 3, 16, 32, device=CUDA),
                                          cityscapes_like(1, 16, 32, seed=0).to(CUDA)))
    assert_no_fastp2phd_ops(str(exported.graph))
    example = (torch.randn(1, 3, 16, 32, device=CUDA), cityscapes_like(1, 16, 32, seed=0).to(CUDA))
    other = (torch.randn(2, 3, 24, 40, device=CUDA), cityscapes_like(2, 24, 40, seed=1).to(CUDA))
    assert export_and_run_onnx(netE, example, other, ["image", "inst"], tmp_path / "e.onnx") < 1e-4


@pytest.mark.parametrize("precision,unit_roundoff", [("fp16", 2.0 ** -11), ("bf16", 2.0 ** -9)])
def test_cuda_inference_precision(precision, unit_roundoff):
    """16-bit autocast on the GPU (instance features encoded, the Triton norm and instance mean): a float32
    image within the PSNR floor derived from the type's unit roundoff (see support.psnr_floor)."""
    from support import psnr, psnr_floor

    from fastp2phd.pix2pixhd import Pix2PixHD
    from fastp2phd.specs import ModelSpec

    torch.manual_seed(0)
    spec = ModelSpec(label_nc=35, instance_feat=True, feat_num=3, nef=8, n_downsample_E=2, ngf=16,
                     n_downsample_global=2, n_blocks_global=2)
    model = Pix2PixHD(spec).cuda().eval()
    inst = cityscapes_like(1, 64, 128).cuda()
    label = (inst // 1000).where(inst >= 1000, inst).clamp(max=34)
    image = torch.rand(1, 3, 64, 128, device="cuda") * 2 - 1
    expected = model.inference(label, inst, image)
    got = model.inference(label, inst, image, precision=precision)
    assert got.dtype == torch.float32 and not torch.equal(got, expected)
    assert psnr(got, expected) >= psnr_floor(model, unit_roundoff)

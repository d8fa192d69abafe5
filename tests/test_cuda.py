"""The fast paths on a CUDA device: parity at pix2pixHD's real shapes, registration, networks.

Skipped without a GPU; ``bench/gpu_check.sh`` runs it on one.
"""
from __future__ import annotations

import random

import pytest
import torch
from autograd_modes import assert_forward_ad_matches
from export_checks import assert_no_fastp2phd_ops, export_and_run_onnx
from layouts import VIEW_KINDS, check_boundary_map, check_instance_mean, check_instance_norm_act
from support import cityscapes_like, grad_err, instance_mean_loop, instance_norm_act_definition, pytorch_errors, rel_err

from fastp2phd import ops
from fastp2phd.ops._common import memory_format_of
from fastp2phd.ops._dispatch import select

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def test_auto_selects_the_gpu_fast_paths():
    paths = ops.fast_paths()
    assert select("boundary_map", "auto", CUDA, paths["boundary_map"]).name == "cuda"
    assert select("instance_mean", "auto", CUDA, paths["instance_mean"]).name == "triton"
    assert select("instance_norm_act", "auto", CUDA, paths["instance_norm_act"]).name == "triton"


# ----------------------------------------------------------------------------- boundary_map


@pytest.mark.parametrize("id_dtype", [torch.uint8, torch.int16, torch.int32, torch.int64, torch.float32])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16, torch.uint8, torch.bool])
def test_boundary_map_cuda_matches_reference(id_dtype, out_dtype):
    for shape in ((1, 1, 1, 1), (1, 1, 1, 37), (1, 1, 37, 1), (3, 1, 17, 300)):
        inst = torch.randint(0, 4, shape, device=CUDA).to(id_dtype)
        assert torch.equal(ops.boundary_map(inst, dtype=out_dtype, impl="cuda"),
                           ops.boundary_map(inst, dtype=out_dtype, impl="reference"))


def test_boundary_map_cuda_full_resolution_batch():
    inst = cityscapes_like(4, 1024, 2048, seed=0).to(CUDA)
    assert torch.equal(ops.boundary_map(inst, impl="cuda"), ops.boundary_map(inst.cpu(), impl="cpp").to(CUDA))


def test_boundary_map_cuda_opcheck_and_compile():
    inst = torch.randint(0, 4, (2, 1, 33, 65), device=CUDA, dtype=torch.int32)
    torch.library.opcheck(torch.ops.fastp2phd.boundary_map.default, (inst, torch.float32))
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: ops.boundary_map(t) * 3, fullgraph=True)
    assert torch.equal(compiled(inst), ops.boundary_map(inst, impl="reference") * 3)


# ----------------------------------------------------------------------------- instance_mean


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_instance_mean_triton_full_resolution(dtype):
    inst = cityscapes_like(1, 1024, 2048, seed=1).to(CUDA)
    feat = torch.randn(1, 3, 1024, 2048, device=CUDA).to(dtype)
    expected = ops.instance_mean(feat.double(), inst, impl="reference")
    out = ops.instance_mean(feat, inst, impl="triton")
    bound = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype) or 2 * rel_err(expected.to(dtype), expected) + 1e-12
    assert out.dtype == dtype and rel_err(out, expected) <= bound


def test_instance_mean_triton_small_cases_and_gradient():
    cases = [
        (torch.randn(2, 3, 9, 7), torch.full((2, 1, 9, 7), 26001)),
        (torch.randn(1, 2, 6, 5), torch.arange(30).view(1, 1, 6, 5)),
        (torch.randn(2, 2, 30, 40), torch.randint(-3, 3, (2, 1, 30, 40)) * 2**40),
        (torch.randn(2, 4, 20, 30).contiguous(memory_format=torch.channels_last), torch.randint(0, 300, (2, 1, 20, 30))),
    ]
    for feat, inst in cases:
        feat, inst = feat.to(CUDA).requires_grad_(True), inst.to(CUDA)
        out = ops.instance_mean(feat, inst, impl="triton")
        assert rel_err(out, instance_mean_loop(feat.detach(), inst)) < 1e-6
        grad = torch.randn_like(out)
        out.backward(grad)
        assert rel_err(feat.grad, instance_mean_loop(grad, inst)) < 1e-6


def test_instance_mean_deterministic_mode_auto_runs_the_reference_and_by_name_refuses():
    inst = cityscapes_like(1, 64, 128, seed=2).to(CUDA)
    feat = torch.randn(1, 3, 64, 128, device=CUDA)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.warns(UserWarning, match="float atomics"):
            first = ops.instance_mean(feat, inst)
        second = ops.instance_mean(feat, inst)
        with pytest.raises(RuntimeError, match="use_deterministic_algorithms"):
            ops.instance_mean(feat, inst, impl="cuda")
        torch.use_deterministic_algorithms(True, warn_only=True)
        atomics = ops.instance_mean(feat, inst, impl="cuda")
    finally:
        torch.use_deterministic_algorithms(False)
    assert torch.equal(first, second)
    assert torch.equal(first, ops.instance_mean(feat, inst, impl="reference"))
    assert rel_err(atomics, instance_mean_loop(feat, inst)) < 1e-6


def test_instance_mean_triton_opcheck_and_compile():
    feat = torch.randn(2, 3, 16, 24, device=CUDA, requires_grad=True)
    inst = torch.randint(0, 5, (2, 1, 16, 24), device=CUDA) * 1000
    torch.library.opcheck(torch.ops.fastp2phd.instance_mean.default, (feat, inst))
    torch._dynamo.reset()
    compiled = torch.compile(lambda f, i: (ops.instance_mean(f, i) * f).sum(), fullgraph=True)
    compiled(feat, inst).backward()
    expected = feat.detach().clone().requires_grad_(True)
    (ops.instance_mean(expected, inst, impl="reference") * expected).sum().backward()
    assert rel_err(feat.grad, expected.grad) < 1e-5


# ----------------------------------------------------------------------------- instance_norm_act

NORM_SHAPES = [(1, 64, 1024, 512), (4, 256, 256, 128), (8, 1024, 64, 32), (2, 3, 1, 2), (3, 5, 7, 9)]


@pytest.mark.parametrize("shape", NORM_SHAPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_instance_norm_act_triton_within_twice_pytorch_error(shape, layout, dtype):
    g = torch.Generator(device=CUDA).manual_seed(0)
    x = (torch.randn(shape, device=CUDA, generator=g) * 2 + 0.5).to(dtype)
    grad = torch.randn(shape, device=CUDA, generator=g).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    for activation in ("relu", "leaky_relu", "none"):
        forward_error, backward_error = pytorch_errors(x, grad, activation, 0.2)
        x64 = x.detach().double().requires_grad_(True)
        expected = instance_norm_act_definition(x64, activation)
        expected.backward(grad.double())
        xt = x.detach().clone().requires_grad_(True)
        y = ops.instance_norm_act(xt, activation, impl="triton")
        y.backward(grad)
        assert memory_format_of(y) == memory_format_of(x)
        floor = 1e-6 if dtype == torch.float32 else 0.0  # where PyTorch happens to be exact
        assert rel_err(y, expected) <= max(2 * forward_error, floor), activation
        assert grad_err(xt.grad, x64.grad, x, grad) <= max(2 * backward_error, floor), activation


def test_instance_norm_act_triton_opcheck_and_compile():
    x = torch.randn(2, 8, 16, 16, device=CUDA, requires_grad=True)
    torch.library.opcheck(torch.ops.fastp2phd.instance_norm_act.default, (x, "leaky_relu", 0.2, 1e-5))
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: ops.instance_norm_act(t, "relu").square().sum(), fullgraph=True)
    compiled(x).backward()
    expected = x.detach().clone().requires_grad_(True)
    ops.instance_norm_act(expected, "relu", impl="reference").square().sum().backward()
    assert rel_err(x.grad, expected.grad) < 1e-5


# ----------------------------------------------------------------------------- networks


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


# ----------------------------------------------------------------------------- drop-in: views, autograd modes, export

CUDA_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_views_instance_norm_act_triton(kind, seed, poisoned_empty):
    check_instance_norm_act("triton", CUDA, random.Random(f"cuda norm {kind} {seed}"), kind, CUDA_FLOATS)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_views_instance_mean_triton(kind, seed):  # not poisoned: deterministic mode would run the reference
    check_instance_mean("triton", CUDA, random.Random(f"cuda mean {kind} {seed}"), kind, CUDA_FLOATS)


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize("kind", VIEW_KINDS)
def test_views_boundary_map_cuda(kind, seed, poisoned_empty):
    check_boundary_map("cuda", CUDA, random.Random(f"cuda boundary {kind} {seed}"), kind)


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

"""Generator inference as users would deploy it, batch 1, on a synthetic street scene's encoded labels.

Providers: ``fp32`` (torch eager, float32), ``bf16`` (torch eager under bfloat16 autocast, as
``--precision bf16`` runs it), ``onnxruntime`` (the generator ``fastp2phd export-onnx`` writes, on
onnxruntime's CPU provider), ``compile`` (``torch.compile`` of the generator), ``optimized fp32`` and
``optimized bf16`` (after ``fastp2phd.optimize_for_inference``, as ``test --optimize`` and the editor run),
``optimized + compile fp32`` and ``bf16`` (also compiled with the weights frozen in, as ``test --optimize
--compile`` runs; its compile time is not counted); on CUDA also
``fp16`` and ``compile + CUDA graphs`` (``mode="reduce-overhead"``). Each row records its PSNR
against fp32 on the same input; peak memory is the growth of the process during one call (not
measured for onnxruntime, whose memory arena is kept from the warm-up). Networks have random (seeded) weights: speed does not depend on
them. ``demo model`` times the trained demo model on its held-out scenes when ``make demo`` has run
(``demo_output/``), and its PSNR is the one the bf16 target is judged on.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import compiled_or_skip, measure

from fastp2phd import optimize_for_inference
from fastp2phd.compiling import compile_networks
from fastp2phd.data import render_scene
from fastp2phd.pix2pixhd import Pix2PixHD, fastest_precision
from fastp2phd.specs import ModelSpec

SUITE = "inference precision"
DEMO_RUN = Path(__file__).resolve().parents[1] / "demo_output"

# The published configurations (label2city_512p and label2city_1024p), 35 labels + boundary map.
CONFIGS = {
    "512p": ModelSpec(label_nc=35, netG="global", ngf=64, n_downsample_global=4, n_blocks_global=9),
    "1024p": ModelSpec(label_nc=35, netG="local", ngf=32, n_downsample_global=4, n_blocks_global=9,
                       n_local_enhancers=1, n_blocks_local=3),
}
CASES = [("1024p", 256, 512), ("1024p", 512, 1024), ("1024p", 1024, 2048), ("512p", 512, 1024)]  # 1024p: a size scale
PROVIDERS = ["fp32", "bf16", "optimized fp32", "optimized bf16", "optimized + compile fp32",
             "optimized + compile bf16", "onnxruntime", "compile", "fp16", "compile + CUDA graphs"]
CUDA_ONLY = {"fp16", "compile + CUDA graphs"}

_fp32_outputs: dict[str, torch.Tensor] = {}  # case -> fp32 output, for the PSNR of the other providers


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of images in [-1, 1] (peak-to-peak 2)."""
    mse = (a.double().cpu() - b.double().cpu()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)


def case_model(settings, config: str, height: int, width: int) -> tuple[str, Pix2PixHD, torch.Tensor]:
    spec = CONFIGS[config]
    if settings.smoke:
        spec, height, width = spec.replace(ngf=8, n_downsample_global=2, n_blocks_global=1, n_blocks_local=1), 64, 128
    torch.manual_seed(0)
    model = Pix2PixHD(spec).to(settings.device).eval()
    # A scene drawn at most at 512x1024 (the renderer's range), enlarged by nearest neighbour.
    label, inst, _ = render_scene(min(height, 512), min(width, 1024), seed=0)
    label, inst = (F.interpolate(torch.from_numpy(m.astype(np.int64))[None, None].double(), size=(height, width),
                                 mode="nearest").long().to(settings.device) for m in (label, inst))
    x = model.encode_input(label, inst)
    return f"{config} generator at {height}x{width}", model, x


def provider_fn(settings, provider: str, model: Pix2PixHD, x: torch.Tensor, tmp_path: Path):
    """A callable that generates from ``x`` as ``provider`` does, or a skip."""
    device = settings.device
    if provider in CUDA_ONLY and not settings.cuda:
        pytest.skip(f"{provider}: CUDA only")
    if provider.endswith("bf16") and fastest_precision(device) != "bf16":
        pytest.skip(f"{provider}: this CPU has no native bfloat16 (AVX512-BF16 or AMX), so bf16 is emulated at minutes "
                    "per image; --precision auto runs fp32 here")
    if provider.startswith("optimized "):
        optimized, precision = optimize_for_inference(copy.deepcopy(model)), provider.split()[-1]
        if "compile" in provider and not compile_networks([optimized.netG], "default", device, what="inference",
                                                          freeze=True):
            pytest.skip("torch.compile does not work here")

        def fn():
            with torch.inference_mode(), optimized.precision_scope(device, precision):
                return optimized.netG(x).float()
        return fn
    if provider in ("fp32", "bf16", "fp16"):
        def fn():
            with torch.inference_mode(), model.precision_scope(device, provider):
                return model.netG(x).float()
        return fn
    if provider == "onnxruntime":
        if settings.cuda:
            pytest.skip("onnxruntime: timed on its CPU provider, in the CPU run")
        ort = pytest.importorskip("onnxruntime")
        from fastp2phd.inference import export_onnx

        path, _ = export_onnx(model, tmp_path / "g.onnx")
        options = ort.SessionOptions()  # torch's thread count: onnxruntime's default is every physical core
        options.intra_op_num_threads, options.inter_op_num_threads = torch.get_num_threads(), 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"input": x.cpu().numpy()}
        return lambda: torch.from_numpy(session.run(["image"], feed)[0])
    if provider == "compile":
        def run(inp):
            with torch.inference_mode():
                return model.netG(inp)
        compiled = compiled_or_skip(run, x)
        return lambda: compiled(x)
    graphed = torch.compile(model.netG, dynamic=False, mode="reduce-overhead")  # captures CUDA graphs

    def run_graphed():
        with torch.inference_mode():
            return graphed(x).clone()  # the graph's output buffer is reused by the next replay
    return run_graphed


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("config,height,width", CASES)
def test_generator_inference(benchmark, settings, tmp_path, config, height, width, provider):
    if settings.smoke and (config, height) != ("1024p", 512):
        pytest.skip("smoke run")
    case, model, x = case_model(settings, config, height, width)
    fn = provider_fn(settings, provider, model, x, tmp_path)
    if case not in _fp32_outputs:
        with torch.inference_mode():
            _fp32_outputs[case] = model.netG(x).float().cpu()
    benchmark.extra_info["psnr_db"] = psnr(fn(), _fp32_outputs[case])
    if settings.smoke and not provider.endswith(("bf16", "fp16")):  # a float32 provider computes fp32's image
        assert benchmark.extra_info["psnr_db"] > 60, f"{provider}: PSNR {benchmark.extra_info['psnr_db']:.1f} dB against fp32"
    measure(benchmark, settings, suite=SUITE, case=case, provider=provider, fn=fn, images=1,
            slow=not settings.cuda, rounds=2 if width >= 2048 and not settings.cuda else None)
    if provider == "onnxruntime":  # its memory arena outlives the warm-up, so a call's growth (0) says nothing
        benchmark.extra_info["peak_mb"] = None


@pytest.mark.parametrize("provider", ["fp32", "bf16"])
def test_demo_model_on_held_out_scenes(benchmark, settings, provider):
    """The trained demo model: time per scene and the lowest PSNR against fp32 over the held-out scenes."""
    if settings.smoke or not (DEMO_RUN / "checkpoints" / "demo").is_dir():
        pytest.skip("needs a demo run (make demo)")
    from fastp2phd.data import create_dataset
    from fastp2phd.demo import demo_data
    from fastp2phd.inference import load_run

    model = load_run(DEMO_RUN / "checkpoints" / "demo", device=settings.device)
    test_set = create_dataset(demo_data(DEMO_RUN, "test", 0))
    scenes = [tuple(test_set[i][k][None].to(settings.device) for k in ("label", "inst", "image"))
              for i in range(len(test_set))]
    benchmark.extra_info["psnr_db"] = min(psnr(model.inference(*s, precision=provider), model.inference(*s))
                                          for s in scenes)
    height, width = scenes[0][0].shape[-2:]

    def fn():
        for scene in scenes:
            model.inference(*scene, precision=provider)

    measure(benchmark, settings, suite=SUITE, case=f"demo model, {len(scenes)} held-out scenes of {height}x{width}",
            provider=provider, fn=fn, images=len(scenes))


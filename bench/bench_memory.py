"""Training memory: the estimated peak of one training step (``fastp2phd.memory``: fake tensors, so the
full 2048x1024 configurations estimate on any machine) for the published configurations, the original
code's layout next to fastp2phd's with and without activation checkpointing, in fp32 and bf16 autocast;
on a GPU, torch.cuda.max_memory_allocated of the real step beside each estimate. Then the time cost of
checkpointing: a training step with and without it, measured in one run."""
from __future__ import annotations

import pytest
import torch
from harness import measure
from official import official_train_step_class

from fastp2phd.cli import build_parser
from fastp2phd.memory import estimate_training_step, measure_training_step
from fastp2phd.models.vgg import Vgg19
from fastp2phd.options import finish_options, train_spec
from fastp2phd.train_step import TrainStep

# The published configurations: label2city_512p (G1 on 1024x512 crops of the width-1024 images) and
# label2city_1024p with instance features (G2, on the full 2048x1024 images), 2 discriminators each.
CONFIGS = {
    "label2city_512p": (["--netG", "global", "--ngf", "64", "--resize_or_crop", "none"], (512, 1024)),
    "label2city_1024p + features": (["--netG", "local", "--ngf", "32", "--instance_feat", "--resize_or_crop", "none"],
                                    (1024, 2048)),
}
SMOKE = ["--ngf", "8", "--n_downsample_global", "2", "--n_blocks_global", "1", "--ndf", "8", "--nef", "4",
         "--n_downsample_E", "2", "--n_blocks_local", "1"]
LAYOUTS = {"original": [], "fastp2phd": [], "fastp2phd + checkpointing": ["--checkpoint_activations"]}
PRECISIONS = {"fp32": [], "bf16": ["--fp16", "--amp_dtype", "bf16"]}


def options(argv):
    return train_spec(finish_options(build_parser().parse_args(["train", *argv]), is_train=True))


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("config", CONFIGS)
def test_training_memory(benchmark, settings, config, layout, precision):
    argv, size = CONFIGS[config]
    if settings.smoke:
        argv, size = argv + SMOKE, (64, 128)
    opt = options(argv + LAYOUTS[layout] + PRECISIONS[precision])
    step_class = official_train_step_class() if layout == "original" else TrainStep
    estimate = benchmark.pedantic(estimate_training_step, args=(opt, size, "cuda", step_class), rounds=1, iterations=1)
    measured = measure_training_step(opt, size, step_class) if settings.cuda else None
    benchmark.group = f"training memory | {config}"
    benchmark.extra_info.update(
        suite="training memory", case=f"{config} at {size[1]}x{size[0]}, {precision}", provider=layout,
        estimated_bytes=estimate.peak_bytes, measured_bytes=measured, fits_gpu_gb=estimate.fits_gpu_gb,
        peak_during=estimate.peak_during, flops=estimate.flops, at_peak=estimate.at_peak,
    )


@pytest.mark.parametrize("provider", ["fastp2phd", "fastp2phd + checkpointing"])
def test_checkpointing_time(benchmark, settings, provider):
    """One training step of the 1024p configuration (full networks; a reduced size on the CPU), with and
    without activation checkpointing: what the memory saving costs in time."""
    argv, size = CONFIGS["label2city_1024p + features"]
    if settings.smoke:
        argv, size = argv + SMOKE, (32, 64)
    elif not settings.cuda:
        size = (256, 512)
    opt = options(argv + LAYOUTS[provider] + ["--device", settings.device.type])
    torch.manual_seed(0)
    step = TrainStep(opt, settings.device, vgg=Vgg19(pretrained=False))
    g = torch.Generator().manual_seed(1)
    h, w = size
    batch = {"label": torch.randint(0, 35, (1, 1, h, w), generator=g), "image": torch.rand(1, 3, h, w, generator=g) * 2 - 1,
             "inst": torch.randint(0, 4, (1, 1, h, w), generator=g) * 1000 + 26000}
    measure(benchmark, settings, suite="checkpointing cost", case=f"1024p G2 + E + 2 D + VGG loss, one step at {w}x{h}",
            provider=provider, fn=lambda: step.step(batch), images=1, slow=True)

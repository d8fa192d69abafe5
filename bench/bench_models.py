"""Whole networks: generator inference, encoder with instance pooling, a full training step
(G + D + all losses, with and without instance features), and feature encoding + K-means.

Providers: ``fastp2phd`` (fused modules, fast paths), ``reference`` (the same networks on the
pure-PyTorch ops), ``official`` (the original's plain InstanceNorm2d + ReLU modules,
Python-loop instance pooling, and for the training step the original's step: official.py's
OfficialTrainStep) and, for the training step, ``compile`` (fastp2phd with ``--compile``:
``reduce-overhead``, so CUDA graphs, on a GPU; ``default`` on the CPU) and ``channels_last`` (fastp2phd with
``--channels_last``: every network and image NHWC, the tensor-core layout) and ``cudnn_benchmark`` (fastp2phd
with cuDNN's convolution autotuning on, GPU only: whether the fixed-size step should set it). On the CPU the
networks run at reduced sizes (stated in each case) so that `make bench` fits in 15 minutes on 2 cores; on a
GPU at the real ones.
"""
from __future__ import annotations

import gc
import types

import pytest
import torch
from harness import bytes_in_use, check_agrees, instance_maps, measure
from official import OfficialGANLoss, official_instance_features, official_instance_pool, official_train_step_class

from fastp2phd.cli import build_parser
from fastp2phd.compiling import compile_networks
from fastp2phd.features import FeatureCollector, cluster_features
from fastp2phd.models import Encoder, GlobalGenerator, LocalEnhancer, VGGLoss, Vgg19
from fastp2phd.options import finish_options, train_spec
from fastp2phd.specs import TrainSpec

PROVIDERS = ["fastp2phd", "reference", "official"]


def network_kwargs(provider: str) -> dict:
    if provider == "official":
        return {"fused": False}
    return {"impl": "reference" if provider == "reference" else "auto"}


class OfficialEncoder(Encoder):
    """The encoder with the original Python-loop instance pooling."""

    def forward(self, input, inst):
        return official_instance_pool(self.model(input), inst)


def generator_case(settings, name):
    if settings.smoke:
        return (lambda kw: GlobalGenerator(36, 3, 8, 2, 1, **kw)), (1, 36, 32, 64)
    if name == "512p global":
        size = (512, 1024) if settings.cuda else (256, 512)
        return (lambda kw: GlobalGenerator(36, 3, 64, 4, 9, **kw)), (1, 36, *size)
    size = (1024, 2048) if settings.cuda else (256, 512)
    return (lambda kw: LocalEnhancer(36, 3, 32, 4, 9, 1, 3, **kw)), (1, 36, *size)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", ["512p global", "1024p local"])
def test_generator_forward(benchmark, settings, name, provider):
    if settings.smoke and name != "512p global":
        pytest.skip("smoke run")
    build, shape = generator_case(settings, name)
    torch.manual_seed(0)
    net = build(network_kwargs(provider)).to(settings.device).eval()
    x = torch.randn(shape, device=settings.device)

    def fn():
        with torch.inference_mode():
            return net(x)

    if settings.smoke:  # the same network (one seed) on the reference ops gives the same image
        torch.manual_seed(0)
        reference = build(network_kwargs("reference")).to(settings.device).eval()
        with torch.inference_mode():
            check_agrees(settings, fn(), reference(x), what=f"generator forward {provider}", atol=1e-4, rtol=1e-4)
    measure(benchmark, settings, suite="generator forward", case=f"{name} at {shape[2]}x{shape[3]}",
            provider=provider, fn=fn, images=shape[0], slow=not settings.cuda)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_encoder_forward(benchmark, settings, provider):
    n, h, w = (1, 32, 64) if settings.smoke else (1, 512, 1024)
    torch.manual_seed(0)
    cls = OfficialEncoder if provider == "official" else Encoder
    net = cls(3, 3, 16, 4 if not settings.smoke else 2, **network_kwargs(provider)).to(settings.device).eval()
    image = torch.randn(n, 3, h, w, device=settings.device)
    inst = instance_maps(settings, n, h, w)

    def fn():
        with torch.no_grad():
            return net(image, inst)

    if settings.smoke:
        torch.manual_seed(0)
        reference = Encoder(3, 3, 16, 2, **network_kwargs("reference")).to(settings.device).eval()
        with torch.no_grad():
            check_agrees(settings, fn(), reference(image, inst), what=f"encoder forward {provider}", atol=1e-4,
                         rtol=1e-4)
    measure(benchmark, settings, suite="encoder forward", case=f"{n}x3x{h}x{w} with instance pooling",
            provider=provider, fn=fn, images=n)


def training_options(settings, features: bool, size: tuple[int, int], extra: list[str] = (),
                     full_depth: bool = False) -> TrainSpec:
    """Train options for the bench (no VGG: the bench sets a random one); the smoke run shrinks the networks
    unless ``full_depth``."""
    h, w = size
    argv = ["train", "--name", "bench", "--dataroot", "synthetic", "--synthetic_size", "4", "--nThreads", "0",
            "--fineSize", str(w), "--loadSize", str(w), "--resize_or_crop", "none", "--no_vgg_loss",
            "--no_progress", "--no_html", "--checkpoints_dir", "/tmp/fastp2phd-bench-checkpoints",
            "--device", settings.device.type, *extra]
    if settings.smoke and not full_depth:
        argv += ["--ngf", "8", "--n_downsample_global", "2", "--n_blocks_global", "1", "--ndf", "8", "--nef", "4",
                 "--n_downsample_E", "2"]
    if features:
        argv.append("--instance_feat")
    return train_spec(finish_options(build_parser().parse_args(argv), is_train=True))


# (name, features, options, (height, width) on a GPU, on the CPU (None: not on that device))
TRAINING_CASES = [
    ("512p global G + 2 D + GAN/FM/VGG losses", False, [], (512, 1024), (128, 256)),
    ("512p global G + 2 D + GAN/FM/VGG losses", True, [], (512, 1024), (128, 256)),
    # --fp16 on the CPU: bfloat16 autocast, which pays only with native bfloat16 instructions
    ("512p global G + 2 D + GAN/FM/VGG losses, bf16", False, ["--fp16", "--amp_dtype", "bf16"], None, (128, 256)),
    ("label2city_1024p: local G + E + 2 D + losses", True, ["--netG", "local", "--ngf", "32"], (1024, 2048), None),
    ("label2city_1024p: local G + E + 2 D + losses, bf16", True,
     ["--netG", "local", "--ngf", "32", "--fp16", "--amp_dtype", "bf16"], (1024, 2048), None),
]


# Provider by provider (each over every case), compile last: a run cut short (a GPU call's time limit) has
# the eager rows of every case, and the rows measured so far are kept (conftest.py).
@pytest.mark.parametrize("index", range(len(TRAINING_CASES)))
@pytest.mark.parametrize("provider", PROVIDERS + ["channels_last", "cudnn_benchmark", "compile"])
def test_training_step(benchmark, settings, index, provider, monkeypatch):
    from fastp2phd.training import Trainer

    name, features, extra, gpu_size, cpu_size = TRAINING_CASES[index]
    if settings.smoke and index > 1 or (cpu_size, gpu_size)[settings.cuda] is None:
        pytest.skip("smoke run" if settings.smoke else f"not a case on {settings.device.type}")
    if provider == "compile" and "--fp16" in extra and not settings.cuda:
        pytest.skip("the CPU's bf16 case measures eager autocast")
    if provider == "cudnn_benchmark":
        if not settings.cuda:
            pytest.skip("cuDNN is a GPU's")
        monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    size = (32, 64) if settings.smoke else (gpu_size if settings.cuda else cpu_size)
    if provider == "compile":
        if settings.smoke:
            pytest.skip("compiling takes a minute on the CPU: tests/test_compiling.py covers it")
        extra = [*extra, "--compile", "reduce-overhead" if settings.cuda else "default"]
    if provider == "channels_last":
        extra = [*extra, "--channels_last"]
    opt = training_options(settings, features, size, extra)
    # Peak memory counts from before the trainer is built: its networks, optimisers and whatever a step keeps
    # between calls (the original's keeps its gradients; fastp2phd's frees them), as a run needs them.
    gc.collect()
    memory_base = bytes_in_use(settings)
    torch.manual_seed(0)
    trainer = Trainer(opt, settings.device)
    step = trainer.step
    if provider == "official":
        _make_official(step)
    elif provider == "reference":
        monkeypatch.setenv("FASTP2PHD_IMPL", "reference")
    # The VGG loss with random weights: the same work as the real one, no download needed. (Seeded here: the
    # official row drew more numbers above, and every row's VGG must be the same network.)
    torch.manual_seed(1)
    step.vgg_loss = VGGLoss(vgg=Vgg19(pretrained=False)).to(settings.device, memory_format=step.memory_format)
    if provider == "compile":  # as --compile compiles the VGG loss with G and D (TrainStep did before it was set)
        compile_networks([step.vgg_loss], opt.compile, settings.device)
    batch = next(iter(trainer.loader))
    case = f"{name} at {size[0]}x{size[1]}" + (" + E" if features and index < 2 else "")
    if settings.smoke:
        case = "smoke " + ("+ E" if features else "")
    if settings.smoke:
        check_first_step_agrees(settings, f"training step {case}", provider, step, batch)
    measure(benchmark, settings, suite="training step", case=case, provider=provider,
            fn=lambda: step.step(batch), images=opt.batchSize, slow=not settings.cuda, memory_base=memory_base)


_first_step_losses: dict[str, tuple[str, dict]] = {}  # case -> (provider, losses of its first step), smoke runs


def check_first_step_agrees(settings, case: str, provider: str, step, batch: dict) -> None:
    """Every provider's first step of ``case``: the same losses from the same weights and batch (smoke runs)."""
    values = {k: torch.tensor(float(v)) for k, v in step.step(batch)[0].items()}
    first = _first_step_losses.setdefault(case, (provider, values))
    check_agrees(settings, values, first[1], what=f"{case}: {provider} vs {first[0]}", atol=1e-5, rtol=1e-3)


def _make_official(step) -> None:
    """Swap a TrainStep's networks for plain-module copies with the same weights (and loop pooling), and its
    step for the original's (official.py): D run on the pooled fake and on the real pair separately, every loss
    built with the original's formulation before G's backward, then D's backward."""
    model = step.model
    netG = type(model.netG)(**model.netG.options, fused=False).to(step.device)
    netG.load_state_dict(model.netG.state_dict())
    model.netG = netG
    if model.netE is not None:
        netE = OfficialEncoder(**model.netE.options, fused=False).to(step.device)
        netE.load_state_dict(model.netE.state_dict())
        model.netE = netE
    o = step.netD.options
    netD = type(step.netD)(o["input_nc"], o["ndf"], o["n_layers"], o["norm"], num_D=o["num_D"],
                              getIntermFeat=o["getIntermFeat"], fused=False).to(step.device)
    netD.load_state_dict(step.netD.state_dict())
    step.netD = step.disc = netD
    step.gen = model
    step.optimizer_G = torch.optim.Adam(list(netG.parameters()) + (list(model.netE.parameters()) if model.netE
                                           is not None else []), lr=step.spec.lr, betas=(step.spec.beta1, 0.999))
    step.optimizer_D = torch.optim.Adam(netD.parameters(), lr=step.spec.lr, betas=(step.spec.beta1, 0.999))
    step.gan_loss = OfficialGANLoss(use_lsgan=not step.spec.no_lsgan)
    step.step = types.MethodType(official_train_step_class().step, step)


@pytest.mark.parametrize("provider", ["fastp2phd", "official"])
def test_feature_encoding_and_kmeans(benchmark, settings, provider):
    n, h, w = (2, 32, 64) if settings.smoke else (8, 256, 512)
    torch.manual_seed(0)
    encoder = Encoder(3, 3, 16, 2 if settings.smoke else 4).to(settings.device).eval()
    images = torch.randn(n, 3, h, w, device=settings.device)
    inst = instance_maps(settings, n, h, w, seed=5)

    def fn():
        with torch.no_grad():
            feat = encoder(images, inst)
        if provider == "fastp2phd":
            collector = FeatureCollector()
            collector.add(feat, inst)
            features = collector.result()
        else:
            # float32 as the collector's: both rows then run the same K-means (on float64 it is another computation)
            features = {k: torch.from_numpy(v).float() for k, v in official_instance_features(feat, inst).items()
                        if len(v)}
        return cluster_features(features, n_clusters=10, device=settings.device)

    if settings.smoke:  # the same features and clusters as the collector's
        with torch.no_grad():
            feat = encoder(images, inst)
        collector = FeatureCollector()
        collector.add(feat, inst)
        check_agrees(settings, fn(), cluster_features(collector.result(), n_clusters=10, device=settings.device),
                     what=f"features + k-means {provider}")
    measure(benchmark, settings, suite="features + k-means", case=f"encode {n} scenes of {h}x{w} and cluster",
            provider=provider, fn=fn, images=n, slow=True)

"""The training step's memory savings change nothing: the same losses and the same updated weights, bit for
bit in fp32 on the CPU, as the plain step (the original code's order and losses: every loss built, with
F.l1_loss and all VGG features, before G's backward; plain InstanceNorm2d + ReLU modules)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastp2phd.cli import build_parser
from fastp2phd.models.vgg import Vgg19
from fastp2phd.options import finish_options, train_spec
from fastp2phd.train_step import LOSS_NAMES, TrainStep

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from official import official_train_step_class  # noqa: E402

TINY = ["--ngf", "8", "--n_downsample_global", "2", "--n_blocks_global", "2", "--ndf", "8", "--nef", "4",
        "--n_downsample_E", "2", "--batchSize", "2"]
CONFIGS = {
    "global": [],
    "global + features": ["--instance_feat"],
    "local": ["--netG", "local", "--n_blocks_local", "1"],
    "local + features, pool, vanilla GAN": ["--netG", "local", "--n_blocks_local", "1", "--instance_feat",
                                            "--pool_size", "2", "--no_lsgan"],
}


def batch(h=64, w=128, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"label": torch.randint(0, 35, (n, 1, h, w), generator=g),
            "inst": torch.randint(0, 4, (n, 1, h, w), generator=g) * 1000 + 26000,
            "image": torch.rand(n, 3, h, w, generator=g) * 2 - 1}


def run(step_class, argv, steps=2):
    """Losses of ``steps`` steps and every weight after them, from one seed."""
    opt = finish_options(build_parser().parse_args(["train", "--resize_or_crop", "none", *TINY, *argv]), is_train=True)
    torch.manual_seed(0)
    step = step_class(train_spec(opt), torch.device("cpu"), vgg=Vgg19(pretrained=False))
    losses = [step.step(batch(seed=1 + i))[0] for i in range(steps)]
    weights = [t.detach().clone() for t in [*step.model.state_dict().values(), *step.netD.state_dict().values()]]
    return step, losses, weights


def assert_same(a, b):
    (_, losses_a, weights_a), (_, losses_b, weights_b) = a, b
    assert losses_a == losses_b
    assert len(weights_a) == len(weights_b)
    assert all(torch.equal(x, y) for x, y in zip(weights_a, weights_b))


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_step_order_and_lean_losses_change_nothing(config, monkeypatch):
    # Both steps normalise with PyTorch's own instance norm here, so the step itself is compared bit for bit;
    # the fused kernels round differently (the next test, and tests/test_models.py, compare them).
    monkeypatch.setenv("FASTP2PHD_IMPL", "reference")
    official = official_train_step_class(joint_discriminator=True, original_adam=False)
    assert_same(run(TrainStep, config), run(official, config))


def test_step_with_the_fused_kernels_matches_the_original_step():
    config = CONFIGS["local + features, pool, vanilla GAN"]
    (_, losses_a, weights_a), (_, losses_b, weights_b) = run(TrainStep, config), run(official_train_step_class(), config)
    for a, b in zip(losses_a, losses_b):
        assert a.keys() == b.keys() and all(a[k] == pytest.approx(b[k], rel=1e-5) for k in a)
    # Conv and linear weights. (The bias of a conv before an instance norm has an exact gradient of 0: its
    # rounding noise differs between the paths, and Adam turns any noise into a step of about lr.) The same
    # holds for a weight whose gradient happens to be near 0: on an AMD EPYC 2 of 349592 elements moved 3e-5
    # apart. So: every element within Adam's bound of 2 steps of lr, and all but 1 in 10^4 to rounding.
    pairs = [(x, y) for x, y in zip(weights_a, weights_b) if x.dim() > 1]
    assert len(pairs) > 10 and all(torch.allclose(x, y, rtol=0, atol=2 * 2 * 2e-4) for x, y in pairs)
    outside = sum((~torch.isclose(x, y, rtol=1e-4, atol=1e-5)).sum().item() for x, y in pairs)
    assert outside <= sum(x.numel() for x, _ in pairs) // 10_000, outside


def test_fused_adam_updates_as_the_original_adam(monkeypatch):
    # One step: the same gradients (reference norms, joint D), then fastp2phd's fused Adam against torch's default
    # one, as the original builds it. Their updates differ in rounding only: within a float32 ulp of each weight.
    monkeypatch.setenv("FASTP2PHD_IMPL", "reference")
    (step, _, weights_a), (official, _, weights_b) = (
        run(TrainStep, [], steps=1), run(official_train_step_class(joint_discriminator=True), [], steps=1))
    assert step.optimizer_G.defaults["fused"] and step.optimizer_D.defaults["fused"]
    assert not official.optimizer_G.defaults["fused"] and not official.optimizer_D.defaults["fused"]
    moved = [(a, b) for a, b in zip(weights_a, weights_b) if a.dtype.is_floating_point and not torch.equal(a, b)]
    assert moved  # (the steps updated the weights, and not identically)
    assert all(torch.allclose(a, b, rtol=2 ** -23, atol=1e-9) for a, b in moved)


def test_a_state_saved_with_the_unfused_adam_goes_on_fused():
    # A run saved before Adam was fused: load_state_dict alone would take the saved groups' fused=None.
    older, _, _ = run(official_train_step_class(joint_discriminator=True), [], steps=1)
    state = older.state_dict()
    step, _, _ = run(TrainStep, [], steps=0)
    step.load_state_dict(state)
    for optimizer in (step.optimizer_G, step.optimizer_D):
        assert all(group["fused"] for group in optimizer.param_groups)
        assert all(s["step"].item() == 1 and s["step"].dtype == torch.float32 for s in optimizer.state.values())
    step.step(batch(seed=2))
    assert all(s["step"].item() == 2 for s in step.optimizer_G.state.values())


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_activation_checkpointing_changes_nothing(config):
    assert_same(run(TrainStep, config + ["--checkpoint_activations"]), run(TrainStep, config))


def test_activation_checkpointing_changes_nothing_under_autocast():
    config = ["--netG", "local", "--n_blocks_local", "1", "--instance_feat", "--fp16"]
    assert_same(run(TrainStep, config + ["--checkpoint_activations"]), run(TrainStep, config))


def test_batch_norm_step_changes_nothing(monkeypatch):
    monkeypatch.setenv("FASTP2PHD_IMPL", "reference")  # (the encoder's instance norms: as above)
    official = official_train_step_class(True, original_adam=False)
    assert_same(run(TrainStep, ["--norm", "batch"]), run(official, ["--norm", "batch"]))


def test_gradients_are_freed_after_the_step():
    step, _, _ = run(TrainStep, ["--instance_feat"], steps=1)
    assert all(p.grad is None for p in [*step.model.parameters(), *step.netD.parameters()])


def test_d_activations_for_g_loss_are_freed_before_the_vgg_loss_is_built():
    # D's pass for G's loss keeps every layer's output for backward; G's losses give their gradients one branch at
    # a time, so none of them is alive through VGG's pass (they were: the 1024p step's peak, with checkpointing).
    import weakref

    from torch.utils._pytree import tree_leaves

    opt = finish_options(build_parser().parse_args(["train", "--resize_or_crop", "none", *TINY]), is_train=True)
    step = TrainStep(train_spec(opt), torch.device("cpu"), vgg=Vgg19(pretrained=False))
    d_outputs, alive_at_vgg = [], []
    step.netD.register_forward_hook(lambda module, args, out: d_outputs.append(
        [weakref.ref(t) for t in tree_leaves(out)]))
    step.vgg_loss.register_forward_pre_hook(lambda module, args: alive_at_vgg.append(
        sum(ref() is not None for ref in d_outputs[-1])))
    step.step(batch())
    assert len(d_outputs) == 2 and len(d_outputs[-1]) == 2 * 5  # (D's loss, then G's: 2 scales of 5 layers)
    assert alive_at_vgg == [0]


def generator_loss(argv):
    """One step's logged losses, the loss G's backward starts from, and the generated and real images."""
    opt = finish_options(build_parser().parse_args(["train", "--resize_or_crop", "none", *TINY, *argv]), is_train=True)
    torch.manual_seed(0)
    step = TrainStep(train_spec(opt), torch.device("cpu"), vgg=Vgg19(pretrained=False))
    scaled, scale = [], step.scaler.scale
    # D's loss, then G's in parts: D's branch (GAN and feature matching), then VGG's (and L1)
    step.scaler.scale = lambda loss: scaled.append(loss.detach()) or scale(loss)
    data = batch()
    values, fake = step.step(data)
    assert len(scaled) == 3
    return values, scaled[1].item() + scaled[2].item(), fake, data["image"]


def test_the_l1_loss_is_off_by_default():
    # (off, the step is the original's bit for bit: test_step_order_and_lean_losses_change_nothing)
    values, loss_G, _, _ = generator_loss([])
    assert tuple(values) == LOSS_NAMES
    assert loss_G == pytest.approx(values["G_GAN"] + values["G_GAN_Feat"] + values["G_VGG"], rel=1e-6)


def test_the_l1_loss_adds_lambda_times_the_mean_absolute_difference():
    values, loss_G, fake, real = generator_loss(["--lambda_l1", "7.5"])
    l1 = 7.5 * (fake - real).abs().mean().item()
    assert tuple(values) == ("G_GAN", "G_GAN_Feat", "G_VGG", "G_L1", "D_real", "D_fake")
    assert values["G_L1"] == pytest.approx(l1, rel=1e-6)
    assert loss_G == pytest.approx(values["G_GAN"] + values["G_GAN_Feat"] + values["G_VGG"] + l1, rel=1e-6)


@pytest.mark.parametrize("config", [CONFIGS["global + features"], CONFIGS["local + features, pool, vanilla GAN"]],
                         ids=["global + features", "local + features"])
def test_channels_last_trains_like_nchw_with_no_layout_round_trip(config):
    """--channels_last: the same losses as NCHW within float tolerance, over steps that start from updated
    weights (weights themselves are not compared: Adam turns rounding-level gradient differences near zero
    into steps of up to lr either way), and after the label
    encoding no 4-D activation of the step (G, E, D, VGG, losses, both backwards) falls back to NCHW."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from fastp2phd.ops._common import memory_format_of

    class NCHWOutputs(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                # A layout shows only where the plane and the channels both have more than one element.
                if isinstance(t, torch.Tensor) and t.dim() == 4 and t.is_floating_point() and min(t.shape[1:]) > 1 \
                        and memory_format_of(t) != torch.channels_last:
                    self.ops.add(str(func))
            return out

    _, nchw_losses, _ = run(TrainStep, config)
    step, losses, _ = run(TrainStep, [*config, "--channels_last"])
    for got, expected in zip(losses, nchw_losses):
        assert got == pytest.approx(expected, rel=1e-4, abs=1e-5)
    encoding = {"aten.zeros.default", "aten.scatter_.value", "aten.cat.default", "aten.expand.default"}
    data = batch(seed=7)
    with NCHWOutputs() as outputs:
        step.step(data)
    assert outputs.ops <= encoding, outputs.ops - encoding


def test_a_step_resumes_bit_for_bit_through_its_state_dict(tmp_path):
    """TrainStep.state_dict holds everything a step needs to continue: two steps in one go equal a step, a
    state_dict through a file into a fresh TrainStep, and the second step there."""
    import copy

    from fastp2phd.files import load_torch, save_torch
    from fastp2phd.specs import DataSpec, ModelSpec, TrainSpec
    from fastp2phd.train_step import TrainStep

    spec = TrainSpec(model=ModelSpec(ngf=4, n_downsample_global=2, n_blocks_global=1, instance_feat=True, nef=4,
                                     n_downsample_E=2),
                     data=DataSpec(dataroot="synthetic"), ndf=4, n_layers_D=2, no_vgg_loss=True, pool_size=0)
    torch.manual_seed(0)
    batches = [{"label": torch.randint(0, 35, (1, 1, 32, 64)), "inst": torch.randint(0, 3, (1, 1, 32, 64)),
                "image": torch.rand(1, 3, 32, 64) * 2 - 1, "feat": torch.zeros(1, 1, 32, 64)} for _ in range(2)]
    straight = TrainStep(spec, torch.device("cpu"))
    resumed = copy.deepcopy(straight)
    for batch in batches:
        straight.step(batch)
    resumed.step(batches[0])
    save_torch(resumed.state_dict(), tmp_path / "state.pth")
    torch.manual_seed(1)  # the fresh step's own initial weights differ
    fresh = TrainStep(spec, torch.device("cpu"))
    fresh.load_state_dict(load_torch(tmp_path / "state.pth"))
    fresh.step(batches[1])
    a, b = straight.state_dict(), fresh.state_dict()
    for key in ("netG", "netD", "netE"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key


def test_networks_start_from_pix2pixhd_initialisation():
    # The original's weights_init: conv weights N(0, 0.02), BatchNorm2d weights N(1, 0.02) and biases 0; conv
    # biases keep PyTorch's default. (PyTorch's own init gives these small convs a std of 0.03 to 0.1.)
    opt = finish_options(build_parser().parse_args(
        ["train", *TINY, "--netG", "local", "--n_blocks_local", "1", "--instance_feat", "--norm", "batch"]),
        is_train=True)
    torch.manual_seed(0)
    step = TrainStep(train_spec(opt), torch.device("cpu"), vgg=Vgg19(pretrained=False))
    convs = [m for net in (step.model, step.netD) for m in net.modules() if isinstance(m, torch.nn.modules.conv._ConvNd)]
    norms = [m for net in (step.model, step.netD) for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) > 20 and len(norms) > 10 and step.model.netE is not None
    large = [m.weight for m in convs if m.weight.numel() >= 2000]
    assert len(large) > 10
    for w in large:
        assert w.std().item() == pytest.approx(0.02, rel=0.15) and abs(w.mean().item()) < 0.003
    assert any(m.bias.abs().max() > 0.01 for m in convs if m.bias is not None)
    weights = torch.cat([m.weight.detach() for m in norms])
    assert weights.std().item() == pytest.approx(0.02, rel=0.2) and weights.mean().item() == pytest.approx(1, abs=0.005)
    assert all(torch.count_nonzero(m.bias) == 0 for m in norms)

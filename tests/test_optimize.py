"""optimize_for_inference: the same images as the model as built (to convolution rounding), the same
state_dict, checkpoints still load, and a model in training mode is left alone with a warning."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

from fastp2phd import optimize_for_inference
from fastp2phd.data import render_scene
from fastp2phd.pix2pixhd import Pix2PixHD
from fastp2phd.specs import ModelSpec

SPECS = {
    "global": ModelSpec(ngf=8, n_downsample_global=2, n_blocks_global=2),
    "local with features": ModelSpec(ngf=4, netG="local", n_downsample_global=2, n_blocks_global=1, n_blocks_local=1,
                                     instance_feat=True, nef=4, n_downsample_E=2),
    "no instances": ModelSpec(ngf=8, n_downsample_global=2, n_blocks_global=1, no_instance=True),
}


def scene(height=64, width=128):
    label, inst, image = render_scene(height, width, seed=2)
    to = lambda a: torch.from_numpy(a.astype("int64"))[None, None]
    photo = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    return to(label), to(inst), photo


@pytest.mark.parametrize("name", SPECS)
def test_optimized_model_generates_the_same_images_with_the_same_state_dict(name):
    torch.manual_seed(0)
    model = Pix2PixHD(SPECS[name]).eval()
    label, inst, image = scene()
    expected = model.generate(label, inst, image)[0]
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    assert optimize_for_inference(model) is model
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)  # narrow blocks
    actual = model.generate(label, inst, image)[0]
    assert actual.is_contiguous() and actual.shape == expected.shape
    torch.testing.assert_close(actual, expected, rtol=0, atol=3e-5)
    state = model.state_dict()
    assert state.keys() == keys.keys() and all(torch.equal(state[k], keys[k]) for k in keys)
    model.load_state_dict(keys)  # a checkpoint of the model as built loads into the optimized one
    assert optimize_for_inference(model) is model  # idempotent
    torch.testing.assert_close(model.generate(label, inst, image)[0], actual, rtol=0, atol=0)


def test_bf16_after_optimizing_stays_close_to_bf16_before():
    torch.manual_seed(0)
    model = Pix2PixHD(SPECS["global"]).eval()
    label, inst, _ = scene()
    before = model.generate(label, inst, precision="bf16")[0]
    optimize_for_inference(model)
    after = model.generate(label, inst, precision="bf16")[0]
    fp32 = model.generate(label, inst)[0]
    # Not bit-equal (other kernels round differently), but no further from fp32 than bf16 was.
    assert (after - fp32).abs().max() <= 2 * (before - fp32).abs().max() + 1e-3


def test_a_model_in_training_mode_is_returned_unchanged_with_a_warning():
    model = Pix2PixHD(SPECS["global"])
    before = copy.deepcopy(model)
    with pytest.warns(UserWarning, match=r"training mode; call model.eval\(\) first \(the model is returned unchanged\)"):
        assert optimize_for_inference(model) is model
    assert all(a.stride() == b.stride() for a, b in zip(model.parameters(), before.parameters()))


def test_load_run_and_the_commands_optimize(tmp_path):
    """load_run(optimize=True) and test --optimize optimize; the editor does unless --no_optimize."""
    from fastp2phd.cli import _optimize
    from fastp2phd.inference import load_run
    from fastp2phd.options import build_parser

    spec = SPECS["global"]
    torch.save(Pix2PixHD(spec).netG.state_dict(), tmp_path / "latest_net_G.pth")
    plain, optimized = (load_run(tmp_path, model=spec, optimize=flag) for flag in (False, True))
    layouts = [net.netG.model[1].weight.is_contiguous(memory_format=torch.channels_last) for net in (plain, optimized)]
    assert layouts == [False, True]
    label, inst, _ = scene()
    torch.testing.assert_close(optimized.inference(label, inst), plain.inference(label, inst), rtol=0, atol=3e-5)
    parser = build_parser()
    for argv, expected in ((["test"], False), (["test", "--optimize"], True), (["evaluate", "--optimize"], True),
                           (["edit"], True), (["edit", "--no_optimize"], False), (["encode-features"], False)):
        assert _optimize(parser.parse_args([*argv, "--name", "x"])) is expected, argv


def test_the_editor_runs_in_bf16_where_the_cpu_has_it_and_test_stays_fp32(monkeypatch):
    """--precision auto (the editor's default): bf16 on a CPU with native bfloat16, else fp32."""
    import fastp2phd.diagnostics as diagnostics
    from fastp2phd.cli import _precision
    from fastp2phd.options import build_parser
    from fastp2phd.pix2pixhd import fastest_precision

    parser = build_parser()
    edit, test = (parser.parse_args([command, "--name", "x", "--device", "cpu"]) for command in ("edit", "test"))
    assert (edit.precision, test.precision) == ("auto", "fp32")
    for native, expected in (("AVX512-BF16", "bf16"), (None, "fp32")):
        monkeypatch.setattr(diagnostics, "cpu_bf16", lambda native=native: native)
        assert fastest_precision("cpu") == expected and _precision(edit) == expected and _precision(test) == "fp32"


def test_wide_residual_blocks_stay_nchw_and_the_rest_channels_last():
    """oneDNN's NCHW 3x3 conv is the faster one on wide small planes: blocks of >= 512 channels stay NCHW."""
    from fastp2phd.models.generator import ResnetBlock
    from fastp2phd.optimize import WIDE_BLOCK_CHANNELS

    torch.manual_seed(0)
    model = Pix2PixHD(ModelSpec(ngf=8, n_downsample_global=WIDE_BLOCK_CHANNELS.bit_length() - 4,
                                n_blocks_global=2)).eval()
    label, inst, _ = scene(128, 256)  # planes of 2x4 in the blocks
    expected = model.generate(label, inst)[0]
    blocks = [m for m in model.modules() if isinstance(m, ResnetBlock)]
    optimize_for_inference(model)
    optimize_for_inference(model)  # a second call adds no second hook
    layouts = []
    for block in blocks:
        block.register_forward_hook(lambda m, args, out: layouts.append((args[0].is_contiguous(), out.is_contiguous())))
    for module in model.netG.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            wide = any(module is c for b in blocks for c in b.modules())
            assert module.weight.is_contiguous(memory_format=torch.contiguous_format if wide else torch.channels_last)
    actual = model.generate(label, inst)[0]
    assert layouts == [(True, True)] * len(blocks) and all(len(b._forward_pre_hooks) == 1 for b in blocks)
    torch.testing.assert_close(actual, expected, rtol=0, atol=3e-5)


def row_split(conv: nn.Conv2d) -> nn.Conv2d:
    from fastp2phd.optimize import RowSplitConv2d

    split = copy.deepcopy(conv)
    split.__class__ = RowSplitConv2d
    return split


@pytest.mark.parametrize("in_channels, out_channels, kernel, bias", [
    (32, 3, (7, 7), True), (5, 1, (3, 3), False), (4, 4, (5, 3), True), (3, 2, (2, 6), True)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided view"])
def test_row_split_convolution_equals_the_convolution_with_its_gradients(in_channels, out_channels, kernel, bias,
                                                                         layout):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_channels, out_channels, kernel, bias=bias).double()
    split = row_split(conv)
    base = torch.full((2, in_channels + 3, 23, 40), float("nan"), dtype=torch.float64)  # sentinels around the view
    base[:, 1:in_channels + 1, 2:21, 3:37] = torch.randn(2, in_channels, 19, 34, dtype=torch.float64)
    x = base[:, 1:in_channels + 1, 2:21, 3:37]
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided view":
        x = x[..., ::2]
    x.requires_grad_(True)
    expected, actual = conv(x), split(x)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
    grad = torch.randn_like(expected)
    want = torch.autograd.grad(expected, [x, *conv.parameters()], grad)
    got = torch.autograd.grad(actual, [x, *split.parameters()], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(1, 4, 4, 9), (1, 4, 3, 9), (1, 4, 2, 9), (2, 4, 8, 4), (4, 8, 9), (4, 4, 9),
                                   (1, 5, 8, 9), (8, 9), (0, 4, 8, 9)])
def test_row_split_convolution_gives_the_convolutions_result_or_error_on_any_input(shape):
    """Too few rows or columns, unbatched, other channels: what nn.Conv2d gives (it raises where the split alone
    gave an empty plane)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 3, 5)
    split = row_split(conv)
    x = torch.randn(shape)
    try:
        expected = conv(x)
    except RuntimeError as refused:
        with pytest.raises(RuntimeError, match=re.escape(str(refused))):
            split(x)
    else:
        assert torch.equal(split(x), expected)


@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_row_split_convolution_is_no_less_accurate_than_the_convolution(autocast):
    """Against float64, on a hard input (a large mean with a small spread), in float32 and under bf16 autocast
    (where it also keeps the convolution's output dtype)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 3, 7)
    split = row_split(conv)
    x = (50 + 0.01 * torch.randn(1, 32, 70, 90)).contiguous(memory_format=torch.channels_last)
    exact = conv.double()(x.double())
    conv.float()
    with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=autocast is not None):
        expected, actual = conv(x), split(x)
    assert actual.dtype == expected.dtype == (autocast or torch.float32)
    assert (actual.double() - exact).abs().max() <= (expected.double() - exact).abs().max()


def test_only_the_generators_few_output_convolution_is_split():
    from fastp2phd.optimize import RowSplitConv2d

    model = Pix2PixHD(SPECS["global"]).eval()
    optimize_for_inference(model)
    split = [m for m in model.modules() if isinstance(m, RowSplitConv2d)]
    assert split == [model.netG.model[-2]]  # the 7x7 convolution to 3 image channels, before the tanh
    for conv in (nn.Conv2d(8, 3, 7, padding=3), nn.Conv2d(8, 3, 7, stride=2), nn.Conv2d(8, 4, 3, groups=2),
                 nn.Conv2d(8, 8, 7), nn.Conv2d(8, 3, 1), nn.Conv2d(8, 3, 3, dilation=2)):
        assert not RowSplitConv2d.suits(conv), conv


def test_the_generators_first_convolutions_skip_the_label_maps_zeros():
    from fastp2phd.optimize import SparseInputConv2d

    model = Pix2PixHD(SPECS["local with features"]).eval()
    optimize_for_inference(model)
    sparse = [m for m in model.modules() if isinstance(m, SparseInputConv2d)]
    assert sparse == [model.netG.model[1], model.netG.model1_1[1]]  # the global and the local branch's 7x7
    assert not any(isinstance(m, SparseInputConv2d) for m in model.netE.modules())  # E reads a photo
    assert [m.dense_channels for m in sparse] == [model.spec.feat_num] * 2  # the features are dense
    plain = Pix2PixHD(SPECS["global"]).eval()
    assert optimize_for_inference(plain).netG.model[1].dense_channels == 0


def test_a_first_convolution_with_dense_feature_channels_equals_the_convolution():
    from fastp2phd.optimize import SparseInputConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(12, 8, 7)
    x = torch.zeros(2, 12, 30, 41)
    x[:, :9].scatter_(1, torch.randint(0, 9, (2, 1, 30, 41)), 1.0)  # one-hot labels
    x[:, 9:] = torch.randn(2, 3, 30, 41)  # instance features, nonzero everywhere
    expected = conv(x)
    conv.__class__ = SparseInputConv2d
    conv.dense_channels = 3
    torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
    view = torch.cat([x, torch.full_like(x, 7.0)], dim=3)[:, :, :, :41]  # a view into a larger buffer
    torch.testing.assert_close(conv(view.contiguous(memory_format=torch.channels_last)), expected, rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(conv(view), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dense_channels", [0, 3])
def test_a_first_convolution_takes_unbatched_input_as_the_convolution(dense_channels):
    from fastp2phd.optimize import SparseInputConv2d

    torch.manual_seed(0)
    conv = nn.Conv2d(12, 8, 7)
    x = torch.zeros(12, 30, 41)
    x[:9].scatter_(0, torch.randint(0, 9, (1, 30, 41)), 1.0)  # one-hot labels
    x[9:] = torch.randn(3, 30, 41)  # instance features
    expected = conv(x)
    conv.__class__ = SparseInputConv2d
    conv.dense_channels = dense_channels
    actual = conv(x)
    assert actual.shape == expected.shape and torch.equal(actual, conv(x[None])[0])
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

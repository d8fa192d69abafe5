"""Tests of fastp2phd.models: official key layouts, checkpoint loading and its errors,
an independent functional oracle of the original pix2pixHD forward passes,
fused vs plain builds, shapes, input checks, losses and the VGG19 trunk.

The oracle below is written from the pix2pixHD architecture with torch.nn.functional
only; it reads weights straight from a state_dict by their official keys and never
calls the modules under test.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from autograd_modes import assert_same_gradients

from fastp2phd.errors import CheckpointReadError

from fastp2phd.models import (
    VGG19_WEIGHTS_ENV,
    CheckpointMismatchError,
    Encoder,
    GANLoss,
    GlobalGenerator,
    LocalEnhancer,
    MultiscaleDiscriminator,
    NLayerDiscriminator,
    ResnetBlock,
    VGGLoss,
    VGGWeightsNotFound,
    Vgg19,
    feature_matching_loss,
    load_network,
    read_state_dict,
)
from fastp2phd.models.checkpoint import load_matching

try:  # tests/ as a package or as a plain directory on sys.path
    from . import official_layouts as layouts
except ImportError:
    import official_layouts as layouts


NETWORKS = {
    "GlobalGenerator": GlobalGenerator,
    "LocalEnhancer": LocalEnhancer,
    "Encoder": Encoder,
    "MultiscaleDiscriminator": MultiscaleDiscriminator,
}

TOL = {torch.float32: 1e-5, torch.float64: 1e-12}


# ============================================================================ helpers


def shapes(module: torch.nn.Module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def meta_state_dict(layout: dict) -> dict:
    """A state_dict of meta tensors with the given {key: shape} (no memory, shapes only)."""
    return {k: torch.empty(s, device="meta") for k, s in layout.items()}


def cloned_state_dict(module: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, tol: float) -> None:
    """max |actual - expected| / max |expected| < tol, with a non-degenerate expected."""
    assert actual.shape == expected.shape, (tuple(actual.shape), tuple(expected.shape))
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    scale = expected.detach().abs().max()
    assert torch.isfinite(scale) and scale > 0, "reference is all zero or not finite: comparison would be vacuous"
    err = ((actual.detach() - expected.detach()).abs().max() / scale).item()
    assert err < tol, f"relative error {err:.3e} >= {tol:.0e}"


def flatten_outputs(out) -> list:
    """A tensor, a list of tensors or a list of lists of tensors -> flat list of tensors."""
    if isinstance(out, torch.Tensor):
        return [out]
    flat = []
    for item in out:
        flat += flatten_outputs(item)
    return flat


class TrackedStateDict(dict):
    """A dict that records which keys were read, so the oracle can prove it used every weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.read = set()

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)


# ============================================================================ functional oracle
# The original pix2pixHD forward passes, from a state_dict, with torch.nn.functional only.


def _conv(x, sd, key, stride=1, padding=0):
    return F.conv2d(x, sd[key + ".weight"], sd[key + ".bias"], stride=stride, padding=padding)


def _conv_up(x, sd, key):
    return F.conv_transpose2d(x, sd[key + ".weight"], sd[key + ".bias"], stride=2, padding=1, output_padding=1)


def _in(x):
    return F.instance_norm(x, eps=1e-5)


def _pad(x, amount, mode="reflect"):
    if mode == "zero":
        return F.pad(x, (amount,) * 4, mode="constant", value=0.0)
    return F.pad(x, (amount,) * 4, mode=mode)


def _downsample(x):
    return F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)


def oracle_resnet_block(x, sd, key, padding="reflect"):
    """x + [pad 1, conv, IN, ReLU, pad 1, conv, IN](x); with zero padding the convs pad themselves
    and sit at conv_block.0 / conv_block.3, else at conv_block.1 / conv_block.5."""
    if padding == "zero":
        y = F.relu(_in(_conv(x, sd, f"{key}.conv_block.0", padding=1)))
        y = _in(_conv(y, sd, f"{key}.conv_block.3", padding=1))
    else:
        y = F.relu(_in(_conv(_pad(x, 1, padding), sd, f"{key}.conv_block.1")))
        y = _in(_conv(_pad(y, 1, padding), sd, f"{key}.conv_block.5"))
    return x + y


def oracle_g1_trunk(sd, x, n_downsampling, n_blocks, prefix="model"):
    """G1 up to its last upsampling; returns (features, index of the final pad slot)."""
    x = F.relu(_in(_conv(_pad(x, 3), sd, f"{prefix}.1")))  # slots 0 pad, 1 conv, 2 norm, 3 relu
    idx = 4
    for _ in range(n_downsampling):  # conv, norm, relu
        x = F.relu(_in(_conv(x, sd, f"{prefix}.{idx}", stride=2, padding=1)))
        idx += 3
    for _ in range(n_blocks):  # one slot per block
        x = oracle_resnet_block(x, sd, f"{prefix}.{idx}")
        idx += 1
    for _ in range(n_downsampling):  # transposed conv, norm, relu
        x = F.relu(_in(_conv_up(x, sd, f"{prefix}.{idx}")))
        idx += 3
    return x, idx


def oracle_global_generator(sd, x, n_downsampling, n_blocks):
    x, idx = oracle_g1_trunk(sd, x, n_downsampling, n_blocks)
    return torch.tanh(_conv(_pad(x, 3), sd, f"model.{idx + 1}"))  # idx pad, idx+1 conv, idx+2 tanh


def oracle_local_enhancer(sd, x, n_downsample_global, n_blocks_global, n_local_enhancers, n_blocks_local):
    N = n_local_enhancers
    pyramid = [x]
    for _ in range(N):
        pyramid.append(_downsample(pyramid[-1]))
    out, _ = oracle_g1_trunk(sd, pyramid[N], n_downsample_global, n_blocks_global)
    for n in range(1, N + 1):
        inp = pyramid[N - n]
        front = F.relu(_in(_conv(_pad(inp, 3), sd, f"model{n}_1.1")))
        front = F.relu(_in(_conv(front, sd, f"model{n}_1.4", stride=2, padding=1)))
        y = front + out
        for b in range(n_blocks_local):
            y = oracle_resnet_block(y, sd, f"model{n}_2.{b}")
        y = F.relu(_in(_conv_up(y, sd, f"model{n}_2.{n_blocks_local}")))
        if n == N:  # pad at n_blocks_local+3, conv at +4, tanh at +5
            y = torch.tanh(_conv(_pad(y, 3), sd, f"model{n}_2.{n_blocks_local + 4}"))
        out = y
    return out


def oracle_instance_pool(feat, inst):
    """Every pixel gets the per-channel mean of the pixels of its (batch item, id); a plain loop."""
    out = torch.empty_like(feat)
    for b in range(feat.shape[0]):
        ids = inst[b, 0]
        for value in torch.unique(ids).tolist():
            mask = ids == value
            for c in range(feat.shape[1]):
                out[b, c][mask] = feat[b, c][mask].mean()
    return out


def oracle_encoder(sd, x, inst, n_downsampling):
    x, idx = oracle_g1_trunk(sd, x, n_downsampling, 0)
    x = torch.tanh(_conv(_pad(x, 3), sd, f"model.{idx + 1}"))
    return oracle_instance_pool(x, inst)


def interm_conv_keys(fmt, n_layers):
    """Conv keys of a PatchGAN with intermediate features: one Sequential per group, conv at 0."""
    return [fmt.format(j) + ".0" for j in range(n_layers + 2)]


def flat_conv_keys(prefix, n_layers):
    """Conv keys of a PatchGAN as one Sequential: [conv, lrelu] then [conv, norm, lrelu] * n_layers, conv."""
    return [f"{prefix}.0"] + [f"{prefix}.{2 + 3 * (k - 1)}" for k in range(1, n_layers + 1)] + [
        f"{prefix}.{2 + 3 * n_layers}"
    ]


def oracle_patchgan(sd, x, conv_keys, n_layers):
    """Every layer group's output of one PatchGAN discriminator."""
    outs = []
    x = F.leaky_relu(_conv(x, sd, conv_keys[0], stride=2, padding=2), 0.2)
    outs.append(x)
    for n in range(1, n_layers):
        x = F.leaky_relu(_in(_conv(x, sd, conv_keys[n], stride=2, padding=2)), 0.2)
        outs.append(x)
    x = F.leaky_relu(_in(_conv(x, sd, conv_keys[n_layers], stride=1, padding=2)), 0.2)
    outs.append(x)
    outs.append(_conv(x, sd, conv_keys[n_layers + 1], stride=1, padding=2))
    return outs


def oracle_multiscale(sd, x, num_D, n_layers, interm):
    results = []
    for i in range(num_D):
        s = num_D - 1 - i  # full resolution goes to the last discriminator
        keys = interm_conv_keys(f"scale{s}_layer{{}}", n_layers) if interm else flat_conv_keys(f"layer{s}", n_layers)
        outs = oracle_patchgan(sd, x, keys, n_layers)
        results.append(outs if interm else [outs[-1]])
        if i != num_D - 1:
            x = _downsample(x)
    return results


# ============================================================================ layouts


def test_hand_written_layouts_have_the_published_key_counts():
    for name, (layout, count, _, _) in layouts.PUBLISHED.items():
        assert len(layout) == count, name
        assert all(isinstance(s, tuple) and all(isinstance(d, int) and d > 0 for d in s) for s in layout.values())
    # spot checks of the spelled-out facts
    assert layouts.LABEL2CITY_512P_G["model.1.weight"] == (64, 36, 7, 7)
    assert layouts.LABEL2CITY_512P_FEAT_G["model.1.weight"] == (64, 39, 7, 7)
    assert layouts.LABEL2CITY_512P_G["model.25.weight"] == (1024, 512, 3, 3)
    assert layouts.LABEL2CITY_512P_G["model.38.weight"] == (3, 64, 7, 7)
    assert "model.38.weight" not in layouts.LABEL2CITY_1024P_G
    assert layouts.LABEL2CITY_1024P_G["model1_2.3.weight"] == (64, 32, 3, 3)
    assert layouts.LABEL2CITY_E["model.16.bias"] == (128,)
    assert layouts.LABEL2CITY_D["scale1_layer4.0.weight"] == (1, 512, 4, 4)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
@pytest.mark.parametrize("name", sorted(layouts.PUBLISHED))
def test_published_layout_matches(name, fused):
    layout, count, cls_name, options = layouts.PUBLISHED[name]
    with torch.device("meta"):
        net = NETWORKS[cls_name](**options, fused=fused)
    got = shapes(net)
    assert len(got) == count
    assert got == layout
    # and the official checkpoint (as shapes) loads strictly through load_network
    load_network(net, meta_state_dict(layout))


# ============================================================================ round trip


def _small_global(seed=0, **kw):
    torch.manual_seed(seed)
    options = dict(input_nc=5, output_nc=3, ngf=4, n_downsampling=2, n_blocks=1)
    options.update(kw)
    return GlobalGenerator(**options).eval()


def test_strict_load_round_trip_through_file(tmp_path):
    src = _small_global(seed=1)
    path = tmp_path / "latest_net_G.pth"
    torch.save(src.state_dict(), path)
    dst = _small_global(seed=2)
    x = torch.randn(2, 5, 16, 24)
    with torch.no_grad():
        assert not torch.equal(src(x), dst(x))  # different weights before loading
        assert load_network(dst, path) is dst
        assert torch.equal(src(x), dst(x))
    for k, v in src.state_dict().items():
        assert torch.equal(v, dst.state_dict()[k])
    assert read_state_dict(path).keys() == src.state_dict().keys()


def test_data_parallel_prefix_loads_through_load_network(tmp_path):
    src = _small_global(seed=1)
    prefixed = {"module." + k: v for k, v in src.state_dict().items()}
    path = tmp_path / "dp.pth"
    torch.save(prefixed, path)
    x = torch.randn(1, 5, 16, 16)
    for source in (path, prefixed):
        dst = _small_global(seed=3)
        load_network(dst, source)
        with torch.no_grad():
            assert torch.equal(src(x), dst(x))
    # a plain load_state_dict refuses it and points at load_network
    with pytest.raises(CheckpointMismatchError, match="load_network"):
        _small_global(seed=3).load_state_dict(prefixed)


_UNPICKLED = []


def _record_unpickling():
    _UNPICKLED.append(True)
    return 0


class _Payload:
    def __reduce__(self):
        return (_record_unpickling, ())


def test_load_network_is_weights_only(tmp_path):
    path = tmp_path / "evil.pth"
    sd = dict(_small_global().state_dict())
    sd["extra"] = _Payload()
    torch.save(sd, path)
    _UNPICKLED.clear()
    with pytest.raises(CheckpointReadError, match="holds Python objects besides tensors, which fastp2phd does not load"):
        load_network(_small_global(), path)
    assert _UNPICKLED == []  # the pickled callable never ran


def test_load_network_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_network(_small_global(), tmp_path / "nope.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(os.urandom(4096))
    with pytest.raises(CheckpointReadError, match="cannot be read .*: it is truncated, damaged or not a PyTorch file"):
        load_network(_small_global(), corrupt)
    not_a_dict = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], not_a_dict)
    with pytest.raises(CheckpointReadError, match="holds a list, not a state_dict"):
        load_network(_small_global(), not_a_dict)


# ============================================================================ oracle comparisons

FUSED = pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])


def _build(cls, seed, dtype, **options):
    torch.manual_seed(seed)
    return cls(**options).to(dtype).eval()


def _check_against_oracle(out, oracle_out, dtype):
    for a, e in zip(flatten_outputs(out), flatten_outputs(oracle_out), strict=True):
        assert_rel_close(a, e, TOL[dtype])


@FUSED
@DTYPES
@pytest.mark.parametrize("n_down,n_blocks", [(2, 2), (3, 1), (1, 0)])
def test_global_generator_matches_oracle(fused, dtype, n_down, n_blocks):
    net = _build(GlobalGenerator, 10, dtype, input_nc=5, output_nc=3, ngf=4, n_downsampling=n_down,
                 n_blocks=n_blocks, fused=fused)
    torch.manual_seed(11)
    x = torch.randn(2, 5, 32, 48, dtype=dtype)
    sd = TrackedStateDict(cloned_state_dict(net))
    with torch.no_grad():
        _check_against_oracle(net(x), oracle_global_generator(sd, x, n_down, n_blocks), dtype)
    assert sd.read == set(sd)  # the oracle used every weight of the network


@FUSED
@DTYPES
def test_local_enhancer_matches_oracle(fused, dtype):
    opts = dict(n_downsample_global=2, n_blocks_global=1, n_local_enhancers=1, n_blocks_local=2)
    net = _build(LocalEnhancer, 20, dtype, input_nc=5, output_nc=3, ngf=4, **opts, fused=fused)
    torch.manual_seed(21)
    x = torch.randn(2, 5, 32, 48, dtype=dtype)
    sd = TrackedStateDict(cloned_state_dict(net))
    with torch.no_grad():
        _check_against_oracle(net(x), oracle_local_enhancer(sd, x, **opts), dtype)
    assert sd.read == set(sd)


@FUSED
@DTYPES
def test_local_enhancer_two_levels_matches_oracle(fused, dtype):
    opts = dict(n_downsample_global=2, n_blocks_global=1, n_local_enhancers=2, n_blocks_local=1)
    net = _build(LocalEnhancer, 30, dtype, input_nc=4, output_nc=2, ngf=3, **opts, fused=fused)
    # front-end widths ngf * 2^(N - n): model1_1 has 3*2 = 6 filters, model2_1 has 3
    assert tuple(net.state_dict()["model1_1.1.weight"].shape) == (6, 4, 7, 7)
    assert tuple(net.state_dict()["model2_1.1.weight"].shape) == (3, 4, 7, 7)
    assert tuple(net.state_dict()["model.1.weight"].shape) == (12, 4, 7, 7)
    assert not any(k.startswith("model1_2.") and k.split(".")[1] == "5" for k in net.state_dict())
    torch.manual_seed(31)
    x = torch.randn(1, 4, 32, 64, dtype=dtype)
    sd = TrackedStateDict(cloned_state_dict(net))
    with torch.no_grad():
        _check_against_oracle(net(x), oracle_local_enhancer(sd, x, **opts), dtype)
    assert sd.read == set(sd)


def _instance_map(n, h, w, seed=0):
    """Ids that are sparse and large (Cityscapes-like: class * 1000 + k), in blocks plus noise."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([0, 7, 26000, 26001, 33002], dtype=torch.int64)
    coarse = ids[torch.randint(0, len(ids), (n, 1, (h + 7) // 8, (w + 7) // 8), generator=g)]
    inst = coarse.repeat_interleave(8, 2).repeat_interleave(8, 3)[..., :h, :w]
    noise = torch.rand(n, 1, h, w, generator=g) < 0.05
    return torch.where(noise, ids[torch.randint(0, len(ids), (n, 1, h, w), generator=g)], inst)


@FUSED
@DTYPES
def test_encoder_matches_oracle(fused, dtype):
    net = _build(Encoder, 40, dtype, input_nc=3, output_nc=3, ngf=4, n_downsampling=2, fused=fused)
    torch.manual_seed(41)
    x = torch.randn(2, 3, 32, 48, dtype=dtype)
    inst = _instance_map(2, 32, 48)
    sd = TrackedStateDict(cloned_state_dict(net))
    with torch.no_grad():
        out = net(x, inst)
        expected = oracle_encoder(sd, x, inst, 2)
        _check_against_oracle(out, expected, dtype)
        # the same ids as int32 and as float (how pix2pixHD's loader hands them over) give the same result
        assert torch.equal(net(x, inst.to(torch.int32)), out)
        assert_rel_close(net(x, inst.to(dtype)), expected, TOL[dtype])
    assert sd.read == set(sd)
    # the pooling is not a no-op: each segment is constant
    assert out[0, :, inst[0, 0] == 7].std(dim=1).max() < 1e-6


@FUSED
@DTYPES
@pytest.mark.parametrize("num_D,n_layers,interm", [(2, 3, True), (3, 2, True), (2, 3, False), (1, 1, False)])
def test_multiscale_discriminator_matches_oracle(fused, dtype, num_D, n_layers, interm):
    net = _build(MultiscaleDiscriminator, 50, dtype, input_nc=6, ndf=4, n_layers=n_layers, num_D=num_D,
                 getIntermFeat=interm, fused=fused)
    torch.manual_seed(51)
    x = torch.randn(2, 6, 32, 48, dtype=dtype)
    sd = TrackedStateDict(cloned_state_dict(net))
    with torch.no_grad():
        out = net(x)
        expected = oracle_multiscale(sd, x, num_D, n_layers, interm)
    assert len(out) == num_D
    assert [len(o) for o in out] == [len(e) for e in expected]
    _check_against_oracle(out, expected, dtype)
    assert sd.read == set(sd)


@FUSED
@DTYPES
@pytest.mark.parametrize("interm", [True, False])
def test_nlayer_discriminator_matches_oracle(fused, dtype, interm):
    n_layers = 3
    net = _build(NLayerDiscriminator, 60, dtype, input_nc=5, ndf=4, n_layers=n_layers, getIntermFeat=interm,
                 fused=fused)
    keys = interm_conv_keys("model{}", n_layers) if interm else flat_conv_keys("model", n_layers)
    assert {k.rsplit(".", 1)[0] for k in net.state_dict()} == set(keys)
    torch.manual_seed(61)
    x = torch.randn(2, 5, 32, 40, dtype=dtype)
    sd = TrackedStateDict(cloned_state_dict(net))
    with torch.no_grad():
        out = net(x)
        expected = oracle_patchgan(sd, x, keys, n_layers)
    if not interm:  # like the original: the bare prediction, not a list
        assert isinstance(out, torch.Tensor)
        out, expected = [out], expected[-1:]
    assert len(out) == len(expected)
    _check_against_oracle(out, expected, dtype)


def test_oracle_comparison_is_sensitive():
    """Negative control: perturbing one weight, or feeding the scales in the other order, is detected."""
    net = _build(GlobalGenerator, 10, torch.float32, input_nc=5, output_nc=3, ngf=4, n_downsampling=2, n_blocks=1)
    x = torch.randn(1, 5, 32, 32)
    sd = cloned_state_dict(net)
    w = sd["model.10.conv_block.5.weight"]
    sd["model.10.conv_block.5.weight"] = w + 0.01 * w.abs().mean() * torch.randn_like(w)  # (a pure scale would vanish in IN)
    with torch.no_grad(), pytest.raises(AssertionError):
        assert_rel_close(net(x), oracle_global_generator(sd, x, 2, 1), 1e-5)

    d = _build(MultiscaleDiscriminator, 50, torch.float32, input_nc=6, ndf=4, n_layers=2, num_D=2)
    y = torch.randn(1, 6, 32, 32)
    sd = cloned_state_dict(d)
    swapped = {k.replace("scale0", "tmp").replace("scale1", "scale0").replace("tmp", "scale1"): v for k, v in sd.items()}
    with torch.no_grad(), pytest.raises(AssertionError):
        _check_against_oracle(d(y), oracle_multiscale(swapped, y, 2, 2, True), torch.float32)


@pytest.mark.parametrize("padding", ["reflect", "replicate", "zero"])
def test_resnet_block_padding_matches_oracle(padding):
    torch.manual_seed(70)
    block = ResnetBlock(6, padding_type=padding).double()
    expected_keys = {"zero": {"conv_block.0", "conv_block.3"}}.get(padding, {"conv_block.1", "conv_block.5"})
    assert {k.rsplit(".", 1)[0] for k in block.state_dict()} == expected_keys
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    sd = {"b." + k: v for k, v in block.state_dict().items()}
    with torch.no_grad():
        assert_rel_close(block(x), oracle_resnet_block(x, sd, "b", padding), 1e-12)


# ============================================================================ fused vs plain


def _fused_and_plain(cls, seed, **options):
    torch.manual_seed(seed)
    fused = cls(**options, fused=True)
    plain = cls(**options, fused=False)
    plain.load_state_dict(fused.state_dict())
    assert any(type(m).__name__ == "InstanceNormAct2d" for m in fused.modules())
    assert not any(type(m).__name__ == "InstanceNormAct2d" for m in plain.modules())
    assert any(isinstance(m, torch.nn.InstanceNorm2d) for m in plain.modules())
    return fused, plain


def _outputs_and_grads(net, inputs, seed):
    x = inputs[0].clone().requires_grad_(True)
    out = flatten_outputs(net(x, *inputs[1:]))
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in out)
    net.zero_grad()
    loss.backward()
    grads = {k: p.grad.clone() for k, p in net.named_parameters()}
    return [o.detach() for o in out], grads, x.grad


@pytest.mark.parametrize(
    "cls,options,inputs",
    [
        (GlobalGenerator, dict(input_nc=4, output_nc=3, ngf=4, n_downsampling=2, n_blocks=2),
         lambda: (torch.randn(2, 4, 32, 48),)),
        (LocalEnhancer, dict(input_nc=4, output_nc=3, ngf=4, n_downsample_global=2, n_blocks_global=1,
                             n_local_enhancers=1, n_blocks_local=1),
         lambda: (torch.randn(2, 4, 32, 48),)),
        (Encoder, dict(input_nc=3, output_nc=3, ngf=4, n_downsampling=2),
         lambda: (torch.randn(2, 3, 32, 48), _instance_map(2, 32, 48, seed=5))),
        (MultiscaleDiscriminator, dict(input_nc=6, ndf=4, n_layers=3, num_D=2),
         lambda: (torch.randn(2, 6, 32, 48),)),
    ],
    ids=["GlobalGenerator", "LocalEnhancer", "Encoder", "MultiscaleDiscriminator"],
)
def test_fused_and_plain_agree_in_outputs_and_gradients(cls, options, inputs):
    fused, plain = _fused_and_plain(cls, 80, **options)
    torch.manual_seed(81)
    data = inputs()
    out_f, grads_f, xgrad_f = _outputs_and_grads(fused, data, 82)
    out_p, grads_p, xgrad_p = _outputs_and_grads(plain, data, 82)
    assert len(out_f) == len(out_p)
    for a, e in zip(out_f, out_p):
        assert_rel_close(a, e, 1e-5)
    assert grads_f.keys() == grads_p.keys() and len(grads_f) > 0
    # Absolute error against the network's largest gradient: the bias of a conv before an instance norm has an
    # exact gradient of 0, so both paths give rounding noise there, which no relative bound can compare.
    scale = max(g.abs().max().item() for g in grads_p.values())
    for k in grads_p:
        assert torch.allclose(grads_f[k], grads_p[k], rtol=1e-5, atol=1e-5 * scale), k
    assert_rel_close(xgrad_f, xgrad_p, 1e-5)
    # most parameters receive a gradient (biases before an instance norm legitimately get ~0)
    nonzero = [k for k, g in grads_p.items() if g.abs().max() > 1e-6]
    assert len(nonzero) >= len(grads_p) // 2


# ============================================================================ shapes


@pytest.mark.parametrize("n_down", [1, 2, 3, 4])
@pytest.mark.parametrize("n_blocks", [0, 1, 2])
def test_global_generator_shapes(n_down, n_blocks):
    output_nc = 1 if (n_down + n_blocks) % 2 else 3
    ngf = 4 if n_down % 2 else 6
    torch.manual_seed(0)
    net = GlobalGenerator(3, output_nc, ngf=ngf, n_downsampling=n_down, n_blocks=n_blocks)
    st = shapes(net)
    assert st["model.1.weight"] == (ngf, 3, 7, 7)
    assert sum(1 for k in st if k.endswith("conv_block.1.weight")) == n_blocks
    x = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, output_nc, 32, 48)
    assert y.abs().max() <= 1 and y.abs().max() > 0  # tanh


@pytest.mark.parametrize("norm,padding", [("batch", "reflect"), ("instance", "zero"), ("instance", "replicate"),
                                          ("batch", "zero")])
def test_global_generator_norm_and_padding_variants(norm, padding):
    torch.manual_seed(0)
    net = GlobalGenerator(3, 3, ngf=4, n_downsampling=2, n_blocks=2, norm=norm, padding_type=padding)
    st = shapes(net)
    assert (norm == "batch") == ("model.2.running_mean" in st)
    assert (norm == "batch") == ("model.2.weight" in st)  # batch norm is affine; instance norm has no key
    first, second = ("conv_block.0", "conv_block.3") if padding == "zero" else ("conv_block.1", "conv_block.5")
    assert st[f"model.10.{first}.weight"] == (16, 16, 3, 3)
    assert st[f"model.10.{second}.weight"] == (16, 16, 3, 3)
    x = torch.randn(2, 3, 16, 24)
    y = net.train()(x)
    assert y.shape == (2, 3, 16, 24)
    with torch.no_grad():
        assert net.eval()(x).shape == (2, 3, 16, 24)


def test_resnet_block_dropout():
    torch.manual_seed(0)
    block = ResnetBlock(8, use_dropout=True)
    # [pad, conv, norm, relu, dropout, pad, conv, norm]: the second conv moves to conv_block.6
    assert {k.rsplit(".", 1)[0] for k in block.state_dict()} == {"conv_block.1", "conv_block.6"}
    assert isinstance(block.conv_block[4], torch.nn.Dropout) and block.conv_block[4].p == 0.5
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        a, b = block.train()(x), block(x)
        assert a.shape == x.shape
        assert not torch.equal(a, b)  # dropout is active in training
        c, d = block.eval()(x), block(x)
        assert torch.equal(c, d)
    plain = ResnetBlock(8)
    sd = {k.replace("conv_block.6", "conv_block.5"): v for k, v in block.state_dict().items()}
    plain.load_state_dict(sd)
    with torch.no_grad():
        assert_rel_close(block.eval()(x), plain.eval()(x), 1e-6)  # eval-mode dropout is the identity


@pytest.mark.parametrize(
    "n_down,n_local,n_blocks_local,size",
    [(1, 1, 0, (8, 12)), (2, 1, 1, (16, 24)), (2, 2, 1, (32, 48)), (3, 1, 2, (32, 48))],
)
def test_local_enhancer_shapes(n_down, n_local, n_blocks_local, size):
    torch.manual_seed(0)
    net = LocalEnhancer(3, 2, ngf=3, n_downsample_global=n_down, n_blocks_global=1, n_local_enhancers=n_local,
                        n_blocks_local=n_blocks_local)
    assert shapes(net)["model.1.weight"] == (3 * 2**n_local, 3, 7, 7)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        y = net(x)
    assert y.shape == (1, 2, *size)
    assert y.abs().max() <= 1


@pytest.mark.parametrize("output_nc,n_down", [(1, 1), (3, 2), (5, 3)])
def test_encoder_shapes(output_nc, n_down):
    torch.manual_seed(0)
    net = Encoder(3, output_nc, ngf=4, n_downsampling=n_down)
    x = torch.randn(2, 3, 16, 24)
    inst = _instance_map(2, 16, 24)
    with torch.no_grad():
        y = net(x, inst)
    assert y.shape == (2, output_nc, 16, 24)


def _patch_size(h, n_layers):
    """Spatial size after [k4 s2 p2] * n_layers, then [k4 s1 p2] twice: s2 gives h//2+1, s1 gives h+1."""
    sizes = []
    for _ in range(n_layers):
        h = h // 2 + 1
        sizes.append(h)
    sizes += [h + 1, h + 2]
    return sizes


@pytest.mark.parametrize("num_D", [1, 2, 3])
@pytest.mark.parametrize("n_layers", [1, 2, 3, 4])
def test_multiscale_discriminator_shapes(num_D, n_layers):
    ndf = 4
    torch.manual_seed(0)
    net = MultiscaleDiscriminator(5, ndf=ndf, n_layers=n_layers, num_D=num_D)
    assert len(shapes(net)) == num_D * (n_layers + 2) * 2
    x = torch.randn(1, 5, 64, 48)
    with torch.no_grad():
        out = net(x)
    assert len(out) == num_D
    channels = [ndf * 2**min(j, n_layers) for j in range(n_layers + 1)] + [1]
    h, w = 64, 48
    for scale in out:
        assert len(scale) == n_layers + 2
        hs, ws = _patch_size(h, n_layers), _patch_size(w, n_layers)
        assert [tuple(t.shape) for t in scale] == [(1, c, a, b) for c, a, b in zip(channels, hs, ws)]
        h, w = (h + 1) // 2, (w + 1) // 2  # avg_pool2d(3, 2, 1) -> ceil(h / 2)


def test_discriminator_width_is_capped_at_512():
    with torch.device("meta"):
        net = NLayerDiscriminator(3, ndf=200, n_layers=4)
    st = shapes(net)
    assert [st[f"model{j}.0.weight"][:2] for j in range(6)] == [
        (200, 3), (400, 200), (512, 400), (512, 512), (512, 512), (1, 512)
    ]


@pytest.mark.parametrize("interm", [True, False])
def test_use_sigmoid_outputs_probabilities(interm):
    torch.manual_seed(0)
    with_sigmoid = MultiscaleDiscriminator(4, ndf=4, n_layers=2, num_D=2, use_sigmoid=True, getIntermFeat=interm)
    logits_net = MultiscaleDiscriminator(4, ndf=4, n_layers=2, num_D=2, use_sigmoid=False, getIntermFeat=interm)
    logits_net.load_state_dict(with_sigmoid.state_dict())  # the sigmoid adds no key
    x = torch.randn(2, 4, 32, 32) * 3
    with torch.no_grad():
        probs, logits = with_sigmoid(x), logits_net(x)
    for p, l in zip(probs, logits):
        assert p[-1].min() >= 0 and p[-1].max() <= 1
        assert (l[-1] < 0).any()  # the plain net really outputs logits
        assert_rel_close(p[-1], torch.sigmoid(l[-1]), 1e-6)
        for pf, lf in zip(p[:-1], l[:-1]):  # intermediate features are untouched
            assert torch.equal(pf, lf)
    if interm:
        assert (probs[0][0] < 0).any()  # LeakyReLU features are not squashed


# ============================================================================ bad input


def _bad_input_cases():
    """(network, input channels, required size multiple, extra forward arguments for an HxW input)."""
    torch.manual_seed(0)
    no_extra = lambda h, w: ()  # noqa: E731
    return [
        (GlobalGenerator(5, 3, ngf=4, n_downsampling=2, n_blocks=1), 5, 4, no_extra),
        (LocalEnhancer(5, 3, ngf=2, n_downsample_global=2, n_blocks_global=1, n_local_enhancers=1,
                       n_blocks_local=1), 5, 8, no_extra),
        (LocalEnhancer(5, 3, ngf=2, n_downsample_global=1, n_blocks_global=1, n_local_enhancers=2,
                       n_blocks_local=1), 5, 8, no_extra),
        (Encoder(3, 3, ngf=4, n_downsampling=3), 3, 8, lambda h, w: (_instance_map(1, h, w),)),
    ]


def test_bad_inputs_raise_value_error():
    for net, channels, multiple, extra in _bad_input_cases():
        name = type(net).__name__
        with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
            net(torch.randn(channels, 16, 16), *extra(16, 16))
        with pytest.raises(ValueError, match=rf"expected {channels} input channels, got {channels + 1}"):
            net(torch.randn(1, channels + 1, 16, 16), *extra(16, 16))
        # divisible by multiple // 2 but not by multiple: only the full requirement catches it
        bad = 3 * multiple // 2
        for h, w in ((bad, 16), (16, bad)):
            with pytest.raises(ValueError, match=rf"multiples of {multiple}\b") as info:
                net(torch.randn(1, channels, h, w), *extra(h, w))
            assert name in str(info.value) and f"{h}x{w}" in str(info.value)
        with torch.no_grad():  # the same net runs on a good size
            assert net(torch.randn(1, channels, 16, 16), *extra(16, 16)).shape[-2:] == (16, 16)


def test_bad_discriminator_inputs_raise_value_error():
    torch.manual_seed(0)
    for net in (MultiscaleDiscriminator(6, ndf=4, n_layers=2), NLayerDiscriminator(6, ndf=4, n_layers=2)):
        with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
            net(torch.randn(6, 32, 32))
        with pytest.raises(ValueError, match="expected 6 input channels, got 3"):
            net(torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(
    "build",
    [
        lambda: GlobalGenerator(3, 3, norm="group"),
        lambda: GlobalGenerator(3, 3, padding_type="circular"),
        lambda: GlobalGenerator(3, 3, ngf=-4),
        lambda: GlobalGenerator(0, 3),
        lambda: GlobalGenerator(3, 3, n_downsampling=-1),
        lambda: GlobalGenerator(3, 3, n_blocks=-2),
        lambda: LocalEnhancer(3, 3, norm="group"),
        lambda: LocalEnhancer(3, 3, padding_type="circular"),
        lambda: LocalEnhancer(3, 3, n_local_enhancers=0),
        lambda: LocalEnhancer(3, 3, n_blocks_local=-1),
        lambda: LocalEnhancer(3, -3),
        lambda: Encoder(3, 3, norm="group"),
        lambda: Encoder(3, 3, ngf=-1),
        lambda: Encoder(3, 3, n_downsampling=-1),
        lambda: ResnetBlock(8, padding_type="circular"),
        lambda: ResnetBlock(8, norm="group"),
        lambda: NLayerDiscriminator(3, norm="group"),
        lambda: NLayerDiscriminator(3, n_layers=0),
        lambda: NLayerDiscriminator(3, ndf=-8),
        lambda: MultiscaleDiscriminator(3, num_D=0),
        lambda: MultiscaleDiscriminator(-3),
    ],
)
def test_bad_constructor_values_raise_value_error(build):
    with torch.device("meta"), pytest.raises(ValueError):
        build()


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
@pytest.mark.parametrize(
    "build",
    [lambda: GlobalGenerator(3, 3, ngf=0, fused=False), lambda: LocalEnhancer(3, 3, ngf=0, fused=False)],
    ids=["GlobalGenerator", "LocalEnhancer"],
)
def test_zero_ngf_raises_value_error(build):
    with torch.device("meta"), pytest.raises(ValueError):
        build()


def test_bad_choice_messages_name_the_choices():
    with torch.device("meta"):
        with pytest.raises(ValueError, match="norm") as info:
            GlobalGenerator(3, 3, norm="group")
        assert "'group'" in str(info.value) and "instance" in str(info.value)
        with pytest.raises(ValueError, match="padding_type") as info:
            GlobalGenerator(3, 3, padding_type="circular")
        assert "reflect" in str(info.value)


# ============================================================================ checkpoint mismatch


def _meta(cls, **options):
    with torch.device("meta"):
        return cls(**options)


def _mismatch_message(net, layout):
    with pytest.raises(CheckpointMismatchError) as info:
        load_network(net, meta_state_dict(layout))
    return str(info.value)


def test_mismatch_input_nc():
    msg = _mismatch_message(_meta(GlobalGenerator, input_nc=36, output_nc=3), layouts.LABEL2CITY_512P_FEAT_G)
    assert "input_nc=39" in msg and "--label_nc" in msg
    assert "model.1.weight" in msg
    assert "ngf=" not in msg and "n_blocks=" not in msg  # only the option that differs is named


def test_mismatch_ngf():
    msg = _mismatch_message(_meta(GlobalGenerator, input_nc=36, output_nc=3, ngf=32), layouts.LABEL2CITY_512P_G)
    assert "ngf=64" in msg and "--ngf" in msg
    assert "input_nc=" not in msg and "n_blocks=" not in msg


def test_mismatch_n_blocks():
    msg = _mismatch_message(_meta(GlobalGenerator, input_nc=36, output_nc=3, n_blocks=6), layouts.LABEL2CITY_512P_G)
    assert "n_blocks=9" in msg and "--n_blocks_global" in msg


def test_mismatch_local_checkpoint_into_global_generator():
    msg = _mismatch_message(_meta(GlobalGenerator, input_nc=36, output_nc=3), layouts.LABEL2CITY_1024P_G)
    assert "--netG local" in msg and "LocalEnhancer" in msg


def test_mismatch_global_checkpoint_into_local_enhancer():
    msg = _mismatch_message(_meta(LocalEnhancer, input_nc=36, output_nc=3), layouts.LABEL2CITY_512P_G)
    assert "--netG global" in msg and "load_global_generator" in msg


def test_mismatch_encoder_feat_num():
    msg = _mismatch_message(_meta(Encoder, input_nc=3, output_nc=5), layouts.LABEL2CITY_E)
    assert "output_nc=3" in msg and "--feat_num" in msg


def test_mismatch_discriminator_num_D():
    msg = _mismatch_message(_meta(MultiscaleDiscriminator, input_nc=39, num_D=3), layouts.LABEL2CITY_D)
    assert "num_D=2" in msg and "--num_D" in msg


def test_mismatch_discriminator_without_intermediate_features():
    msg = _mismatch_message(_meta(MultiscaleDiscriminator, input_nc=39, getIntermFeat=False), layouts.LABEL2CITY_D)
    assert "getIntermFeat=True" in msg and "--no_ganFeat_loss" in msg


@pytest.mark.parametrize(
    "cls,options,layout,expected",
    [
        (LocalEnhancer, dict(input_nc=36, output_nc=3, n_local_enhancers=2), "LABEL2CITY_1024P_G",
         ("n_local_enhancers=1", "--n_local_enhancers")),
        (LocalEnhancer, dict(input_nc=36, output_nc=3, n_blocks_local=2), "LABEL2CITY_1024P_G",
         ("n_blocks_local=3", "--n_blocks_local")),
        (GlobalGenerator, dict(input_nc=36, output_nc=3, n_downsampling=3), "LABEL2CITY_512P_G",
         ("n_downsampling=4", "--n_downsample_global")),
        (GlobalGenerator, dict(input_nc=36, output_nc=1), "LABEL2CITY_512P_G", ("output_nc=3", "--output_nc")),
        (Encoder, dict(input_nc=3, output_nc=3, n_downsampling=3), "LABEL2CITY_E",
         ("n_downsampling=4", "--n_downsample_E")),
        (MultiscaleDiscriminator, dict(input_nc=39, n_layers=2), "LABEL2CITY_D", ("n_layers=3", "--n_layers_D")),
        (MultiscaleDiscriminator, dict(input_nc=39, ndf=32), "LABEL2CITY_D", ("ndf=64", "--ndf")),
    ],
    ids=["n_local_enhancers", "n_blocks_local", "n_downsample_global", "output_nc", "n_downsample_E", "n_layers_D",
         "ndf"],
)
def test_mismatch_names_other_options(cls, options, layout, expected):
    msg = _mismatch_message(_meta(cls, **options), getattr(layouts, layout))
    for fragment in expected:
        assert fragment in msg


def test_mismatch_from_a_file(tmp_path):
    path = tmp_path / "g.pth"
    torch.save(_small_global(ngf=4).state_dict(), path)
    net = _small_global(ngf=6)
    before = cloned_state_dict(net)
    with pytest.raises(CheckpointMismatchError, match="--ngf") as info:
        load_network(net, path)
    assert "ngf=4" in str(info.value)
    for k, v in net.state_dict().items():  # nothing was half-loaded
        assert torch.equal(v, before[k])


# ============================================================================ load_global_generator


def test_load_global_generator():
    torch.manual_seed(0)
    le = LocalEnhancer(4, 3, ngf=3, n_downsample_global=2, n_blocks_global=2, n_local_enhancers=1, n_blocks_local=1)
    g1 = GlobalGenerator(4, 3, ngf=6, n_downsampling=2, n_blocks=2)
    enhancer_before = {k: v.clone() for k, v in le.state_dict().items() if not k.startswith("model.")}
    assert len(enhancer_before) > 0
    assert any(not torch.equal(v, g1.state_dict()[k]) for k, v in le.state_dict().items() if k.startswith("model."))
    le.load_global_generator(g1.state_dict())
    own = le.state_dict()
    g1_sd = g1.state_dict()
    model_keys = [k for k in own if k.startswith("model.")]
    assert len(model_keys) == len(g1_sd) - 2  # all of G1 but its final conv (weight, bias)
    for k in model_keys:
        assert torch.equal(own[k], g1_sd[k]), k
    for k, v in enhancer_before.items():
        assert torch.equal(own[k], v), k
    # the loaded trunk computes G1's features
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        assert torch.equal(le.model(x), g1.model[: len(le.model)](x))


def test_load_global_generator_wrong_ngf():
    torch.manual_seed(0)
    le = LocalEnhancer(4, 3, ngf=3, n_downsample_global=2, n_blocks_global=2, n_local_enhancers=1, n_blocks_local=1)
    before = cloned_state_dict(le)
    for wrong in (GlobalGenerator(4, 3, ngf=3, n_downsampling=2, n_blocks=2),
                  GlobalGenerator(4, 3, ngf=6, n_downsampling=2, n_blocks=1)):
        with pytest.raises(ValueError, match="--ngf 6"):
            le.load_global_generator(wrong.state_dict())
    for k, v in le.state_dict().items():
        assert torch.equal(v, before[k])


def test_load_matching_loads_what_fits_as_the_original_does():
    # The official 1024p recipe starts a --num_D 3 D from the 512p run's --num_D 2 D: the original copies
    # every tensor whose name and shape fit (scale0_*, scale1_*) and leaves scale2_* as built.
    torch.manual_seed(0)
    two, three = MultiscaleDiscriminator(6, ndf=4, n_layers=2, num_D=2), MultiscaleDiscriminator(6, ndf=4, n_layers=2, num_D=3)
    before = cloned_state_dict(three)
    loaded, fresh = load_matching(three, two.state_dict())
    after = three.state_dict()
    assert loaded == len(two.state_dict()) and fresh == [f"scale2_layer{i}" for i in range(4)]
    for k, v in after.items():
        assert torch.equal(v, two.state_dict()[k] if k in two.state_dict() else before[k]), k
    # A tensor of another shape is not loaded, and a name the network lacks is ignored.
    other = {**two.state_dict(), "scale0_layer0.0.weight": torch.zeros(4, 7, 4, 4), "extra": torch.zeros(1)}
    loaded, fresh = load_matching(three, other)
    assert loaded == len(two.state_dict()) - 1 and fresh[0] == "scale0_layer0"


# ============================================================================ losses


def _scales():
    """Two discriminator scales whose intermediate features must be ignored by GANLoss."""
    p0 = torch.tensor([0.5, -1.0, 2.0, 0.0]).reshape(1, 1, 2, 2)
    p1 = torch.tensor([1.0, 3.0]).reshape(1, 1, 1, 2)
    return [[torch.full((1, 2, 3, 3), 100.0), p0], [torch.full((1, 2, 2, 2), -50.0), torch.ones(1, 2, 2, 2), p1]]


def test_gan_loss_lsgan_by_hand():
    loss = GANLoss(use_lsgan=True)
    # real: mean((p - 1)^2) -> (0.25 + 4 + 1 + 1) / 4 + (0 + 4) / 2
    assert loss(_scales(), True).item() == pytest.approx(1.5625 + 2.0, rel=1e-7)
    # fake: mean(p^2) -> (0.25 + 1 + 4 + 0) / 4 + (1 + 9) / 2
    assert loss(_scales(), False).item() == pytest.approx(1.3125 + 5.0, rel=1e-7)
    # a single prediction tensor and a flat list (last element is the prediction)
    p0 = _scales()[0][1]
    assert loss(p0, True).item() == pytest.approx(1.5625, rel=1e-7)
    assert loss([torch.full((1, 1, 2, 2), 9.0), p0], False).item() == pytest.approx(1.3125, rel=1e-7)
    # custom target labels
    soft = GANLoss(use_lsgan=True, target_real_label=0.5, target_fake_label=-1.0)
    assert soft(p0, True).item() == pytest.approx((0 + 2.25 + 2.25 + 0.25) / 4, rel=1e-7)
    assert soft(p0, False).item() == pytest.approx((2.25 + 0 + 9 + 1) / 4, rel=1e-7)


def _bce_by_hand(p, t):
    return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()


def test_gan_loss_bce_by_hand():
    scales = [[s.double() for s in scale] for scale in _scales()]
    preds = [scale[-1] for scale in scales]
    loss = GANLoss(use_lsgan=False)
    for real, t in ((True, 1.0), (False, 0.0)):
        expected = sum(_bce_by_hand(torch.sigmoid(p), t) for p in preds)
        assert loss(scales, real).item() == pytest.approx(expected.item(), rel=1e-12)
    # from_logits=False reads probabilities, as a use_sigmoid discriminator outputs them
    probs = [[torch.ones(1, 1, 2, 2), torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=torch.float64).reshape(1, 1, 2, 2)],
             [torch.tensor([0.3, 0.7], dtype=torch.float64).reshape(1, 1, 1, 2)]]
    loss = GANLoss(use_lsgan=False, from_logits=False)
    for real, t in ((True, 1.0), (False, 0.0)):
        expected = sum(_bce_by_hand(scale[-1], t) for scale in probs)
        assert loss(probs, real).item() == pytest.approx(expected.item(), rel=1e-12)
        expected_f = sum(F.binary_cross_entropy(scale[-1], torch.full_like(scale[-1], t)) for scale in probs)
        assert loss(probs, real).item() == pytest.approx(expected_f.item(), rel=1e-12)
    # p = 0.5 everywhere: log 2 for either target
    half = torch.full((2, 1, 3, 3), 0.5, dtype=torch.float64)
    assert loss(half, True).item() == pytest.approx(0.6931471805599453, rel=1e-12)


def test_feature_matching_loss_by_hand():
    # num_D 2, n_layers 2 -> 4 entries per scale; layer j of scale s: fake = j + s, real = 0
    def outputs(fake):
        return [[torch.full((1, 2, 4, 4), float(j + s) if fake else 0.0) for j in range(3)]
                + [torch.full((1, 1, 3, 3), 1000.0 if fake else -1000.0)] for s in range(2)]

    # sum of L1 = (0 + 1 + 2) + (1 + 2 + 3) = 9; weight 10 * 4 / (2 + 1) / 2 = 20 / 3
    assert feature_matching_loss(outputs(True), outputs(False)).item() == pytest.approx(60.0, rel=1e-6)
    assert feature_matching_loss(outputs(True), outputs(False), lambda_feat=1.0).item() == pytest.approx(6.0, rel=1e-6)

    torch.manual_seed(0)
    n_layers, num_D, lam = 3, 3, 2.5
    fake = [[torch.randn(2, 3, 5, 5, requires_grad=True) for _ in range(n_layers + 2)] for _ in range(num_D)]
    real = [[torch.randn(2, 3, 5, 5, requires_grad=True) for _ in range(n_layers + 2)] for _ in range(num_D)]
    expected = 0.0
    for fs, rs in zip(fake, real):
        for f, r in zip(fs[:-1], rs[:-1]):
            expected += lam * 4.0 / (n_layers + 1) / num_D * (f - r).abs().mean().item()
    loss = feature_matching_loss(fake, real, lambda_feat=lam)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert all(r.grad is None for rs in real for r in rs)  # real features are detached
    assert all(fs[-1].grad is None for fs in fake)  # the prediction is not matched
    f, r = fake[1][2], real[1][2]
    expected_grad = torch.sign(f - r) / f.numel() * (lam * 4.0 / (n_layers + 1) / num_D)
    assert torch.allclose(f.grad, expected_grad, rtol=1e-6, atol=1e-9)


def test_feature_matching_loss_needs_intermediate_features():
    with pytest.raises(ValueError, match="getIntermFeat"):
        feature_matching_loss([[torch.zeros(1)]], [[torch.zeros(1)]])


# ============================================================================ VGG

VGG_CONVS = {  # torchvision vgg19().features index -> (out, in) of its 3x3 conv
    0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256),
    16: (256, 256), 19: (512, 256), 21: (512, 512), 23: (512, 512), 25: (512, 512), 28: (512, 512),
    30: (512, 512), 32: (512, 512), 34: (512, 512),
}
VGG_TRUNK = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28]  # the convs of features 0..29


def vgg_trunk_layout():
    out = {}
    for i in VGG_TRUNK:
        o, c = VGG_CONVS[i]
        out[f"features.{i}.weight"] = (o, c, 3, 3)
        out[f"features.{i}.bias"] = (o,)
    return out


def oracle_vgg(sd, x):
    """relu1_1, relu2_1, relu3_1, relu4_1, relu5_1 of VGG19 with F.conv2d / F.max_pool2d."""
    def c(x, i):
        return F.relu(F.conv2d(x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], padding=1))

    pool = lambda t: F.max_pool2d(t, 2, 2)  # noqa: E731
    h1 = c(x, 0)
    h2 = c(pool(c(h1, 2)), 5)
    h3 = c(pool(c(h2, 7)), 10)
    h4 = c(pool(c(c(c(h3, 12), 14), 16)), 19)
    h5 = c(pool(c(c(c(h4, 21), 23), 25)), 28)
    return [h1, h2, h3, h4, h5]


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """A torchvision-style VGG19 state_dict: features 0..34 with real shapes; the classifier,
    which Vgg19 never reads, as small placeholders (the real ones are 25088x4096 etc.)."""
    g = torch.Generator().manual_seed(123)
    sd = {}
    for i, (o, c) in VGG_CONVS.items():
        sd[f"features.{i}.weight"] = torch.randn(o, c, 3, 3, generator=g) * (2.0 / (9 * c)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(o, generator=g) * 0.01
    for i in (0, 3, 6):
        sd[f"classifier.{i}.weight"] = torch.zeros(2, 2)
        sd[f"classifier.{i}.bias"] = torch.zeros(2)
    path = tmp_path_factory.mktemp("vgg") / "vgg19-dcbb9e9d.pth"
    torch.save(sd, path)
    return path, sd


def test_vgg_keys_and_outputs():
    torch.manual_seed(0)
    vgg = Vgg19(pretrained=False)
    assert shapes(vgg) == vgg_trunk_layout()
    assert not any(p.requires_grad for p in vgg.parameters()) and not vgg.training
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        feats = vgg(x)
    assert [tuple(f.shape) for f in feats] == [(1, 64, 32, 32), (1, 128, 16, 16), (1, 256, 8, 8),
                                               (1, 512, 4, 4), (1, 512, 2, 2)]
    with torch.no_grad():
        for a, e in zip(feats, oracle_vgg(vgg.state_dict(), x), strict=True):
            assert_rel_close(a, e, 1e-5)


def _assert_vgg_weights_equal_file(vgg, sd):
    own = vgg.state_dict()
    assert set(own) == set(vgg_trunk_layout())
    for k, v in own.items():
        assert torch.equal(v, sd[k]), k


def test_vgg_loads_torchvision_file_by_path_and_env(vgg_file, monkeypatch):
    path, sd = vgg_file
    monkeypatch.delenv(VGG19_WEIGHTS_ENV, raising=False)
    _assert_vgg_weights_equal_file(Vgg19(path), sd)
    _assert_vgg_weights_equal_file(Vgg19(str(path), download=False), sd)
    monkeypatch.setenv(VGG19_WEIGHTS_ENV, str(path))
    assert VGG19_WEIGHTS_ENV == "FASTP2PHD_VGG19_WEIGHTS"
    _assert_vgg_weights_equal_file(Vgg19(download=False), sd)
    loss = VGGLoss(download=False)
    _assert_vgg_weights_equal_file(loss.vgg, sd)


def test_vgg_missing_weights(tmp_path, monkeypatch):
    monkeypatch.delenv(VGG19_WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert torch.hub.get_dir().startswith(str(tmp_path))  # the hub cache really is the empty tmp dir
    with pytest.raises(VGGWeightsNotFound) as info:
        Vgg19(download=False)
    assert "--no_vgg_loss" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    # a path given that does not exist is refused too, and so is a stale environment variable
    with pytest.raises(VGGWeightsNotFound):
        Vgg19(tmp_path / "nope.pth", download=False)
    monkeypatch.setenv(VGG19_WEIGHTS_ENV, str(tmp_path / "nope.pth"))
    with pytest.raises(VGGWeightsNotFound, match=VGG19_WEIGHTS_ENV):
        Vgg19(download=False)


def test_vgg_loss_by_hand():
    torch.manual_seed(0)
    vgg = Vgg19(pretrained=False)
    loss = VGGLoss(vgg=vgg)
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    y = torch.randn(1, 3, 32, 32, requires_grad=True)
    value = loss(x, y)
    with torch.no_grad():
        fx, fy = oracle_vgg(vgg.state_dict(), x), oracle_vgg(vgg.state_dict(), y)
        weights = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0]
        expected = sum(w * (a - b).abs().mean() for w, a, b in zip(weights, fx, fy))
    assert expected > 0
    assert_rel_close(value.detach(), expected, 1e-5)
    value.backward()
    assert x.grad is not None and x.grad.abs().max() > 0
    assert y.grad is None  # the target's features are detached
    with torch.no_grad():
        assert loss(x, x.clone()).item() == 0.0


@pytest.mark.parametrize("dtype, autocast", [(torch.float32, False), (torch.float64, False), (torch.bfloat16, True),
                                             (torch.float32, True), (torch.float64, True)])
def test_l1_loss_is_f_l1_loss_bit_for_bit(dtype, autocast):
    """The sign-saving L1: F.l1_loss's value and gradients (under autocast at least in float32, as CUDA's autocast runs
    it: float64 stays float64)."""
    from fastp2phd.models.losses import l1_loss

    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 7, 9, generator=g).to(dtype).requires_grad_(True)
    y = torch.randn(2, 5, 7, 9, generator=g).to(dtype)
    y[0, 0, 0] = x.detach()[0, 0, 0]  # zero differences: sign 0
    y.requires_grad_(True)
    wide = torch.promote_types(dtype, torch.float32) if autocast else dtype
    expected = F.l1_loss(x.to(wide), y.to(wide))
    grad = torch.tensor(3.7, dtype=expected.dtype)
    expected_grads = torch.autograd.grad(expected, (x, y), grad)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value = l1_loss(x, y)
    grads = torch.autograd.grad(value, (x, y), grad)
    assert torch.equal(value, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))
    assert grads[0].dtype == dtype


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_l1_loss_of_nan_and_inf_differences_is_f_l1_loss_bit_for_bit(compiled):
    """NaN differences (a NaN input, inf - inf) make the loss NaN and get gradient 0, as F.l1_loss's (torch.sign of
    NaN is 0); inf differences get the sign's gradient. Compiled too, where the int8 sign has its own formula."""
    from fastp2phd.models.losses import l1_loss

    loss = torch.compile(l1_loss, fullgraph=True) if compiled else l1_loss
    x = torch.tensor([1.0, float("nan"), float("inf"), float("inf"), -float("inf"), 2.0, 3.0]).requires_grad_(True)
    y = torch.tensor([0.5, 1.0, 1.0, float("inf"), 0.0, 2.0, 4.0])
    value, expected = loss(x, y), F.l1_loss(x, y)
    grad, expected_grad = torch.autograd.grad(value, x)[0], torch.autograd.grad(expected, x)[0]
    assert value.isnan() and expected.isnan()
    assert torch.equal(grad, expected_grad)
    assert (grad != 0).tolist() == [True, False, True, False, True, False, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_the_l1_gradient_is_the_same_from_the_gpus_direct_multiply(dtype):
    """Backward scales the int8 sign by converting it first on the CPU and by one mixed-dtype multiply on a GPU:
    the same values, signed zeros included, in the scale's dtype (the GPU's formula, run here on the CPU)."""
    from fastp2phd.models.losses import _scaled

    sign = torch.tensor([[-1, 0, 1], [1, -1, 0]], dtype=torch.int8)
    for scale in (torch.tensor(-0.37, dtype=dtype), torch.tensor(3e-5, dtype=dtype)):
        direct, converted = sign * scale, _scaled(sign, scale)
        assert direct.dtype == converted.dtype == dtype
        assert torch.equal(direct, converted) and torch.equal(direct.signbit(), converted.signbit())


def test_the_perceptual_and_feature_matching_losses_serve_forward_ad_and_torch_func():
    """Forward AD (dual tensors, torch.func.jvp), torch.func.grad and vmap run through VGGLoss and
    feature_matching_loss as through the same losses built on F.l1_loss, which the sign-saving L1 replaces."""
    import torch.autograd.forward_ad as fwAD

    from fastp2phd.models.losses import feature_matching_loss, l1_loss

    g = torch.Generator().manual_seed(8)
    vgg = Vgg19(pretrained=False)
    x, y, tangent = (torch.randn(1, 3, 16, 24, generator=g, dtype=torch.float64) for _ in range(3))
    vgg.double()

    def vgg_loss_with_f_l1(a):
        return sum(w * F.l1_loss(fa, fb) for w, fa, fb in zip(VGGLoss.weights, vgg(a), vgg(y)))

    loss = VGGLoss(vgg=vgg, checkpoint=True)
    value, value_tangent = torch.func.jvp(lambda a: loss(a, y), (x,), (tangent,))
    expected, expected_tangent = torch.func.jvp(vgg_loss_with_f_l1, (x,), (tangent,))
    assert expected_tangent.abs() > 0
    assert_rel_close(value, expected, 1e-12)
    assert_rel_close(value_tangent, expected_tangent, 1e-12)
    with fwAD.dual_level():
        dual = fwAD.unpack_dual(loss(fwAD.make_dual(x, tangent), y))
    assert dual.tangent is not None, "forward-mode AD dropped the tangent"
    assert_rel_close(dual.tangent, expected_tangent, 1e-12)
    assert_rel_close(torch.func.grad(lambda a: loss(a, y))(x), torch.func.grad(vgg_loss_with_f_l1)(x), 1e-12)

    fake = [[torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64) for _ in range(3)] for _ in range(2)]
    real = [[torch.randn_like(t) for t in scale] for scale in fake]
    first = fake[0][0]

    def matching(feature, with_f_l1):
        pred = [[feature] + fake[0][1:], fake[1]]
        if with_f_l1:  # 2 discriminators of 2 feature layers each: weight 4 / 2 / 2 * lambda_feat 10
            return sum(F.l1_loss(f, r) for pf, pr in zip(pred, real) for f, r in zip(pf[:-1], pr[:-1])) * 10.0
        return feature_matching_loss(pred, real)

    tangents = [torch.func.jvp(lambda f: matching(f, with_f_l1), (first,), (torch.ones_like(first),))
                for with_f_l1 in (False, True)]
    assert tangents[1][1].abs() > 0
    assert_rel_close(tangents[0][0], tangents[1][0], 1e-12)
    assert_rel_close(tangents[0][1], tangents[1][1], 1e-12)
    batch = torch.randn(4, 3, 16, 24, generator=g, dtype=torch.float64)
    per_item = torch.func.vmap(l1_loss)(batch, batch.flip(0))
    assert_rel_close(per_item, torch.stack([F.l1_loss(a, b) for a, b in zip(batch, batch.flip(0))]), 1e-12)


@pytest.mark.parametrize("dtype, autocast", [(torch.bfloat16, True), (torch.float32, False)], ids=["bf16", "fp32"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_l1_loss_takes_a_large_widened_difference_by_chunks(dtype, autocast, layout, monkeypatch):
    """bf16 features under autocast: above WIDENED_CHUNK_ELEMENTS the float32 difference is taken a few channels at
    a time (the last chunk uneven), never whole; the value is F.l1_loss's within float32 rounding, the gradients bit
    for bit. A float32 difference of float32 inputs is not wider than they are: it stays whole, bit for bit."""
    from fastp2phd.memory import LiveBytes
    from fastp2phd.models import losses

    monkeypatch.setattr(losses, "WIDENED_CHUNK_ELEMENTS", 2 * 2 * 40 * 48)  # two channels of 2x7x40x48: 4 chunks
    g = torch.Generator().manual_seed(5)
    base = torch.full((2, 7, 40, 96), float("nan"), dtype=dtype)  # a sentinel buffer: "strided" reads every other
    x = (torch.randn(2, 7, 40, 48, generator=g) * 3 + 100).to(dtype)  # a large mean, a small spread
    y = (torch.randn(2, 7, 40, 48, generator=g) * 3 + 100).to(dtype)
    y[1, 6] = x[1, 6]  # zero differences (sign 0), in the last chunk
    if layout == "channels_last":
        x, y = x.contiguous(memory_format=torch.channels_last), y.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = base[..., ::2].copy_(x)
    x.requires_grad_(True)
    y.requires_grad_(True)
    expected = F.l1_loss(x.float(), y.float())
    grad = torch.tensor(3.7)
    expected_grads = torch.autograd.grad(expected, (x, y), grad)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        value = losses.l1_loss(x, y)
    grads = torch.autograd.grad(value, (x, y), grad)
    assert value.dtype == torch.float32
    if autocast:
        assert_rel_close(value.detach(), expected, 2e-7)
    else:
        assert torch.equal(value, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads))
    assert grads[0].dtype == dtype
    with LiveBytes() as tracker, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        a, b = x.detach().clone().requires_grad_(True), y.detach().clone()  # (the tracker charges their views nothing)
        before = tracker.live
        tracker.reset_peak()
        losses.l1_loss(a, b)
        # Chunked: the signs (1 byte each), a chunk's float32 difference and its masks, 3 bytes an element; whole,
        # the float32 difference alone takes 4.
        assert (tracker.peak - before < a.numel() * 4) == autocast


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_vgg_max_pool_keeps_no_indices_and_is_max_pool2d_bit_for_bit(dtype, layout):
    """VGG's pools find the maxima again in backward: values, gradients, double backward, forward AD and
    torch.func's grad and vmap equal nn.MaxPool2d's bit for bit, with ReLU-like ties (the first maximum takes
    the gradient), NaN and -inf windows and odd sizes; and the pool keeps nothing for backward but its input
    (the native one adds int64 indices)."""
    import torch.autograd.forward_ad as fwAD

    from fastp2phd.memory import LiveBytes
    from fastp2phd.models.vgg import IndexFreeMaxPool2d

    g = torch.Generator().manual_seed(11)
    x = torch.randn(2, 3, 9, 11, generator=g).relu_().to(dtype)  # half zeros: tied windows
    x[0, 0, :2, :2] = float("nan")
    x[1, 0, 0, 0] = x[1, 0, 1, 1] = float("nan")  # two NaN in one window
    x[0, 1, 2:4, 2:4] = float("-inf")
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # a view into a sentinel buffer
        x = torch.full((2, 3, 9, 22), 7.0, dtype=dtype)[..., ::2].copy_(x)
    pools = [type(m) for m in Vgg19(pretrained=False).features if isinstance(m, torch.nn.MaxPool2d)]
    assert pools == [IndexFreeMaxPool2d] * 4
    outputs, grads, double_grads = [], [], []
    for pool in (torch.nn.MaxPool2d(2, 2), IndexFreeMaxPool2d(2, 2)):
        leaf = x.detach().clone(memory_format=torch.preserve_format).requires_grad_(True)
        grad_out = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(1), dtype=dtype)
        grad_out.requires_grad_(True)
        out = pool(leaf)
        (dx,) = torch.autograd.grad(out, leaf, grad_out, create_graph=True)
        (ddx,) = torch.autograd.grad(dx, grad_out, torch.ones_like(dx))
        outputs.append(out.detach())
        grads.append(dx.detach())
        double_grads.append(ddx)
    assert torch.equal(outputs[0].nan_to_num(), outputs[1].nan_to_num()) and outputs[1].isnan().sum() == 2
    assert outputs[1].stride() == outputs[0].stride() and grads[1].stride() == grads[0].stride()
    assert torch.equal(grads[0], grads[1]) and torch.equal(double_grads[0], double_grads[1])
    tangent = torch.randn(x.shape, generator=g).to(dtype)
    with fwAD.dual_level():
        expected = fwAD.unpack_dual(F.max_pool2d(fwAD.make_dual(x, tangent), 2, 2)).tangent
        dual = fwAD.make_dual(x.detach().clone().requires_grad_(True), tangent)
        assert torch.equal(fwAD.unpack_dual(IndexFreeMaxPool2d(2, 2)(dual)).tangent, expected)
    weights = torch.randn(3, 4, 5, generator=g).to(dtype)  # torch.func's transforms, per image
    by_image = [torch.func.vmap(torch.func.grad(lambda plane: (pool(plane) * weights).sum()))(x.detach())
                for pool in (torch.nn.MaxPool2d(2, 2), IndexFreeMaxPool2d(2, 2))]
    assert torch.equal(*by_image)
    kept = []
    for pool in (torch.nn.MaxPool2d(2, 2), IndexFreeMaxPool2d(2, 2)):
        with LiveBytes() as tracker:
            leaf = torch.zeros(1, 64, 32, 32, requires_grad=True)
            before = tracker.live
            out = pool(leaf)
            kept.append(tracker.live - before - out.untyped_storage().nbytes())
            del out
    assert kept == [64 * 16 * 16 * 8, 0]  # the native pool's int64 indices


def test_vgg_loss_by_slices_equals_whole_feature_maps_and_checkpoints():
    """Slice by slice (targets freed early), and recomputed in backward: the same loss and gradient."""
    torch.manual_seed(0)
    vgg = Vgg19(pretrained=False)
    x = torch.randn(1, 3, 32, 48, requires_grad=True)
    y = torch.randn(1, 3, 32, 48)
    whole = sum(w * F.l1_loss(a, b) for w, a, b in zip(VGGLoss.weights, vgg(x), vgg(y)))
    (expected,) = torch.autograd.grad(whole, x)
    for checkpoint in (False, True):
        value = VGGLoss(vgg=vgg, checkpoint=checkpoint)(x, y)
        assert torch.equal(value, whole)
        assert torch.equal(torch.autograd.grad(value, x)[0], expected)


CHECKPOINTED = {
    "GlobalGenerator": (lambda ck: GlobalGenerator(5, 3, ngf=4, n_downsampling=2, n_blocks=2, checkpoint=ck), (2, 5, 16, 24)),
    "LocalEnhancer": (lambda ck: LocalEnhancer(5, 3, ngf=4, n_downsample_global=1, n_blocks_global=1,
                                               n_local_enhancers=2, n_blocks_local=2, checkpoint=ck), (1, 5, 32, 32)),
    "Encoder": (lambda ck: Encoder(3, 3, ngf=4, n_downsampling=2, checkpoint=ck), (2, 3, 16, 24)),
}


@pytest.mark.parametrize("name", CHECKPOINTED)
def test_activation_checkpointing_gives_the_same_outputs_and_gradients(name):
    build, shape = CHECKPOINTED[name]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    inst = torch.randint(0, 3, (shape[0], 1, *shape[2:]), generator=torch.Generator().manual_seed(5))
    results = []
    for ck in (False, True):
        torch.manual_seed(0)
        net = build(ck)
        out = net(x, inst) if name == "Encoder" else net(x)
        out.square().sum().backward()
        results.append((out.detach(), [p.grad for p in net.parameters()]))
        with torch.no_grad():  # no autograd: no recomputation either, the plain forward
            assert torch.equal(net(x, inst) if name == "Encoder" else net(x), out)
        # torch.func refuses checkpointing's saved-tensor hooks: the network keeps its activations there.
        params, args = dict(net.named_parameters()), ((x, inst) if name == "Encoder" else (x,))
        grads = torch.func.grad(lambda p: torch.func.functional_call(net, p, args).square().sum())(params)
        # (Under torch.func the IN layers take their differentiable path: equal within rounding.)
        assert_same_gradients([grads[k] if p.grad is not None else None for k, p in params.items()],
                              [p.grad for p in params.values()], 1e-5)
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "plain"])
def test_the_global_generator_scripts_like_the_original_and_runs_without_fastp2phd(fused, tmp_path):
    """torch.jit.script takes G1 as it takes the original's (a Sequential of PyTorch's modules): the saved
    script runs in a process that never imports fastp2phd, with G1's outputs."""
    import subprocess
    import sys

    torch.manual_seed(12)
    net = GlobalGenerator(5, 3, ngf=4, n_downsampling=2, n_blocks=2, fused=fused).eval()
    x = torch.randn(1, 5, 16, 24)
    torch.save(x, tmp_path / "x.pt")
    torch.jit.script(net).save(str(tmp_path / "g.pt"))
    code = (f"import sys, torch; out = torch.jit.load({str(tmp_path / 'g.pt')!r})(torch.load({str(tmp_path / 'x.pt')!r}));"
            f"torch.save(out, {str(tmp_path / 'out.pt')!r}); assert 'fastp2phd' not in sys.modules")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_rel_close(torch.load(tmp_path / "out.pt"), net(x).detach(), 1e-5)


def test_networks_compile_fullgraph():
    """The fused networks (with the registered instance_mean op inside the encoder) trace as one graph."""
    torch._dynamo.reset()
    torch.manual_seed(90)
    encoder = Encoder(3, 3, ngf=4, n_downsampling=2)
    generator = GlobalGenerator(6, 3, ngf=4, n_downsampling=2, n_blocks=1)
    image = torch.randn(2, 3, 16, 24)
    inst = torch.randint(0, 4, (2, 1, 16, 24)) * 1000 + 26000

    def forward(image, inst):
        return generator(torch.cat([image, encoder(image, inst)], dim=1))

    compiled = torch.compile(forward, fullgraph=True)
    assert_rel_close(compiled(image, inst), forward(image, inst), 1e-5)

"""State_dict layouts ({key: shape}) of the published pix2pixHD label2city checkpoints.

Written out by hand from the original networks' layer lists (nn.Sequential
indices), independently of fastp2phd: nothing here imports the package under test.
The small helpers only save typing; every index and every shape below is spelled
out explicitly.

Conventions: ``nn.Conv2d(in, out, k)`` stores ``weight`` as (out, in, k, k);
``nn.ConvTranspose2d(in, out, k)`` stores it as (in, out, k, k); both have a
``bias`` of shape (out,). Instance norm (affine=False), ReLU, LeakyReLU, padding
and tanh layers hold no parameters or buffers, so they take an index but add no key.
"""
from __future__ import annotations

Layout = dict  # {state_dict key: shape tuple}


def conv(key: str, out_channels: int, in_channels: int, k: int) -> Layout:
    """An nn.Conv2d at ``key``."""
    return {f"{key}.weight": (out_channels, in_channels, k, k), f"{key}.bias": (out_channels,)}


def conv_transpose(key: str, in_channels: int, out_channels: int, k: int) -> Layout:
    """An nn.ConvTranspose2d at ``key`` (weight is (in, out, k, k))."""
    return {f"{key}.weight": (in_channels, out_channels, k, k), f"{key}.bias": (out_channels,)}


def resnet_block(key: str, dim: int) -> Layout:
    """A residual block [reflect pad, conv, norm, relu, reflect pad, conv, norm]:
    convs at conv_block.1 and conv_block.5."""
    return {**conv(f"{key}.conv_block.1", dim, dim, 3), **conv(f"{key}.conv_block.5", dim, dim, 3)}


def _join(*parts: Layout) -> Layout:
    out: Layout = {}
    for part in parts:
        assert not set(out) & set(part), "duplicate key in a hand-written layout"
        out.update(part)
    return out


# --------------------------------------------------------------------------- G1
# label2city_512p (netG global, label_nc 35 + 1 boundary channel = 36 input channels,
# ngf 64, n_downsample_global 4, n_blocks_global 9):
#   0 pad | 1 conv7x7 36->64 | 2 norm | 3 relu
#   4 conv 64->128 s2 | 7 conv 128->256 s2 | 10 conv 256->512 s2 | 13 conv 512->1024 s2
#   16..24 residual blocks (1024)
#   25 convT 1024->512 | 28 convT 512->256 | 31 convT 256->128 | 34 convT 128->64
#   37 pad | 38 conv7x7 64->3 | 39 tanh


def _label2city_g1_trunk(input_nc: int) -> Layout:
    """Keys model.1 .. model.34 shared by the 512p G and the 1024p G's G1."""
    return _join(
        conv("model.1", 64, input_nc, 7),
        conv("model.4", 128, 64, 3),
        conv("model.7", 256, 128, 3),
        conv("model.10", 512, 256, 3),
        conv("model.13", 1024, 512, 3),
        resnet_block("model.16", 1024),
        resnet_block("model.17", 1024),
        resnet_block("model.18", 1024),
        resnet_block("model.19", 1024),
        resnet_block("model.20", 1024),
        resnet_block("model.21", 1024),
        resnet_block("model.22", 1024),
        resnet_block("model.23", 1024),
        resnet_block("model.24", 1024),
        conv_transpose("model.25", 1024, 512, 3),
        conv_transpose("model.28", 512, 256, 3),
        conv_transpose("model.31", 256, 128, 3),
        conv_transpose("model.34", 128, 64, 3),
    )


LABEL2CITY_512P_G: Layout = _join(_label2city_g1_trunk(36), conv("model.38", 3, 64, 7))

# label2city_512p_feat: the generator also reads the 3 encoder feature channels (36 + 3 = 39).
LABEL2CITY_512P_FEAT_G: Layout = _join(_label2city_g1_trunk(39), conv("model.38", 3, 64, 7))

# ----------------------------------------------------------------------- G2
# label2city_1024p (netG local, ngf 32, n_local_enhancers 1, n_blocks_local 3):
# G1 (model.*) is built with ngf 64 and loses its final pad/conv/tanh (37..39).
#   model1_1: 0 pad | 1 conv7x7 36->32 | 2 norm | 3 relu | 4 conv 32->64 s2 | 5 norm | 6 relu
#   model1_2: 0,1,2 residual blocks (64) | 3 convT 64->32 | 4 norm | 5 relu | 6 pad | 7 conv7x7 32->3 | 8 tanh
LABEL2CITY_1024P_G: Layout = _join(
    _label2city_g1_trunk(36),
    conv("model1_1.1", 32, 36, 7),
    conv("model1_1.4", 64, 32, 3),
    resnet_block("model1_2.0", 64),
    resnet_block("model1_2.1", 64),
    resnet_block("model1_2.2", 64),
    conv_transpose("model1_2.3", 64, 32, 3),
    conv("model1_2.7", 3, 32, 7),
)

# -------------------------------------------------------------------- Encoder
# label2city feature encoder (input the 3-channel image, feat_num 3, nef 16, n_downsample_E 4):
#   0 pad | 1 conv7x7 3->16 | 2 norm | 3 relu
#   4 conv 16->32 s2 | 7 conv 32->64 s2 | 10 conv 64->128 s2 | 13 conv 128->256 s2
#   16 convT 256->128 | 19 convT 128->64 | 22 convT 64->32 | 25 convT 32->16
#   28 pad | 29 conv7x7 16->3 | 30 tanh
LABEL2CITY_E: Layout = _join(
    conv("model.1", 16, 3, 7),
    conv("model.4", 32, 16, 3),
    conv("model.7", 64, 32, 3),
    conv("model.10", 128, 64, 3),
    conv("model.13", 256, 128, 3),
    conv_transpose("model.16", 256, 128, 3),
    conv_transpose("model.19", 128, 64, 3),
    conv_transpose("model.22", 64, 32, 3),
    conv_transpose("model.25", 32, 16, 3),
    conv("model.29", 3, 16, 7),
)

# -------------------------------------------------------------- Discriminator
# label2city D (input 36 + 3 = 39 channels, ndf 64, n_layers_D 3, num_D 2, GAN feature loss on):
# every layer group is its own Sequential scale{s}_layer{j} whose conv is at index 0.
LABEL2CITY_D: Layout = _join(
    conv("scale0_layer0.0", 64, 39, 4),
    conv("scale0_layer1.0", 128, 64, 4),
    conv("scale0_layer2.0", 256, 128, 4),
    conv("scale0_layer3.0", 512, 256, 4),
    conv("scale0_layer4.0", 1, 512, 4),
    conv("scale1_layer0.0", 64, 39, 4),
    conv("scale1_layer1.0", 128, 64, 4),
    conv("scale1_layer2.0", 256, 128, 4),
    conv("scale1_layer3.0", 512, 256, 4),
    conv("scale1_layer4.0", 1, 512, 4),
)

# ----------------------------------------------------------------- registry
# name -> (layout, number of keys, the network class name and constructor options that produce it)
PUBLISHED = {
    "label2city_512p_G": (
        LABEL2CITY_512P_G, 56, "GlobalGenerator",
        dict(input_nc=36, output_nc=3, ngf=64, n_downsampling=4, n_blocks=9),
    ),
    "label2city_512p_feat_G": (
        LABEL2CITY_512P_FEAT_G, 56, "GlobalGenerator",
        dict(input_nc=39, output_nc=3, ngf=64, n_downsampling=4, n_blocks=9),
    ),
    "label2city_1024p_G": (
        LABEL2CITY_1024P_G, 74, "LocalEnhancer",
        dict(input_nc=36, output_nc=3, ngf=32, n_downsample_global=4, n_blocks_global=9,
             n_local_enhancers=1, n_blocks_local=3),
    ),
    "label2city_E": (
        LABEL2CITY_E, 20, "Encoder",
        dict(input_nc=3, output_nc=3, ngf=16, n_downsampling=4),
    ),
    "label2city_D": (
        LABEL2CITY_D, 20, "MultiscaleDiscriminator",
        dict(input_nc=39, ndf=64, n_layers=3, num_D=2, getIntermFeat=True),
    ),
}

"""The pix2pixHD model: input encoding, the networks an option set builds, and inference.

``Pix2PixHD`` holds the generator G (``netG``) and, with instance features, the
encoder E (``netE``). It turns a batch of label maps, instance maps and images
into the generator's input (one-hot labels, the instance boundary map, the
encoded or sampled features) exactly as the original model does, and generates
images. The discriminator and the losses live in ``fastp2phd.models``, the training step
that uses them in ``fastp2phd.train_step``.
"""
from __future__ import annotations

import contextlib
from typing import Mapping

import torch
from torch import nn

from . import ops
from .compiling import OneSize
from .errors import InvalidArgumentError, Pix2PixHDError
from .models import Encoder, GlobalGenerator, LocalEnhancer, MultiscaleDiscriminator
from .ops._common import is_fake
from .specs import ModelSpec, TrainSpec


class InputSizeError(Pix2PixHDError, ValueError):
    """An input this generator cannot take: too small, or not a multiple of its size multiple."""


#: Inference precisions: the autocast dtype of each (None: float32 throughout).
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def fastest_precision(device: torch.device | str) -> str:
    """What ``--precision auto`` runs: bf16 where ``device`` has native bfloat16 (a CPU with AVX512-BF16 or AMX,
    a GPU with bf16 units), else fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    from .diagnostics import cpu_bf16

    return "bf16" if device.type == "cpu" and cpu_bf16() is not None else "fp32"


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype that ``precision`` runs inference in on ``device``, or a ValueError that says why not."""
    if precision not in PRECISIONS:
        raise InvalidArgumentError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    device = torch.device(device)
    if precision == "fp16" and device.type == "cpu":
        raise InvalidArgumentError("fp16 inference needs a CUDA device (CPUs have no fast float16 convolutions): use "
                         "--precision bf16 (or fp32) on the CPU")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise InvalidArgumentError(f"{torch.cuda.get_device_name(device)} has no native bfloat16: use --precision fp16 or fp32")
    return PRECISIONS[precision]


def generator_options(spec: ModelSpec) -> tuple[type[GlobalGenerator | LocalEnhancer], dict]:
    """G's class and constructor options for ``spec``, without building it (what a checkpoint is checked against)."""
    options = dict(input_nc=spec.generator_input_nc, output_nc=spec.output_nc, ngf=spec.ngf)
    if spec.netG == "global":
        return GlobalGenerator, dict(options, n_downsampling=spec.n_downsample_global, n_blocks=spec.n_blocks_global,
                                     norm=spec.norm)
    return LocalEnhancer, dict(options, n_downsample_global=spec.n_downsample_global,
                               n_blocks_global=spec.n_blocks_global, n_local_enhancers=spec.n_local_enhancers,
                               n_blocks_local=spec.n_blocks_local, norm=spec.norm)


def encoder_options(spec: ModelSpec) -> dict | None:
    """E's constructor options for ``spec``, or None when it has none."""
    if not spec.has_encoder:
        return None
    return dict(input_nc=spec.output_nc, output_nc=spec.feat_num, ngf=spec.nef, n_downsampling=spec.n_downsample_E,
                norm=spec.norm)


def build_generator(spec: ModelSpec, checkpoint: bool = False) -> nn.Module:
    """G1 (``netG="global"``) or G2 (``"local"``) for ``spec``; ``checkpoint``: recompute activations in backward."""
    cls, options = generator_options(spec)
    return cls(**options, checkpoint=checkpoint)


def build_encoder(spec: ModelSpec, checkpoint: bool = False) -> Encoder | None:
    """The feature encoder E, or None when ``spec`` has none."""
    options = encoder_options(spec)
    return None if options is None else Encoder(**options, checkpoint=checkpoint)


def build_discriminator(spec: TrainSpec) -> MultiscaleDiscriminator:
    # D sees the label input (without features) next to a real or generated image. It outputs
    # logits; --no_lsgan's binary cross entropy is computed from them (GANLoss).
    model = spec.model
    return MultiscaleDiscriminator(model.label_channels + model.output_nc, spec.ndf, spec.n_layers_D, model.norm,
                                   use_sigmoid=False, num_D=spec.num_D, getIntermFeat=not spec.no_ganFeat_loss)


class Pix2PixHD(nn.Module):
    """pix2pixHD's generator side: ``netG``, and ``netE`` with --instance_feat / --label_feat.

    ``generate(label, inst, image=None, feat=None)`` returns the generated image
    and the feature map it used; ``inference`` does the same without an autograd
    graph, taking features from the encoded image or from clusters.
    """

    def __init__(self, spec: ModelSpec, *, checkpoint: bool = False):
        super().__init__()
        self.spec = spec
        self.netG = build_generator(spec, checkpoint)
        self.netE = build_encoder(spec, checkpoint)
        self.clusters: dict[int, torch.Tensor] | None = None
        #: The precision ``generate`` and ``inference`` run in unless told otherwise (``load_run(precision=)``).
        self.precision = "fp32"
        #: Refuses a new input size when the networks replay CUDA graphs (``load_run(compile="reduce-overhead")``).
        self.one_size: OneSize | None = None

    # ------------------------------------------------------------------ inputs
    def check_labels(self, label: torch.Tensor) -> None:
        """Refuse label ids outside 0..label_nc-1 (the one-hot scatter would fail on the device). It reads the
        values: a host sync for a GPU tensor, so the training step checks its batch on the CPU, before moving it."""
        if self.spec.label_nc == 0:
            return
        if label.dim() != 4 or label.shape[1] != 1:
            raise InvalidArgumentError(f"label maps must have shape (N, 1, H, W), got {tuple(label.shape)}")
        # Fake tensors (the memory model) have no values to check.
        lowest, highest = torch.stack(torch.aminmax(label)).tolist() if label.numel() and not is_fake(label) else (0, 0)
        if lowest < 0 or highest >= self.spec.label_nc:
            bad = highest if highest >= self.spec.label_nc else lowest
            raise InvalidArgumentError(
                f"the label map holds id {bad}, outside 0..{self.spec.label_nc - 1}: check --label_nc "
                f"(it must exceed the largest label id)"
            )

    def encode_input(self, label: torch.Tensor, inst: torch.Tensor | None,
                     dtype: torch.dtype = torch.float32, *, checked: bool = False) -> torch.Tensor:
        """One-hot label map (or the input image with --label_nc 0), plus the instance boundary map.

        ``dtype``: float32, or under autocast its low-precision type, which holds the 0/1 maps
        exactly (and holds an input image as autocast's convolutions would round it) in half the memory.
        ``checked``: the labels went through ``check_labels`` already.
        """
        spec = self.spec
        if spec.label_nc == 0:
            input_label = label.to(dtype)
        else:
            if not checked:
                self.check_labels(label)
            n, _, h, w = label.shape
            input_label = torch.zeros(n, spec.label_nc, h, w, device=label.device, dtype=dtype)
            input_label.scatter_(1, label.long(), 1.0)
        if not spec.no_instance:
            if inst is None:
                raise InvalidArgumentError("this model takes instance maps (it was built without --no_instance)")
            input_label = torch.cat([input_label, ops.boundary_map(inst, dtype=dtype)], dim=1)
        return input_label

    def encode_features(self, image: torch.Tensor, inst: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """The encoder's instance-averaged features (per label region with --label_feat)."""
        return self.netE(image, label if self.spec.label_feat else inst)

    def check_size(self, tensor: torch.Tensor, source: str | None = None) -> None:
        """A sentence, rather than a reflection-padding traceback deep in G, for a size G cannot take;
        ``source``: the file the input was read from."""
        multiple, smallest = self.spec.size_multiple, self.spec.min_size
        h, w = tensor.shape[-2:]
        if h < smallest or w < smallest:
            raise InputSizeError(
                f"{'the input' if source is None else source} is {w}x{h} pixels after --resize_or_crop, smaller than "
                f"the {smallest}x{smallest} this model needs; use larger images, or --resize_or_crop resize_and_crop "
                f"with a --loadSize and --fineSize of at least {smallest}"
            )
        if h % multiple or w % multiple:  # (scale_width makes the height loadSize x the aspect ratio: say so)
            raise InputSizeError(
                f"{'the input' if source is None else source} is {w}x{h} pixels (width x height) after "
                f"--resize_or_crop, not a multiple of {multiple} on both sides, which this model needs; use "
                f"--resize_or_crop none, which rounds sizes to multiples of {multiple} as the original does, or crop "
                f"to a --fineSize that is a multiple of {multiple} (scale_width keeps the aspect ratio, so --loadSize "
                f"sets only the width)"
            )

    # ------------------------------------------------------------------ generation
    def forward(self, input_label, inst=None, label=None, image=None, feat=None):
        """(generated image, feature map or None) from an encoded input (``encode_input``).

        With features, ``feat`` is used when given, else ``image`` is encoded
        (``inst``, or ``label`` with --label_feat, says which regions to average).
        This is the part DistributedDataParallel wraps during training.
        """
        feat_map = None
        if self.spec.uses_features:
            if feat is not None:
                feat_map = feat
            elif image is None:
                raise InvalidArgumentError("this model uses features: pass the real image to encode, or a feature map")
            elif self.netE is None:
                raise InvalidArgumentError("this model has no encoder (its run has no <which_epoch>_net_E.pth, or it reads "
                                 "features from files): pass a feature map, or sample clusters")
            else:
                feat_map = self.encode_features(image, inst, label)
            input_label = torch.cat([input_label, feat_map.to(input_label.dtype)], dim=1)
        return self.netG(input_label), feat_map

    def precision_scope(self, device: torch.device, precision: str | None = None):
        """The context that runs ``netG``/``netE`` at ``precision`` (default ``self.precision``): autocast to
        bfloat16 or float16, whose convolutions accumulate in float32 and whose norms and instance means keep
        float32 statistics; nothing for fp32. Inference uses each weight once: autocast's cache of cast weights
        would only keep a low-precision copy of every weight alive to the end (more memory than fp32 needs)."""
        dtype = autocast_dtype(precision or self.precision, device)
        return (torch.autocast(torch.device(device).type, dtype=dtype, cache_enabled=False) if dtype
                else contextlib.nullcontext())

    def generate(self, label, inst=None, image=None, feat=None, *, precision: str | None = None):
        """(generated image, feature map or None) from label and instance maps; the image is float32 at every
        ``precision`` (default ``self.precision``)."""
        self.check_size(label)
        if self.one_size is not None:
            self.one_size.check(label)
        dtype = autocast_dtype(precision or self.precision, label.device)
        with self.precision_scope(label.device, precision):
            fake, feat_map = self(self.encode_input(label, inst, dtype or torch.float32), inst, label, image, feat)
        # A channels_last model (optimize_for_inference) gives channels_last images: hand out the usual layout.
        return fake.float().contiguous(), feat_map

    @torch.no_grad()
    def inference(
        self,
        label: torch.Tensor,
        inst: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        choices: Mapping[int, int] | None = None,
        precision: str | None = None,
    ) -> torch.Tensor:
        """Generate images (float32) without an autograd graph.

        With features: the real ``image`` is encoded when given, else every
        instance takes a cluster centre (sampled with ``generator``, or the index
        ``choices`` gives for its instance id or class; see
        ``fastp2phd.features.sample_feature_map``). ``precision``: fp32, bf16 or fp16 (CUDA only);
        default ``self.precision``.
        """
        feat = None
        if self.spec.uses_features and image is None:
            if self.clusters is None:
                raise InvalidArgumentError(
                    "this model uses instance features: pass the real image (--use_encoded_image) or load clusters "
                    "(fastp2phd encode-features writes them; Pix2PixHD.clusters = load_clusters(...)[0])"
                )
            from .features import sample_feature_map

            feat = sample_feature_map(label if self.spec.label_feat else inst, self.clusters, self.spec.feat_num,
                                      generator=generator, choices=choices)
        return self.generate(label, inst, image, feat, precision=precision)[0]

"""Typed specifications: what each part of the library needs, built once from the options.

The command line (``fastp2phd.options``) parses the original pix2pixHD options and
turns them into these frozen dataclasses; everything below it takes a spec or explicit
arguments, never the parsed options. Field names are the original option names, so a
spec reads like a command line and a run's ``opt.txt`` maps onto it one to one.
From Python, build them directly::

    model = ModelSpec(netG="local", ngf=32, instance_feat=True)
    data = DataSpec.for_model(model, dataroot="datasets/cityscapes", resize_or_crop="none")
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import InvalidArgumentError, Pix2PixHDError

NETG_CHOICES = ("global", "local")
NORM_CHOICES = ("instance", "batch")
RESIZE_OR_CROP_CHOICES = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none")
AMP_DTYPE_CHOICES = ("auto", "bf16", "fp16")
COMPILE_CHOICES = ("off", "default", "reduce-overhead", "max-autotune")  # fastp2phd.compiling


class SpecError(Pix2PixHDError, ValueError):
    """Options that cannot make a model, a dataset or a run; the message names the option."""


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SpecError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


def _check_count(spec: Any, names: tuple[str, ...], minimum: int) -> None:
    for name in names:
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            kind = "a positive" if minimum == 1 else "a non-negative"
            raise SpecError(f"{name} must be {kind} integer, got {value!r}")


# Upper bounds of the options that size the networks and images: far above every published pix2pixHD
# configuration (ngf 64, or 32 with netG local; n_blocks_global 9; label_nc 35 to 182; loadSize 2048), yet
# low enough that a typo or a damaged opt.txt is a sentence rather than a network that fills the memory
# (n_downsample_global 60 grew to 20 GB before anything was checked).
OPTION_BOUNDS = {
    "label_nc": (0, 1024), "input_nc": (1, 256), "output_nc": (1, 256), "feat_num": (1, 256),
    "ngf": (1, 1024), "n_downsample_global": (0, 8), "n_blocks_global": (0, 64), "n_local_enhancers": (1, 3),
    "n_blocks_local": (0, 64), "nef": (1, 1024), "n_downsample_E": (0, 8), "n_clusters": (1, 1024),
    "ndf": (1, 1024), "n_layers_D": (1, 10), "num_D": (1, 8), "loadSize": (1, 16384), "fineSize": (1, 16384),
}
#: The widest layer G or E may have: ngf * 2^(n_downsample_global [+ n_local_enhancers]), nef * 2^n_downsample_E
#: (1024 in the published models; a 4096-channel residual block alone holds 1.2 GB of weights).
MAX_CHANNELS = 4096


def check_bounds(values: Mapping[str, Any], where: Callable[[str], str] | None = None) -> None:
    """Refuse an option in ``values`` outside ``OPTION_BOUNDS``, or G's or E's widest layer above
    ``MAX_CHANNELS``, before anything is built. ``where(name)``: where the value came from (a file, a flag),
    for the message. Options ``values`` lacks, or that are not integers, are left to the specs' own checks."""
    def origin(*names: str) -> str:
        return f" (from {' and '.join(dict.fromkeys(where(n) for n in names))})" if where else ""

    def number(name: str) -> int | None:
        value = values.get(name)
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    for name, (low, high) in OPTION_BOUNDS.items():
        value = number(name)
        if value is not None and value > high:  # (values below the minimum: the specs' sentence)
            raise SpecError(f"{name} must be in {low}..{high}, got {value}{origin(name)}")
    local = values.get("netG") == "local" and number("n_local_enhancers") is not None
    widths = [("ngf", "n_downsample_global", "n_local_enhancers" if local else None, "G")]
    if (values.get("instance_feat") or values.get("label_feat")) and not values.get("load_features"):
        widths.append(("nef", "n_downsample_E", None, "E"))
    for base, down, extra, net in widths:
        names = [n for n in (base, down, extra) if n]
        if any(number(n) is None for n in names):
            continue
        widest = number(base) * 2 ** sum(number(n) for n in names[1:])
        if widest > MAX_CHANNELS:
            terms = " with ".join(f"{n} {number(n)}" for n in names)
            raise SpecError(f"{terms} make {net}'s widest layer {widest} channels, more than {MAX_CHANNELS}"
                            f"{origin(*names)}: lower {' or '.join(names)}")


class _Spec:
    def replace(self, **changes: Any):
        """A copy with ``changes`` (checked again)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, options: Any, **overrides: Any):
        """The spec of an options object (anything with the fields as attributes: parsed options, a
        namespace), taking the fields it has and the defaults for the rest."""
        values = {f.name: getattr(options, f.name) for f in fields(cls) if f.init and hasattr(options, f.name)}
        return cls(**{**values, **overrides})


@dataclass(frozen=True)
class ModelSpec(_Spec):
    """pix2pixHD's generator (and encoder) and the input they are built for."""

    label_nc: int = 35  # label classes; 0: the input is an image of input_nc channels
    input_nc: int = 3
    output_nc: int = 3
    no_instance: bool = False  # no instance maps, so no boundary map
    instance_feat: bool = False  # instance-wise features from an encoder (or clusters)
    label_feat: bool = False  # label-wise features instead
    feat_num: int = 3
    load_features: bool = False  # precomputed feature maps instead of an encoder
    netG: str = "global"
    ngf: int = 64
    n_downsample_global: int = 4
    n_blocks_global: int = 9
    n_local_enhancers: int = 1
    n_blocks_local: int = 3
    norm: str = "instance"
    nef: int = 16
    n_downsample_E: int = 4
    n_clusters: int = 10

    def __post_init__(self) -> None:
        _check_choice("netG", self.netG, NETG_CHOICES)
        _check_choice("norm", self.norm, NORM_CHOICES)
        _check_count(self, ("input_nc", "output_nc", "feat_num", "ngf", "n_local_enhancers", "nef", "n_clusters"), 1)
        _check_count(self, ("label_nc", "n_downsample_global", "n_blocks_global", "n_blocks_local",
                            "n_downsample_E"), 0)
        check_bounds({f.name: getattr(self, f.name) for f in fields(self)})
        if self.instance_feat and self.label_feat:
            raise SpecError("choose one of instance_feat and label_feat")
        if self.instance_feat and self.no_instance:
            raise SpecError("instance_feat pools features per instance and needs instance maps: drop no_instance")

    @property
    def uses_features(self) -> bool:
        """Whether G's input holds feature channels (instance or label features)."""
        return self.instance_feat or self.label_feat

    @property
    def has_encoder(self) -> bool:
        """Whether the model has an encoder E (features that are not read from files)."""
        return self.uses_features and not self.load_features

    @property
    def label_channels(self) -> int:
        """Channels of the encoded label input: one-hot classes (or the input image), + the boundary map."""
        return (self.label_nc if self.label_nc != 0 else self.input_nc) + (0 if self.no_instance else 1)

    @property
    def generator_input_nc(self) -> int:
        return self.label_channels + (self.feat_num if self.uses_features else 0)

    @property
    def generator_size_multiple(self) -> int:
        """Height and width must be multiples of this for G to return the input size."""
        return 2**self.n_downsample_global * (2**self.n_local_enhancers if self.netG == "local" else 1)

    @property
    def size_multiple(self) -> int:
        """The multiple G and, where there is one, E need."""
        multiple = self.generator_size_multiple
        return max(multiple, 2**self.n_downsample_E) if self.has_encoder else multiple

    @property
    def min_size(self) -> int:
        """The smallest height and width G (and E) take: a reflection pad needs more pixels than it pads,
        3 on the input of G1 (1/2^n_local_enhancers of the image) and 1 in the residual blocks at G1's coarsest map."""
        levels = 2**self.n_local_enhancers if self.netG == "local" else 1
        need = max(4 * levels, self.generator_size_multiple * (2 if self.n_blocks_global else 1))
        return -(-need // self.size_multiple) * self.size_multiple


@dataclass(frozen=True)
class DataSpec(_Spec):
    """A dataset: where it is, how its images are resized, cropped and flipped, and what it holds."""

    dataroot: str = "./datasets/cityscapes/"  # a Cityscapes-style folder, or "synthetic"
    phase: str = "train"
    resize_or_crop: str = "scale_width"
    loadSize: int = 1024
    fineSize: int = 512
    no_flip: bool = False
    train: bool = False  # a training set: random flips (unless no_flip)
    read_images: bool = False  # read the photos (<phase>_img): training, or encoding real images
    max_dataset_size: float = math.inf
    synthetic_size: int | None = None  # scenes of the synthetic dataset (default 64 train, 16 test)
    seed: int = 0  # crops, flips and synthetic scenes
    label_nc: int = 35
    no_instance: bool = False
    load_features: bool = False
    size_base: int = 16  # what resize_or_crop "none" rounds sizes to (the generator's size multiple)
    # What a step of the model needs per pixel it processes (fastp2phd.memory; 0: the data's own bytes only) and
    # the memory of its device (0: this machine's): an image the step cannot hold is refused before it is decoded.
    step_bytes_per_pixel: int = 0
    step_device_memory: int = 0

    def __post_init__(self) -> None:
        _check_choice("resize_or_crop", self.resize_or_crop, RESIZE_OR_CROP_CHOICES)
        _check_count(self, ("loadSize", "fineSize", "size_base"), 1)
        _check_count(self, ("step_bytes_per_pixel", "step_device_memory"), 0)
        _check_count(self, ("label_nc",), 0)
        check_bounds({"label_nc": self.label_nc, "loadSize": self.loadSize, "fineSize": self.fineSize})
        if self.max_dataset_size < 0:
            raise SpecError(f"max_dataset_size must be 0 or more, got {self.max_dataset_size}")
        if self.fineSize > self.loadSize and "crop" in self.resize_or_crop:
            raise SpecError(f"fineSize {self.fineSize} is larger than loadSize {self.loadSize}: the crop cannot fit")

    @classmethod
    def for_model(cls, model: ModelSpec, **fields_: Any) -> "DataSpec":
        """The dataset ``model`` reads: its label classes, instance maps, features and size base."""
        return cls(label_nc=model.label_nc, no_instance=model.no_instance, load_features=model.load_features,
                   size_base=model.generator_size_multiple, **fields_)


@dataclass(frozen=True)
class TrainSpec(_Spec):
    """A training run: the model, its data, the discriminators and losses, the schedule, and the outputs."""

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=lambda: DataSpec(train=True, read_images=True))
    name: str = "label2city"
    checkpoints_dir: str = "./checkpoints"
    which_epoch: str = "latest"
    continue_train: bool = False
    load_pretrain: str = ""
    # discriminators and losses
    num_D: int = 2
    n_layers_D: int = 3
    ndf: int = 64
    no_ganFeat_loss: bool = False
    no_lsgan: bool = False
    lambda_feat: float = 10.0
    no_vgg_loss: bool = False
    vgg_weights: str | None = None
    lambda_l1: float = 0.0  # not in the original: weight of an L1 loss between generated and real images
    pool_size: int = 0
    # optimisation
    lr: float = 0.0002
    beta1: float = 0.5
    niter: int = 100
    niter_decay: int = 100
    niter_fix_global: int = 0
    fp16: bool = False
    amp_dtype: str = "auto"
    checkpoint_activations: bool = False
    compile: str = "off"  # not in the original: torch.compile mode of G, E, D and the VGG loss (fastp2phd.compiling)
    channels_last: bool = False  # not in the original: every network and image in channels_last (NHWC) layout
    batchSize: int = 1
    nThreads: int = 2
    serial_batches: bool = False
    seed: int = 0
    # outputs
    print_freq: int = 100
    display_freq: int = 100
    save_latest_freq: int = 1000
    save_epoch_freq: int = 10
    no_html: bool = False
    tf_log: bool = False
    no_progress: bool = False

    def __post_init__(self) -> None:
        _check_choice("amp_dtype", self.amp_dtype, AMP_DTYPE_CHOICES)
        _check_choice("compile", self.compile, COMPILE_CHOICES)
        _check_count(self, ("num_D", "n_layers_D", "ndf", "batchSize", "print_freq", "display_freq",
                            "save_latest_freq", "save_epoch_freq"), 1)
        _check_count(self, ("pool_size", "niter", "niter_decay", "niter_fix_global", "nThreads"), 0)
        check_bounds({"ndf": self.ndf, "n_layers_D": self.n_layers_D, "num_D": self.num_D})
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise SpecError(f"lr must be a finite number, 0 or more, got {self.lr}")
        if not (math.isfinite(self.lambda_l1) and self.lambda_l1 >= 0):
            raise SpecError(f"lambda_l1 must be a finite number, 0 or more, got {self.lambda_l1}")
        if self.niter_fix_global and self.model.netG != "local":
            raise SpecError("niter_fix_global trains only the local enhancer: it needs netG local")

    @property
    def run_folder(self) -> Path:
        return Path(self.checkpoints_dir) / self.name

    def options(self) -> dict[str, Any]:
        """Every option of the run under its original name: what ``opt.txt`` records."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("model", "data")}
        for part in (self.data, self.model):  # the model's values win where both hold one (label_nc, ...)
            values.update({f.name: getattr(part, f.name) for f in fields(part)
                           if f.name not in ("train", "read_images", "size_base", "seed")})
        values["isTrain"] = True
        return dict(sorted(values.items()))


# ----------------------------------------------------------------------------- opt.txt


OPT_TXT = "opt.txt"


def read_opt_txt(folder: str | Path) -> dict[str, str]:
    """The ``name: value`` lines of a run's ``opt.txt`` (written by train, here or in the original code)."""
    path = Path(folder) / OPT_TXT
    if not path.is_file():
        return {}
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise SpecError(f"{path} cannot be read ({exc.strerror or exc}); check its permissions") from None
    recorded = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() and not key.strip().startswith("-"):
            recorded[key.strip()] = value.strip()
    return recorded


def model_spec_from_opt_txt(folder: str | Path, **overrides: Any) -> ModelSpec:
    """The ModelSpec a run's ``opt.txt`` records (fields it lacks keep their defaults), with ``overrides``;
    a value that is not one the option takes is one sentence naming the file."""
    recorded = read_opt_txt(folder)
    values: dict[str, Any] = {}
    for f in fields(ModelSpec):
        if f.name not in recorded or f.name in overrides:
            continue
        text = recorded[f.name]
        try:
            values[f.name] = _parse_value(text, type(getattr(ModelSpec(), f.name)))
        except ValueError:
            raise SpecError(f"{Path(folder) / OPT_TXT} says {f.name}: {text!r}, which is not a valid value; "
                            f"fix the file or pass --{f.name}") from None
    try:
        return ModelSpec(**{**values, **overrides})
    except SpecError as exc:
        raise SpecError(f"{Path(folder) / OPT_TXT} does not describe a model pix2pixHD can build: {exc}") from None


def _parse_value(text: str, kind: type) -> Any:
    if kind is bool:
        if text not in ("True", "False"):
            raise InvalidArgumentError(text)
        return text == "True"
    return kind(text)


def recorded_options(values: Mapping[str, Any]) -> str:
    """``opt.txt``'s text for ``values``, in the original code's format."""
    lines = ["------------ Options -------------", *(f"{k}: {v}" for k, v in values.items()),
             "-------------- End ----------------"]
    return "\n".join(lines) + "\n"


# The ImageNet normalisation torchvision's segmentation networks expect (evaluate's --seg_mean/--seg_std).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class EvaluationSpec:
    """What ``fastp2phd.evaluate.evaluate`` computes: FID/KID (Inception weights), mIoU (a segmenter)."""

    fid: bool = True
    fid_weights: Path | None = None
    seg_model: Path | None = None
    seg_mean: tuple[float, float, float] = IMAGENET_MEAN
    seg_std: tuple[float, float, float] = IMAGENET_STD
    batch_size: int = 16
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    seed: int = 0

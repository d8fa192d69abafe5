"""Typed specifications: what each part of the library needs, built once from the options.

The command line (``fastp2phd.options``) parses the original pix2pixHD options and
turns them into these frozen dataclasses; everything below it takes a spec or explicit
arguments, never the parsed options. Field names are the original option names, so a
spec reads like a command line and a run's ``opt.txt`` maps onto it one to one. Each option is declared
once, here: a field made with ``option`` (``fastp2phd.option_fields``) holds its default, help, choices and
parser, and the command line's flags are built from those fields.
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
from .option_fields import (DATA_LOADING, EXPERIMENT, FEATURES, GENERATOR, LOGGING, SIZES, TRAINING, dataset_size,
                            epoch_label, non_negative_float, non_negative_int, option, positive_int, run_name)

NETG_CHOICES = ("global", "local")
NORM_CHOICES = ("instance", "batch")
RESIZE_OR_CROP_CHOICES = ("resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "resize", "none")
# What a run that trained on crops generates whole scenes with (test, encode-features, edit): the same scaling.
WHOLE_SCENE_MODES = {"resize_and_crop": "resize", "crop": "none", "scale_width_and_crop": "scale_width"}
AMP_DTYPE_CHOICES = ("auto", "bf16", "fp16")
COMPILE_CHOICES = ("off", "default", "reduce-overhead", "max-autotune")  # fastp2phd.compiling
COMPILE_HELP = ("run {what} through torch.compile: default, reduce-overhead (also CUDA graphs: one image size per "
                "run) or max-autotune; --compile alone means default; checkpoints are unchanged")


class SpecError(Pix2PixHDError, ValueError):
    """Options that cannot make a model, a dataset or a run; the message names the option."""


def declared_options() -> dict[str, dataclasses.Field]:
    """Every spec field that is an option, by name, in declaration order (TrainSpec's fields with its data's
    and model's in their place); a field a spec repeats (DataSpec's label_nc, ...) is declared once."""
    def walk(spec: type) -> Any:
        for f in fields(spec):
            if f.name in _PARTS:
                yield from walk(_PARTS[f.name])
            elif "option" in f.metadata:
                yield f
    return {f.name: f for f in walk(TrainSpec)}


def _check_options(spec: Any) -> None:
    """The values of ``spec``'s option fields are ones the option takes: a choice, a count of the right sign."""
    for f in fields(spec):
        declared = f.metadata.get("option")
        value = getattr(spec, f.name)
        if declared is None or (value is None and f.default is None):
            continue
        if declared.choices:
            _check_choice(f.name, value, declared.choices)
        minimum = {positive_int: 1, non_negative_int: 0}.get(declared.parse)
        if minimum is not None:
            _check_count(spec, (f.name,), minimum)


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

    label_nc: int = option(35, "number of input label classes (0: the input is an RGB image, folders _A/_B)", SIZES,
                           parse=non_negative_int)
    input_nc: int = option(3, "input image channels when --label_nc 0", SIZES, parse=positive_int)
    output_nc: int = option(3, "output image channels", SIZES, parse=positive_int)
    no_instance: bool = option(False, "no instance maps as input (no boundary map)", FEATURES)
    instance_feat: bool = option(False, "add encoded instance features to the input", FEATURES)
    label_feat: bool = option(False, "add encoded label features to the input", FEATURES)
    feat_num: int = option(3, "vector length of the encoded features", FEATURES, parse=positive_int)
    load_features: bool = option(False, "read precomputed feature maps from <phase>_feat", FEATURES)
    netG: str = option("global", "global (G1) or local (G2: G1 + local enhancers)", GENERATOR, choices=NETG_CHOICES)
    ngf: int = option(64, "generator filters in the first conv layer", GENERATOR, parse=positive_int)
    n_downsample_global: int = option(4, "downsampling layers in G1", GENERATOR, parse=non_negative_int)
    n_blocks_global: int = option(9, "residual blocks in G1", GENERATOR, parse=non_negative_int)
    n_blocks_local: int = option(3, "residual blocks in each local enhancer", GENERATOR, parse=non_negative_int)
    n_local_enhancers: int = option(1, "local enhancers with --netG local", GENERATOR, parse=positive_int)
    norm: str = option("instance", "instance or batch normalization", EXPERIMENT, choices=NORM_CHOICES)
    n_downsample_E: int = option(4, "downsampling layers in the encoder", FEATURES, parse=non_negative_int)
    nef: int = option(16, "encoder filters in the first conv layer", FEATURES, parse=positive_int)
    n_clusters: int = option(10, "K-means clusters per class", FEATURES, parse=positive_int)

    def __post_init__(self) -> None:
        _check_options(self)
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

    dataroot: str = option("./datasets/cityscapes/", "folder with <phase>_label, <phase>_inst, <phase>_img (or "
                           "'synthetic' for the built-in scenes)", DATA_LOADING)
    phase: str = option("train", "which folders to read: <phase>_label, ...", TRAINING)
    resize_or_crop: str = option("scale_width", "scaling and cropping of images at load time (resize: to loadSize x "
                                 "loadSize; none: round sizes to what G and E take)", DATA_LOADING,
                                 choices=RESIZE_OR_CROP_CHOICES)
    loadSize: int = option(1024, "scale images to this size", SIZES, parse=positive_int)
    fineSize: int = option(512, "then crop to this size", SIZES, parse=positive_int)
    no_flip: bool = option(False, "do not flip images for data augmentation", DATA_LOADING)
    max_dataset_size: float = option(math.inf, "use at most this many images of the dataset ('inf' for all)",
                                     DATA_LOADING, parse=dataset_size)
    synthetic_size: int | None = option(None, "with --dataroot synthetic: number of generated scenes (default 64 "
                                        "train, 16 test)", DATA_LOADING, parse=positive_int)
    train: bool = False  # a training set: random flips (unless no_flip)
    read_images: bool = False  # read the photos (<phase>_img): training, or encoding real images
    seed: int = 0  # crops, flips and synthetic scenes
    # The model's (DataSpec.for_model): its label classes, instance maps, features, and size multiple (what
    # resize_or_crop "none" rounds sizes to).
    label_nc: int = 35
    no_instance: bool = False
    load_features: bool = False
    size_base: int = 16
    # What a step of the model needs per pixel it processes (fastp2phd.memory; 0: the data's own bytes only) and
    # the memory of its device (0: this machine's): an image the step cannot hold is refused before it is decoded.
    step_bytes_per_pixel: int = 0
    step_device_memory: int = 0

    def __post_init__(self) -> None:
        _check_options(self)
        _check_count(self, ("size_base",), 1)
        _check_count(self, ("label_nc", "step_bytes_per_pixel", "step_device_memory"), 0)
        check_bounds({"label_nc": self.label_nc, "loadSize": self.loadSize, "fineSize": self.fineSize})
        if self.max_dataset_size < 0:
            raise SpecError(f"max_dataset_size must be 0 or more, got {self.max_dataset_size}")
        if self.fineSize > self.loadSize and "crop" in self.resize_or_crop:
            raise SpecError(f"fineSize {self.fineSize} is larger than loadSize {self.loadSize}: the crop cannot fit")

    @classmethod
    def for_model(cls, model: ModelSpec, **fields_: Any) -> "DataSpec":
        """The dataset ``model`` reads: its label classes, instance maps, features and size base."""
        # The loader reads input images (--label_nc 0) and photos as RGB, as the original does.
        if model.label_nc == 0 and model.input_nc != 3:
            raise SpecError(f"with label_nc 0 the input images are read as RGB, so input_nc must be 3, not "
                            f"{model.input_nc}")
        if fields_.get("read_images") and model.output_nc != 3:
            raise SpecError(f"the real photos are read as RGB, so output_nc must be 3 to train on them or encode "
                            f"them, not {model.output_nc}")
        # --resize_or_crop none rounds to G's multiple, as the original does; to E's where that is larger (there
        # the original's encoder returns another size and fails), so that 'none' gives what both networks take.
        return cls(label_nc=model.label_nc, no_instance=model.no_instance, load_features=model.load_features,
                   size_base=model.size_multiple, **fields_)


@dataclass(frozen=True)
class TrainSpec(_Spec):
    """A training run: the model, its data, the discriminators and losses, the schedule, and the outputs."""

    name: str = option("label2city", "name of the experiment: its checkpoints go to checkpoints_dir/name", EXPERIMENT,
                       parse=run_name)
    checkpoints_dir: str = option("./checkpoints", "where models, logs and web pages are saved", EXPERIMENT)
    which_epoch: str = option("latest", "which checkpoint to load: 'latest' or an epoch number", EXPERIMENT,
                              parse=epoch_label)
    batchSize: int = option(1, "input batch size (per process)", SIZES, parse=positive_int)
    data: DataSpec = field(default_factory=lambda: DataSpec(train=True, read_images=True))
    model: ModelSpec = field(default_factory=ModelSpec)
    fp16: bool = option(False, "mixed precision with torch.amp: bfloat16 where the device supports it, else float16 "
                        "with a grad scaler", EXPERIMENT)
    amp_dtype: str = option("auto", "with --fp16: the low-precision type (auto: bf16 where supported)", EXPERIMENT,
                            choices=AMP_DTYPE_CHOICES)
    seed: int = option(0, "seed for weights, data order, crops and sampling", EXPERIMENT)
    no_progress: bool = option(False, "no progress bars", EXPERIMENT)
    serial_batches: bool = option(False, "take images in order instead of shuffled", DATA_LOADING)
    nThreads: int = option(2, "data loading worker processes", DATA_LOADING, parse=non_negative_int)
    niter_fix_global: int = option(0, "epochs that train only the outermost local enhancer before fine-tuning all "
                                   "of G", GENERATOR, parse=non_negative_int)
    # the schedule, the discriminators and the losses
    niter: int = option(100, "epochs at the starting learning rate", TRAINING, parse=non_negative_int)
    niter_decay: int = option(100, "epochs of linear decay to zero", TRAINING, parse=non_negative_int)
    lr: float = option(0.0002, "initial learning rate for Adam", TRAINING)
    beta1: float = option(0.5, "Adam beta1", TRAINING)
    num_D: int = option(2, "number of discriminators (scales)", TRAINING, parse=positive_int)
    n_layers_D: int = option(3, "layers of each discriminator", TRAINING, parse=positive_int)
    ndf: int = option(64, "discriminator filters in the first conv layer", TRAINING, parse=positive_int)
    lambda_feat: float = option(10.0, "weight of the feature matching and VGG losses", TRAINING)
    no_ganFeat_loss: bool = option(False, "no discriminator feature matching loss", TRAINING)
    no_vgg_loss: bool = option(False, "no VGG perceptual loss", TRAINING)
    vgg_weights: str | None = option(None, "path to torchvision's vgg19-dcbb9e9d.pth (default: "
                                     "$FASTP2PHD_VGG19_WEIGHTS or torch's hub cache)", TRAINING)
    lambda_l1: float = option(0.0, "weight of an L1 loss between generated and real images; not in the original "
                              "pix2pixHD, off (0) by default (the demo uses it to learn in minutes)", TRAINING,
                              parse=non_negative_float)
    no_lsgan: bool = option(False, "vanilla GAN loss (binary cross entropy) instead of least squares", TRAINING)
    pool_size: int = option(0, "size of the pool of generated images shown to D", TRAINING, parse=non_negative_int)
    checkpoint_activations: bool = option(False, "recompute the full- and half-resolution activations of G, E and "
                                          "the VGG loss in backward instead of keeping them: the same training in "
                                          "far less memory, for about a quarter more time", TRAINING)
    compile: str = option("off", COMPILE_HELP.format(what="G, E, D and the VGG loss"), TRAINING,
                          choices=COMPILE_CHOICES, bare="default")  # (fastp2phd.compiling)
    channels_last: bool = option(False, "keep every network and image in channels_last (NHWC) layout, end to end: "
                                 "the layout of GPU tensor cores (with --fp16); checkpoints are unchanged", TRAINING)
    continue_train: bool = option(False, "resume from the checkpoint --which_epoch", TRAINING)
    load_pretrain: str = option("", "folder of a trained G1 (global generator) to start --netG local from "
                                "(coarse-to-fine)", TRAINING)
    # outputs
    display_freq: int = option(100, "save results to the web page every N images", LOGGING, parse=positive_int)
    print_freq: int = option(100, "print and log losses every N images", LOGGING, parse=positive_int)
    save_latest_freq: int = option(1000, "save the latest checkpoint every N images", LOGGING, parse=positive_int)
    save_epoch_freq: int = option(10, "save a checkpoint every N epochs", LOGGING, parse=positive_int)
    no_html: bool = option(False, "do not write the HTML page of results", LOGGING)
    tf_log: bool = option(False, "log to TensorBoard (needs the tensorboard package)", LOGGING)

    def __post_init__(self) -> None:
        _check_options(self)
        for name, check in (("name", run_name), ("which_epoch", epoch_label)):  # (paths of the files a run writes)
            try:
                check(getattr(self, name))
            except ValueError as exc:
                raise SpecError(f"{name} {exc}") from None
        check_bounds({"ndf": self.ndf, "n_layers_D": self.n_layers_D, "num_D": self.num_D})
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise SpecError(f"lr must be a finite number, 0 or more, got {self.lr}")
        if not (math.isfinite(self.lambda_l1) and self.lambda_l1 >= 0):
            raise SpecError(f"lambda_l1 must be a finite number, 0 or more, got {self.lambda_l1}")
        if self.niter_fix_global and self.model.netG != "local":
            raise SpecError("niter_fix_global trains only the local enhancer: it needs netG local")
        if self.niter + self.niter_decay == 0:
            raise SpecError("niter and niter_decay are both 0, so there is no epoch to train: give at least one")

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


_PARTS = {"data": DataSpec, "model": ModelSpec}  # (declared_options walks them)


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
    lines = text.splitlines()
    # train (here and in the original) ends it with an End line: without it, options it lost would read as defaults.
    if not lines or (lines[0].startswith(_OPT_TXT_FIRST) and not any(line.startswith(_OPT_TXT_LAST) for line in lines)):
        raise SpecError(f"{path} is {'empty' if not lines else 'cut short (it has no End line)'}, so the run's options "
                        "cannot be read from it; restore it from a copy, or remove it and pass the options the run was "
                        "trained with")
    recorded = {}
    for line in lines:
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


_OPT_TXT_FIRST, _OPT_TXT_LAST = "------------ Options", "-------------- End"


def recorded_options(values: Mapping[str, Any]) -> str:
    """``opt.txt``'s text for ``values``, in the original code's format."""
    lines = [f"{_OPT_TXT_FIRST} -------------", *(f"{k}: {v}" for k, v in values.items()),
             f"{_OPT_TXT_LAST} ----------------"]
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

"""Command-line options, with the original pix2pixHD names, defaults and meanings.

``add_base_options``, ``add_train_options`` and ``add_test_options`` fill an
argparse parser; ``finish_options`` derives what the rest of the code needs
(``isTrain``, the device, ``--debug`` settings) and rejects impossible
combinations with one sentence each.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from .errors import InvalidArgumentError
from .specs import (COMPILE_CHOICES, IMAGENET_MEAN, IMAGENET_STD, OPT_TXT, DataSpec, ModelSpec, SpecError, TrainSpec,
                    check_bounds, read_opt_txt)


def _number(text: str, kind, what: str, ok) -> int | float:
    """``text`` as a ``kind`` that passes ``ok``, or argparse's error: "must be a WHAT, got 'TEXT'"."""
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"must be a {what}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    return _number(text, int, "positive integer", lambda v: v > 0)


def _non_negative_int(text: str) -> int:
    return _number(text, int, "non-negative integer", lambda v: v >= 0)


def _non_negative_float(text: str) -> float:
    return _number(text, float, "finite number, 0 or more", lambda v: math.isfinite(v) and v >= 0)


def _size(text: str) -> float:
    return math.inf if text == "inf" else float(_number(text, int, "non-negative integer or 'inf'", lambda v: v >= 0))


# What `edit -h` shows of the base options; the rest (model options, from opt.txt) still parse.
_EDIT_OPTIONS = ("name", "checkpoints_dir", "which_epoch", "device", "dataroot", "seed")


def add_base_options(p: argparse.ArgumentParser, model_help: bool = True, from_run: bool = False) -> None:
    """The options every command that builds a model takes. ``from_run``: the command loads a trained run, so
    the network options (from its opt.txt) are listed as overrides. ``model_help=False``: list only the run's
    name, folder, epoch, device, data root and seed in ``-h`` (the model options come from opt.txt)."""
    first = len(p._actions)
    _add_base_options(p)
    if from_run:
        overrides = p.add_argument_group(
            "overrides of the run's opt.txt", "These come from the run's opt.txt (where it has none, from `train -h`'s "
            "defaults);\none given here replaces its value, and a checkpoint saved with another value does not load.")
        for group in p._action_groups[:-1]:
            moved = [action for action in group._group_actions if action.dest in NETWORK_OPTIONS]
            for action in moved:
                group._group_actions.remove(action)
                action.default_from_run = True  # (the formatter shows no default)
            overrides._group_actions.extend(moved)
    if not model_help:
        for action in p._actions[first:]:
            if action.dest not in _EDIT_OPTIONS:
                action.help = argparse.SUPPRESS


def _add_base_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment")
    g.add_argument("--name", default="label2city", help="name of the experiment: its checkpoints go to checkpoints_dir/name")
    g.add_argument("--checkpoints_dir", default="./checkpoints", help="where models, logs and web pages are saved")
    g.add_argument("--which_epoch", default="latest", help="which checkpoint to load: 'latest' or an epoch number")
    g.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda when available, else cpu); several GPUs: use torchrun")
    g.add_argument("--norm", default="instance", choices=["instance", "batch"], help="instance or batch normalization")
    g.add_argument("--fp16", action="store_true",
                   help="mixed precision with torch.amp: bfloat16 where the device supports it, else float16 with a grad scaler")
    g.add_argument("--amp_dtype", default="auto", choices=["auto", "bf16", "fp16"],
                   help="with --fp16: the low-precision type (auto: bf16 where supported)")
    g.add_argument("--seed", type=int, default=0, help="seed for weights, data order, crops and sampling")
    g.add_argument("--verbose", action="store_true", help="print the networks")
    g.add_argument("--no_progress", action="store_true", help="no progress bars")

    g = p.add_argument_group("input/output sizes")
    g.add_argument("--batchSize", type=_positive_int, default=1, help="input batch size (per process)")
    g.add_argument("--loadSize", type=_positive_int, default=1024, help="scale images to this size")
    g.add_argument("--fineSize", type=_positive_int, default=512, help="then crop to this size")
    g.add_argument("--label_nc", type=_non_negative_int, default=35,
                   help="number of input label classes (0: the input is an RGB image, folders _A/_B)")
    g.add_argument("--input_nc", type=_positive_int, default=3, help="input image channels when --label_nc 0")
    g.add_argument("--output_nc", type=_positive_int, default=3, help="output image channels")

    g = p.add_argument_group("data loading")
    g.add_argument("--dataroot", default="./datasets/cityscapes/",
                   help="folder with <phase>_label, <phase>_inst, <phase>_img (or 'synthetic' for the built-in scenes)")
    g.add_argument("--resize_or_crop", default="scale_width",
                   choices=["resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none"],
                   help="scaling and cropping of images at load time (none: round sizes to what the generator takes)")
    g.add_argument("--serial_batches", action="store_true", help="take images in order instead of shuffled")
    g.add_argument("--no_flip", action="store_true", help="do not flip images for data augmentation")
    g.add_argument("--nThreads", type=_non_negative_int, default=2, help="data loading worker processes")
    g.add_argument("--max_dataset_size", type=_size, default=math.inf,
                   help="use at most this many images of the dataset ('inf' for all)")
    g.add_argument("--synthetic_size", type=_positive_int, default=None,
                   help="with --dataroot synthetic: number of generated scenes (default 64 train, 16 test)")

    g = p.add_argument_group("generator")
    g.add_argument("--netG", default="global", choices=["global", "local"], help="global (G1) or local (G2: G1 + local enhancers)")
    g.add_argument("--ngf", type=_positive_int, default=64, help="generator filters in the first conv layer")
    g.add_argument("--n_downsample_global", type=_non_negative_int, default=4, help="downsampling layers in G1")
    g.add_argument("--n_blocks_global", type=_non_negative_int, default=9, help="residual blocks in G1")
    g.add_argument("--n_blocks_local", type=_non_negative_int, default=3, help="residual blocks in each local enhancer")
    g.add_argument("--n_local_enhancers", type=_positive_int, default=1, help="local enhancers with --netG local")
    g.add_argument("--niter_fix_global", type=_non_negative_int, default=0,
                   help="epochs that train only the outermost local enhancer before fine-tuning all of G")

    g = p.add_argument_group("instance-wise features")
    g.add_argument("--no_instance", action="store_true", help="no instance maps as input (no boundary map)")
    g.add_argument("--instance_feat", action="store_true", help="add encoded instance features to the input")
    g.add_argument("--label_feat", action="store_true", help="add encoded label features to the input")
    g.add_argument("--feat_num", type=_positive_int, default=3, help="vector length of the encoded features")
    g.add_argument("--load_features", action="store_true", help="read precomputed feature maps from <phase>_feat")
    g.add_argument("--n_downsample_E", type=_non_negative_int, default=4, help="downsampling layers in the encoder")
    g.add_argument("--nef", type=_positive_int, default=16, help="encoder filters in the first conv layer")
    g.add_argument("--n_clusters", type=_positive_int, default=10, help="K-means clusters per class")


def add_train_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--phase", default="train", help="which folders to read: <phase>_label, ...")
    g.add_argument("--niter", type=_non_negative_int, default=100, help="epochs at the starting learning rate")
    g.add_argument("--niter_decay", type=_non_negative_int, default=100, help="epochs of linear decay to zero")
    g.add_argument("--lr", type=float, default=0.0002, help="initial learning rate for Adam")
    g.add_argument("--beta1", type=float, default=0.5, help="Adam beta1")
    g.add_argument("--num_D", type=_positive_int, default=2, help="number of discriminators (scales)")
    g.add_argument("--n_layers_D", type=_positive_int, default=3, help="layers of each discriminator")
    g.add_argument("--ndf", type=_positive_int, default=64, help="discriminator filters in the first conv layer")
    g.add_argument("--lambda_feat", type=float, default=10.0, help="weight of the feature matching and VGG losses")
    g.add_argument("--no_ganFeat_loss", action="store_true", help="no discriminator feature matching loss")
    g.add_argument("--no_vgg_loss", action="store_true", help="no VGG perceptual loss")
    g.add_argument("--vgg_weights", default=None,
                   help="path to torchvision's vgg19-dcbb9e9d.pth (default: $FASTP2PHD_VGG19_WEIGHTS or torch's hub cache)")
    g.add_argument("--lambda_l1", type=_non_negative_float, default=0.0,
                   help="weight of an L1 loss between generated and real images; not in the original pix2pixHD, "
                        "off (0) by default (the demo uses it to learn in minutes)")
    g.add_argument("--no_lsgan", action="store_true", help="vanilla GAN loss (binary cross entropy) instead of least squares")
    g.add_argument("--pool_size", type=_non_negative_int, default=0, help="size of the pool of generated images shown to D")
    g.add_argument("--checkpoint_activations", action="store_true",
                   help="recompute the full- and half-resolution activations of G, E and the VGG loss in backward "
                        "instead of keeping them: the same training in far less memory, for about a quarter more time")
    add_compile_option(g, "G, E, D and the VGG loss")
    g.add_argument("--channels_last", action="store_true",
                   help="keep every network and image in channels_last (NHWC) layout, end to end: the layout of "
                        "GPU tensor cores (with --fp16); checkpoints are unchanged")
    g.add_argument("--continue_train", action="store_true", help="resume from the checkpoint --which_epoch")
    g.add_argument("--load_pretrain", default="",
                   help="folder of a trained G1 (global generator) to start --netG local from (coarse-to-fine)")

    g = p.add_argument_group("logging and saving")
    g.add_argument("--display_freq", type=_positive_int, default=100, help="save results to the web page every N images")
    g.add_argument("--print_freq", type=_positive_int, default=100, help="print and log losses every N images")
    g.add_argument("--save_latest_freq", type=_positive_int, default=1000, help="save the latest checkpoint every N images")
    g.add_argument("--save_epoch_freq", type=_positive_int, default=10, help="save a checkpoint every N epochs")
    g.add_argument("--no_html", action="store_true", help="do not write the HTML page of results")
    g.add_argument("--tf_log", action="store_true", help="log to TensorBoard (needs the tensorboard package)")
    g.add_argument("--debug", action="store_true", help="one epoch of at most 10 images, showing and printing every step")


def add_test_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("testing")
    g.add_argument("--phase", default="test", help="which folders to read: <phase>_label, ...")
    g.add_argument("--results_dir", default="./results/", help="where generated images and the web page go")
    g.add_argument("--how_many", type=_size, default=50, help="how many test images to run ('inf' for all)")
    g.add_argument("--use_encoded_image", action="store_true",
                   help="encode the real image (<phase>_img) for the features instead of sampling clusters")
    g.add_argument("--cluster_path", default=None,
                   help="clusters file in checkpoints_dir/name (default features_clustered_<n_clusters>.npz from "
                        "encode-features; an original features_clustered_010.npy needs --allow_pickle)")
    g.add_argument("--allow_pickle", action="store_true",
                   help="allow reading an original pickled features_clustered_*.npy (a pickle can run code: only for files you trust)")
    add_precision_option(g)
    add_compile_option(g, "G and E")
    g.add_argument("--optimize", action="store_true",
                   help="run G and E channels_last: the same images (to about 2e-5), up to 1.24x faster on the "
                        "CPU (see fastp2phd.optimize_for_inference)")


def add_compile_option(g, what: str) -> None:
    g.add_argument("--compile", nargs="?", const="default", default="off", choices=COMPILE_CHOICES,
                   help=f"run {what} through torch.compile: default, reduce-overhead (also CUDA graphs: one image "
                        "size per run) or max-autotune; --compile alone means default; checkpoints are unchanged")


def add_precision_option(g, default: str = "fp32") -> None:
    g.add_argument("--precision", default=default, choices=["auto", "fp32", "bf16", "fp16"],
                   help="inference precision: fp32, bf16 (autocast; fast on CPUs with AVX512-BF16 or AMX, see "
                        "`fastp2phd info`, and on GPUs), fp16 (autocast, CUDA only), or auto: bf16 where the device "
                        f"has native bfloat16, else fp32 (default: {default})")


def _rgb(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"must be three comma-separated numbers (R,G,B), got {text!r}")
    return values  # type: ignore[return-value]


def add_evaluate_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation")
    g.add_argument("--results", default=None,
                   help="folder of generated images (what `fastp2phd test` wrote: results_dir/name/<phase>_<epoch>); "
                        "without it, --name runs `test` first")
    g.add_argument("--out", default=None, help="where evaluation.json and evaluation.md go (None: the results folder)")
    g.add_argument("--no_fid", action="store_true", help="skip FID and KID")
    g.add_argument("--fid_weights", default=None,
                   help="the FID Inception weights pt_inception-2015-12-05-6726825d.pth (None: look in torch's hub "
                        "cache, <torch.hub.get_dir()>/checkpoints/); never downloaded")
    g.add_argument("--seg_model", default=None,
                   help="segmentation network for mIoU and pixel accuracy: TorchScript file or torch.export .pt2, "
                        "returning logits over the 19 Cityscapes train ids")
    g.add_argument("--seg_mean", type=_rgb, default=IMAGENET_MEAN,
                   help="R,G,B mean the segmentation network's input (RGB/255) is normalised with (ImageNet's)")
    g.add_argument("--seg_std", type=_rgb, default=IMAGENET_STD,
                   help="R,G,B standard deviation of that normalisation")
    g.add_argument("--fid_batch_size", type=_positive_int, default=16, help="images per Inception batch")
    g.add_argument("--kid_subsets", type=_positive_int, default=100, help="random subsets KID averages over")
    g.add_argument("--kid_subset_size", type=_positive_int, default=1000, help="images per KID subset (at most all)")


# Options that define the networks and their inputs: `test`, `encode-features`, `export-onnx` and
# `edit` take them from the run's opt.txt (written by `train`, and by the original code) unless
# given on the command line.
MODEL_OPTIONS = (
    "label_nc", "input_nc", "output_nc", "no_instance", "instance_feat", "label_feat", "feat_num", "load_features",
    "nef", "n_downsample_E", "n_clusters", "netG", "ngf", "n_downsample_global", "n_blocks_global",
    "n_local_enhancers", "n_blocks_local", "norm", "dataroot", "loadSize", "fineSize", "resize_or_crop",
)
# Those that define the networks: given to such a command, one replaces the run's value (with a warning).
NETWORK_OPTIONS = tuple(o for o in MODEL_OPTIONS if o not in ("dataroot", "loadSize", "fineSize", "resize_or_crop"))


def saved_model_options(parser: argparse.ArgumentParser, folder) -> dict:
    """The model options recorded in ``folder/opt.txt``, typed and checked by ``parser``'s actions;
    a value an option does not take is one sentence naming the file."""
    path = Path(folder) / OPT_TXT
    recorded = {k: v for k, v in read_opt_txt(folder).items() if k in MODEL_OPTIONS}
    options = {}
    for action in parser._actions:
        if action.dest not in recorded:
            continue
        text = recorded[action.dest]
        try:
            if isinstance(action, argparse._StoreTrueAction):
                if text not in ("True", "False"):
                    raise InvalidArgumentError(text)
                value = text == "True"
            elif text == "None":
                value = None
            else:
                value = action.type(text) if action.type else text
        except (ValueError, argparse.ArgumentTypeError):
            raise SpecError(f"{path} says {action.dest}: {text!r}, which --{action.dest} does not take; fix the file "
                            f"or pass --{action.dest}") from None
        if action.choices is not None and value not in action.choices:
            raise SpecError(f"{path} says {action.dest}: {text!r}, not one of {', '.join(map(str, action.choices))}; "
                            f"fix the file or pass --{action.dest}")
        options[action.dest] = value
    return options


def resolve_device(text: str | None) -> torch.device:
    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError as exc:
        raise SpecError(f"--device {text!r} is not a device; use cpu, cuda or cuda:N ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SpecError(f"--device {text} asks for CUDA but no CUDA device is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SpecError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA devices")
    return device


def finish_options(opt: argparse.Namespace, is_train: bool) -> argparse.Namespace:
    """Derive isTrain and apply --debug (the specs check the combinations)."""
    opt.isTrain = is_train
    for name, default in (("load_features", False), ("use_encoded_image", False), ("pool_size", 0)):
        if not hasattr(opt, name):
            setattr(opt, name, default)
    if is_train and opt.debug:
        opt.display_freq = opt.print_freq = 1
        opt.niter, opt.niter_decay = 1, 0
        opt.max_dataset_size = 10
    return opt


# ----------------------------------------------------------------------------- specs: the command line's edge


def model_spec(opt: argparse.Namespace) -> ModelSpec:
    return ModelSpec.from_options(opt)


def data_spec(opt: argparse.Namespace, *, train: bool, read_images: bool) -> DataSpec:
    """The dataset the options name; ``train``: flip at random (unless --no_flip); ``read_images``: read the photos."""
    return DataSpec.for_model(
        model_spec(opt), dataroot=str(opt.dataroot), phase=opt.phase, resize_or_crop=opt.resize_or_crop,
        loadSize=opt.loadSize, fineSize=opt.fineSize, no_flip=opt.no_flip, train=train, read_images=read_images,
        max_dataset_size=opt.max_dataset_size, synthetic_size=opt.synthetic_size, seed=opt.seed)


def train_spec(opt: argparse.Namespace) -> TrainSpec:
    return TrainSpec.from_options(opt, model=model_spec(opt), data=data_spec(opt, train=True, read_images=True))


# ----------------------------------------------------------------------------- the parser

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        if message.endswith(": expected one argument"):  # also what argparse says of a value that starts with '-'
            option = message.split(":")[0].split("/")[-1].removeprefix("argument ")
            message += f" (a value starting with '-' must be written as {option}=VALUE)"
        super().error(message)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The default after an option's help, once (none for flags, None, or a help that says its default), and
    examples kept as written."""

    def _get_help_string(self, action):
        if (action.default is None or action.default is False or "(default" in (action.help or "")
                or getattr(action, "default_from_run", False)):
            return action.help
        return super()._get_help_string(action)


def _port(text: str) -> int:
    return _number(text, int, "port number, 0 to 65535 (0: any free one)", lambda v: 0 <= v <= 65535)


def _add_command(commands, name: str, help: str, description: str, examples: str = "") -> argparse.ArgumentParser:
    return commands.add_parser(name, help=help, description=description, formatter_class=_HelpFormatter,
                               epilog=f"examples:\n{examples}" if examples else None)


def build_parser() -> argparse.ArgumentParser:
    from ._version import __version__

    parser = _Parser(prog="fastp2phd", description="pix2pixHD as a fast, faithful PyTorch library.",
                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"fastp2phd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)

    p = _add_command(commands, "train", "train pix2pixHD (options as in the original train.py)",
                     "Train pix2pixHD: G (and E) and the multiscale discriminators, with the original options.",
                     "  fastp2phd train --name label2city_512p --dataroot datasets/cityscapes\n"
                     "  fastp2phd train --name demo --dataroot synthetic --ngf 16 --niter 5 --niter_decay 5\n"
                     "  torchrun --nproc_per_node 8 -m fastp2phd train --name label2city_512p --fp16")
    add_base_options(p)
    add_train_options(p)

    p = _add_command(commands, "test", "generate images for a test set (options as in the original test.py)",
                     "Generate images for <dataroot>/<phase>_label with a trained run; the model options come from "
                     "the run's opt.txt.",
                     "  fastp2phd test --name label2city_512p --dataroot datasets/cityscapes --how_many inf")
    add_base_options(p, from_run=True)
    add_test_options(p)

    p = _add_command(commands, "evaluate", "score generated images: FID, KID, and mIoU with a segmentation network",
                     "Score a folder of generated images (what `test` wrote), or a run's test set after generating "
                     "it (--name), against <dataroot>/<phase>_img and <phase>_label: FID and KID with the FID "
                     "Inception (weights never downloaded), mIoU and pixel accuracy over the 19 Cityscapes train ids "
                     "with --seg_model. Writes evaluation.json and evaluation.md, which state the protocol.",
                     "  fastp2phd evaluate --results results/label2city_512p/test_latest --dataroot datasets/cityscapes "
                     "--seg_model drn_d_105_cityscapes.pt\n"
                     "  fastp2phd evaluate --name label2city_512p --dataroot datasets/cityscapes --no_fid "
                     "--seg_model drn.pt")
    add_base_options(p, model_help=False)
    add_test_options(p)
    add_evaluate_options(p)
    for action in p._actions:
        if action.dest == "name":
            action.help = "a run to generate the test images with first (as `test` does), instead of --results"
    p.set_defaults(name=None, how_many=math.inf)

    p = _add_command(commands, "memory", "estimate the peak memory of a training step (or of inference) for "
                                         "these train options, on any machine",
                     "Estimate the peak memory of one training step for the train options given (on fake tensors: "
                     "no GPU needed), and what is alive at the peak.",
                     "  fastp2phd memory --netG local --ngf 32 --instance_feat --resize_or_crop none --fp16\n"
                     "  fastp2phd memory --netG local --ngf 32 --resize_or_crop none --checkpoint_activations --json")
    add_base_options(p)
    add_train_options(p)
    g = p.add_argument_group("memory estimate")
    g.add_argument("--size", default=None,
                   help="HEIGHTxWIDTH of the images (default: what the options make of 2048x1024 Cityscapes images)")
    g.add_argument("--inference", action="store_true", help="estimate generating a batch (as test does) instead")
    g.add_argument("--json", action="store_true", help="print the estimate as JSON")
    g.add_argument("--measure", action="store_true",
                   help="also run the real step on the CUDA device and print torch.cuda.max_memory_allocated")

    p = _add_command(commands, "encode-features", "encode the training set's instances and cluster them per class",
                     "Encode every instance of <dataroot>/<phase>_img with a trained run's encoder and cluster the "
                     "features per class (K-means), for sampling styles at test time.",
                     "  fastp2phd encode-features --name label2city_512p_feat --dataroot datasets/cityscapes")
    add_base_options(p, from_run=True)
    p.add_argument("--phase", default="train", help="which folders to encode: <phase>_label, ...")
    p.add_argument("--area_threshold", type=_non_negative_float, default=0.5,
                   help="cluster only instances with more than this many pixels per H*W/32 (the original's 0.5; "
                        "lower it for small images, where people and poles are small)")

    p = _add_command(commands, "export-onnx", "export the generator to ONNX",
                     "Export a trained run's generator to ONNX (dynamic batch and size) and check it in onnxruntime.",
                     "  fastp2phd export-onnx --name label2city_512p")
    add_base_options(p, from_run=True)
    p.add_argument("--onnx", default=None, help="output file (default: checkpoints_dir/name/<which_epoch>_net_G.onnx)")

    p = _add_command(commands, "edit", "serve the interactive editor for a trained run on 127.0.0.1",
                     "Serve the interactive editor (change labels, paint, add objects, pick styles) for a trained run "
                     "on the scenes of <dataroot>/<phase>_label. The model options come from the run's opt.txt.",
                     "  fastp2phd edit --name demo --checkpoints_dir demo_output/checkpoints")
    add_base_options(p, model_help=False)
    g = p.add_argument_group("editor")
    g.add_argument("--phase", default="test", help="which scenes to edit: <phase>_label, <phase>_inst")
    g.add_argument("--port", type=_port, default=8765, help="port of the editor")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but 127.0.0.1 exposes the editor to your network")
    g.add_argument("--max_scenes", type=_positive_int, default=32, help="scenes offered in the scene picker")
    g.add_argument("--cluster_path", default=None, help="clusters file (default features_clustered_<n_clusters>.npz)")
    g.add_argument("--allow_pickle", action="store_true", help="allow an original pickled clusters .npy")
    add_precision_option(g, default="auto")  # an editor's latency is what its user feels
    g.add_argument("--no_optimize", action="store_true",
                   help="run the generator as built, without what `test --optimize` does (the editor does it by default)")

    p = _add_command(commands, "make-synthetic", "write the built-in synthetic street scenes as a Cityscapes-style "
                                                 "folder",
                     "Write rendered street scenes (labels, instance maps, photos) as a Cityscapes-style folder.",
                     "  fastp2phd make-synthetic --out datasets/synthetic --num_train 200")
    p.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    p.add_argument("--num_train", type=_non_negative_int, default=64, help="training scenes")
    p.add_argument("--num_test", type=_non_negative_int, default=16, help="test scenes")
    p.add_argument("--height", type=_positive_int, default=256, help="scene height in pixels (at least 16)")
    p.add_argument("--width", type=_positive_int, default=512, help="scene width in pixels (at least 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes")

    p = _add_command(commands, "demo", "train a small model on synthetic scenes, cluster styles, and write a web page",
                     "The whole workflow on built-in synthetic scenes: train for a fixed number of epochs (measured: "
                     "10 to 27 minutes on 2 busy CPU cores), cluster styles, generate held-out scenes, write a web "
                     "page, and compare the held-out L1 of the trained model with the untrained one and with "
                     "painting each class in its mean colour.",
                     "  fastp2phd demo --out demo_output\n"
                     "  fastp2phd demo --out demo_output --overwrite")
    p.add_argument("--out", default="demo_output", help="folder for the data, checkpoints and the page")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier demo in --out (without it, a folder that holds one is refused)")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and the model")
    p.add_argument("--no_progress", action="store_true",
                   help="no lines within an epoch (the line at the end of each epoch stays)")

    _add_command(commands, "info", "print versions, devices and which fast paths are available",
                 "Print versions, devices, and which fast paths run here and why not.")
    return parser


def parse_command_line(argv: list[str] | None) -> argparse.Namespace:
    """Parse, taking the model options of a trained run from its opt.txt unless given explicitly."""
    parser = build_parser()
    return with_run_options(parser, parser.parse_args(argv), argv)


def with_run_options(parser: argparse.ArgumentParser, args: argparse.Namespace,
                     argv: list[str] | None) -> argparse.Namespace:
    """``args`` (``parser``'s parse of ``argv``) with the model options of the run's opt.txt where no flag gives
    them, for the commands that load a run; refuses option values out of bounds, naming the file or the flag."""
    saved, opt_txt = {}, None
    sub = parser._subparsers._group_actions[0].choices[args.command]
    if args.command in ("test", "encode-features", "export-onnx", "edit") or (args.command == "evaluate" and args.name):
        opt_txt = Path(args.checkpoints_dir) / args.name / OPT_TXT
        saved = saved_model_options(sub, opt_txt.parent)
        if saved:
            sub.set_defaults(**saved)
            args = parser.parse_args(argv)
        for dest, value in saved.items():
            given = getattr(args, dest)
            if dest in NETWORK_OPTIONS and given != value:  # (a flag can only be switched on)
                flag = f"--{dest}" if isinstance(given, bool) else f"--{dest} {given}"
                print(f"fastp2phd {args.command}: warning: {flag} overrides the run's opt.txt ({dest} {value})",
                      file=sys.stderr)

    def where(name: str) -> str:  # a value opt.txt recorded and no flag changed is the file's
        if name in saved and saved[name] == getattr(args, name):
            return str(opt_txt)
        return f"--{name}" if getattr(args, name) != sub.get_default(name) else f"the default {name}"

    check_bounds(vars(args), where)
    return args

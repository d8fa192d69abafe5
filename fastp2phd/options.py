"""Command-line options, with the original pix2pixHD names, defaults and meanings.

Every option a spec holds is declared once, as its field (``fastp2phd.specs``, made with ``option``:
default, help, section, choices, parser); ``add_spec_option`` builds its flag from that field, and
``add_base_options``, ``add_train_options`` and ``add_test_options`` fill an argparse parser's sections
with them. Declared here are only the flags of the command line alone (--device, --verbose, --how_many,
...) and what one command changes on purpose (test's --phase test). ``finish_options`` derives what the
rest of the code needs (``isTrain``, ``--debug`` settings); the specs reject impossible combinations
with one sentence each.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import sys
from pathlib import Path

import torch

from .errors import InvalidArgumentError
from .option_fields import (DATA_LOADING, EXPERIMENT, FEATURES, GENERATOR, LOGGING, SIZES, TRAINING, dataset_size,
                            non_negative_float, non_negative_int, port, positive_int)
from .original_flags import add_original_flags, apply_original_flags
from .specs import (COMPILE_HELP, IMAGENET_MEAN, IMAGENET_STD, OPT_TXT, WHOLE_SCENE_MODES, DataSpec, ModelSpec,
                    SpecError, TrainSpec, check_bounds, declared_options, read_opt_txt)


def _cli_type(parse):
    """A spec option's parser as argparse's ``type``: its ValueError becomes argparse's one line
    "argument --NAME: must be ..." (int and float keep argparse's own "invalid int value: ...")."""
    if parse in (None, int, float):
        return parse
    if parse not in _CLI_TYPES:
        @functools.wraps(parse)
        def read(text: str):
            try:
                return parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None
        _CLI_TYPES[parse] = read
    return _CLI_TYPES[parse]


_CLI_TYPES: dict = {}
_positive_int, _non_negative_int = _cli_type(positive_int), _cli_type(non_negative_int)
_non_negative_float, _size, _port = _cli_type(non_negative_float), _cli_type(dataset_size), _cli_type(port)

# The options the specs declare (fastp2phd.specs, fields made with ``option``), by name.
SPEC_OPTIONS = declared_options()


def add_spec_option(g, name: str, **changes) -> argparse.Action:
    """--NAME as its spec field declares it: default, help, choices, parser (a bool: a switch). ``changes``:
    what one command changes on purpose (test's phase 'test', a help that names what the command does)."""
    f = SPEC_OPTIONS[name]
    declared = f.metadata["option"]
    if isinstance(f.default, bool):
        kwargs = dict(action="store_true", help=declared.help)
    else:
        kwargs = dict(default=f.default, type=_cli_type(declared.parse), choices=declared.choices, help=declared.help)
        if declared.bare is not None:
            kwargs.update(nargs="?", const=declared.bare)
    action = g.add_argument(f"--{name}", **{**kwargs, **changes})
    action.spec_field = f  # (tests/test_options_match_specs.py: the flag comes from the declaration)
    return action


def _add_spec_groups(p: argparse.ArgumentParser, titles: tuple[str, ...], after=None) -> None:
    """A section of ``-h`` per title, holding the spec options declared in it, in their order;
    ``after[name](group)`` adds command-line-only flags after --name."""
    for title in titles:
        group = p.add_argument_group(title)
        for name in (name for name, f in SPEC_OPTIONS.items() if f.metadata["option"].group == title):
            add_spec_option(group, name)
            if after and name in after:
                after[name](group)


# What `edit -h` shows of the base options; the rest (model options, from opt.txt) still parse.
_EDIT_OPTIONS = ("name", "checkpoints_dir", "which_epoch", "device", "dataroot", "seed")


def add_base_options(p: argparse.ArgumentParser, model_help: bool = True, from_run: bool = False) -> None:
    """The options every command that builds a model takes. ``from_run``: the command loads a trained run, so
    the network options (from its opt.txt) are listed as overrides. ``model_help=False``: list only the run's
    name, folder, epoch, device, data root and seed in ``-h`` (the model options come from opt.txt)."""
    first = len(p._actions)
    _add_spec_groups(p, (EXPERIMENT, SIZES, DATA_LOADING, GENERATOR, FEATURES), after={
        "which_epoch": lambda g: g.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda "
                                                "when available, else cpu); several GPUs: use torchrun"),
        "seed": lambda g: g.add_argument("--verbose", action="store_true", help="print the networks")})
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
    add_original_flags(p, shown=model_help)
    if not model_help:
        for action in p._actions[first:]:
            if action.dest not in _EDIT_OPTIONS:
                action.help = argparse.SUPPRESS


def add_train_options(p: argparse.ArgumentParser) -> None:
    _add_spec_groups(p, (TRAINING, LOGGING), after={"tf_log": lambda g: g.add_argument(
        "--debug", action="store_true", help="one epoch of at most 10 images, showing and printing every step")})


def add_test_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("testing")
    add_spec_option(g, "phase", default="test")
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
    add_spec_option(g, "compile", help=COMPILE_HELP.format(what="G and E"))
    g.add_argument("--optimize", action="store_true",
                   help="run G and E as fastp2phd.optimize_for_inference makes them: the same images (to about 2e-5), "
                        "1.25-1.57x faster in fp32 on a 2-core AVX-512 EPYC; add --compile for the fastest (compiled "
                        "with the weights frozen in: 1.05-1.38x more in bf16 there)")


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


# The options that define the networks (ModelSpec's): given to `test`, `encode-features`, `export-onnx` or `edit`,
# one replaces the value of the run's opt.txt (written by `train`, and by the original code), with a warning.
NETWORK_OPTIONS = tuple(f.name for f in dataclasses.fields(ModelSpec))
# Those commands take these and the run's data options from its opt.txt unless given on the command line.
MODEL_OPTIONS = (*NETWORK_OPTIONS, "dataroot", "loadSize", "fineSize", "resize_or_crop")


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
    add_precision_option(g)  # (test's; a training step's is --fp16)
    g.add_argument("--json", action="store_true", help="print the estimate as JSON")
    g.add_argument("--measure", action="store_true",
                   help="also run the real step on the CUDA device and print torch.cuda.max_memory_allocated")

    p = _add_command(commands, "encode-features", "encode the training set's instances and cluster them per class",
                     "Encode every instance of <dataroot>/<phase>_img with a trained run's encoder and cluster the "
                     "features per class (K-means), for sampling styles at test time.",
                     "  fastp2phd encode-features --name label2city_512p_feat --dataroot datasets/cityscapes")
    add_base_options(p, from_run=True)
    add_spec_option(p, "phase", help="which folders to encode: <phase>_label, ...")
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
    add_spec_option(g, "phase", default="test", help="which scenes to edit: <phase>_label, <phase>_inst")
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
    add_spec_option(p, "seed", help="seed of the scenes")

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
    add_spec_option(p, "seed", help="seed of the scenes and the model")
    add_spec_option(p, "no_progress", help="no lines within an epoch (the line at the end of each epoch stays)")

    _add_command(commands, "info", "print versions, devices and which fast paths are available",
                 "Print versions, devices, and which fast paths run here and why not.")
    return parser


def _given(parser: argparse.ArgumentParser, sub: argparse.ArgumentParser, argv: list[str] | None, dest: str) -> bool:
    """Whether ``argv`` sets ``dest`` (under any abbreviation argparse takes)."""
    unset, default = object(), sub.get_default(dest)
    sub.set_defaults(**{dest: unset})
    try:
        return getattr(parser.parse_args(argv), dest) is not unset
    finally:
        sub.set_defaults(**{dest: default})


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
        cropped = saved.get("resize_or_crop")
        if (cropped in WHOLE_SCENE_MODES and args.command != "export-onnx"
                and not _given(parser, sub, argv, "resize_or_crop")):
            saved["resize_or_crop"] = whole = WHOLE_SCENE_MODES[cropped]  # the original's test.py crops when told to
            print(f"fastp2phd {args.command}: the run trained on crops (--resize_or_crop {cropped}); whole scenes are "
                  f"read with --resize_or_crop {whole} (pass --resize_or_crop to choose)", file=sys.stderr)
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
    return apply_original_flags(args)

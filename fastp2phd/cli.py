"""The ``fastp2phd`` command line (also ``python -m fastp2phd``).

Subcommands keep the original pix2pixHD scripts' option names:
``train`` (train.py), ``test`` (test.py), ``encode-features`` (encode_features.py
plus the clustering), ``export-onnx``, ``make-synthetic``, ``demo``, ``info``, and ``memory``
(the peak memory a training step of these options needs).
Several processes: ``torchrun --nproc_per_node N -m fastp2phd train ...``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .options import (add_base_options, add_test_options, add_train_options, finish_options, resolve_device,
                      saved_model_options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastp2phd", description="pix2pixHD as a fast PyTorch library")
    commands = parser.add_subparsers(dest="command", metavar="command", required=True)

    p = commands.add_parser("train", help="train pix2pixHD (options as in the original train.py)")
    add_base_options(p)
    add_train_options(p)

    p = commands.add_parser("test", help="generate images for a test set (options as in the original test.py)")
    add_base_options(p)
    add_test_options(p)

    p = commands.add_parser("memory", help="estimate the peak memory of a training step (or of inference) for "
                                           "these train options, on any machine")
    add_base_options(p)
    add_train_options(p)
    g = p.add_argument_group("memory estimate")
    g.add_argument("--size", default=None,
                   help="HEIGHTxWIDTH of the images (default: what the options make of 2048x1024 Cityscapes images)")
    g.add_argument("--inference", action="store_true", help="estimate generating a batch (as test does) instead")
    g.add_argument("--json", action="store_true", help="print the estimate as JSON")
    g.add_argument("--measure", action="store_true",
                   help="also run the real step on the CUDA device and print torch.cuda.max_memory_allocated")

    p = commands.add_parser("encode-features", help="encode the training set's instances and cluster them per class")
    add_base_options(p)
    p.add_argument("--phase", default="train", help="which folders to encode: <phase>_label, ...")

    p = commands.add_parser("export-onnx", help="export the generator to ONNX")
    add_base_options(p)
    p.add_argument("--onnx", default=None, help="output file (default: checkpoints_dir/name/<which_epoch>_net_G.onnx)")

    p = commands.add_parser("edit", help="serve the interactive editor for a trained model on 127.0.0.1")
    add_base_options(p)
    p.add_argument("--phase", default="test", help="which scenes to edit: <phase>_label, <phase>_inst")
    p.add_argument("--port", type=int, default=8765, help="port of the editor")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but 127.0.0.1 exposes the editor to your network")
    p.add_argument("--max_scenes", type=int, default=32, help="scenes offered in the scene picker")
    p.add_argument("--cluster_path", default=None, help="clusters file (default features_clustered_<n_clusters>.npz)")
    p.add_argument("--allow_pickle", action="store_true", help="allow an original pickled clusters .npy")

    p = commands.add_parser("make-synthetic", help="write the built-in synthetic street scenes as a Cityscapes-style folder")
    p.add_argument("--out", required=True, help="folder to create (must not exist or be empty)")
    p.add_argument("--num_train", type=int, default=64, help="training scenes")
    p.add_argument("--num_test", type=int, default=16, help="test scenes")
    p.add_argument("--height", type=int, default=256, help="scene height in pixels")
    p.add_argument("--width", type=int, default=512, help="scene width in pixels")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes")

    p = commands.add_parser("demo", help="train a small model on synthetic scenes, cluster styles, and write a web page")
    p.add_argument("--out", default="demo_output", help="folder for the data, checkpoints and the page")
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--minutes", type=float, default=5.0, help="training time budget")
    p.add_argument("--seed", type=int, default=0, help="seed of the scenes and the model")

    commands.add_parser("info", help="print versions, devices and which fast paths are available")
    return parser


def parse(argv: list[str] | None) -> argparse.Namespace:
    """Parse, taking the model options of a trained run from its opt.txt unless given explicitly."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("test", "encode-features", "export-onnx", "edit"):
        sub = parser._subparsers._group_actions[0].choices[args.command]
        saved = saved_model_options(sub, Path(args.checkpoints_dir) / args.name)
        if saved:
            sub.set_defaults(**saved)
            args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    command = args.command
    if command == "info":
        from .diagnostics import info

        info()
        return 0
    if command == "make-synthetic":
        from .data import DatasetError, make_synthetic

        try:
            out = make_synthetic(args.out, num_train=args.num_train, num_test=args.num_test,
                                 height=args.height, width=args.width, seed=args.seed)
        except (DatasetError, FileExistsError) as exc:
            print(f"fastp2phd make-synthetic: {exc}", file=sys.stderr)
            return 1
        print(f"wrote {args.num_train} training and {args.num_test} test scenes to {out}")
        return 0
    if command == "demo":
        from .demo import run_demo

        return run_demo(Path(args.out), resolve_device(args.device), minutes=args.minutes, seed=args.seed)

    opt = finish_options(args, is_train=command in ("train", "memory"))
    if command == "memory":  # models a device; needs none
        from .memory import main_memory

        return main_memory(opt, args)
    device = resolve_device(opt.device)
    if command == "edit":
        from .editing.server import main_edit

        return main_edit(opt, device)
    if command == "train":
        from .training import main_train

        return main_train(opt, device)

    from .inference import InferenceError

    try:
        if command == "test":
            from .inference import run_test

            print(f"results: {run_test(opt, device)}")
        elif command == "encode-features":
            from .encode_features import encode_features

            print(f"clusters: {encode_features(opt, device)}")
        elif command == "export-onnx":
            from .inference import export_onnx

            path, difference = export_onnx(opt, args.onnx)
            checked = ("not checked (install onnxruntime to check it)" if difference is None
                       else f"largest difference from PyTorch {difference:.2e}")
            print(f"exported {path}; {checked}")
    except (InferenceError, ValueError, FileNotFoundError) as exc:
        print(f"fastp2phd {command}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

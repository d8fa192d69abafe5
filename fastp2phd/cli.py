"""The ``fastp2phd`` command line (also ``python -m fastp2phd``).

Subcommands keep the original pix2pixHD scripts' option names:
``train`` (train.py), ``test`` (test.py), ``encode-features`` (encode_features.py
plus the clustering), ``export-onnx``, ``make-synthetic``, ``demo``, ``info``, ``edit``,
``evaluate`` (FID, KID, mIoU) and ``memory`` (the peak memory a training step of these options needs).
Several processes: ``torchrun --nproc_per_node N -m fastp2phd train ...``.

This is the edge where options become specs (``fastp2phd.options``); every failure a user
can fix (a ``Pix2PixHDError``) ends here in one sentence and exit status 1.
"""
from __future__ import annotations

import argparse
import difflib
import os
import sys
import warnings
from pathlib import Path

from .cpu_allocator import keep_freed_memory
from .errors import Pix2PixHDError
from .options import (build_parser, data_spec, finish_options, model_spec, parse_command_line,
                      resolve_device, train_spec, with_run_options)
from .specs import OPT_TXT, EvaluationSpec

parse = parse_command_line  # (the name earlier versions had)


def main(argv: list[str] | None = None) -> int:
    command = "fastp2phd"
    format_warning = warnings.formatwarning
    # The library's warnings are sentences for the user: on the command line, without file and line.
    warnings.formatwarning = lambda message, category, *_, **__: f"{command}: warning: {message}\n"
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # argparse blames the top level, with its usage: the command's is the one that helps
            _refuse_unknown(parser._subparsers._group_actions[0].choices[args.command], unknown)
        command = f"fastp2phd {args.command}"  # (before opt.txt is read: its problems are the command's)
        processes = int(os.environ.get("WORLD_SIZE", "1"))
        if processes > 1 and args.command != "train":  # N copies would race on the same output files
            if os.environ.get("RANK", "0") == "0":  # (one sentence, not one from each process)
                print(f"{command}: it runs in one process, and torchrun started {processes}: run it without torchrun "
                      "(only train uses several processes)", file=sys.stderr)
            return 1
        args = with_run_options(parser, args, argv)
        keep_freed_memory()  # large CPU tensors stop page-faulting on every call (fastp2phd.cpu_allocator)
        return _run(args)
    except Pix2PixHDError as exc:  # every error a user can fix; anything else is a bug, and keeps its traceback
        print(f"{command}: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file or folder the system refused (permissions, a read-only or missing place)
        if exc.filename is None:
            raise
        print(f"{command}: cannot use {exc.filename}: {exc.strerror or exc}; check the path and its permissions",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl-C: a sentence, not a traceback (saves are atomic: none is left half written)
        resume = "; its last save is intact: add --continue_train to go on from there" if command.endswith("train") else ""
        print(f"\n{command}: interrupted{resume}", file=sys.stderr)
        return 130
    finally:
        warnings.formatwarning = format_warning


def _refuse_unknown(command: argparse.ArgumentParser, unknown: list[str]) -> None:
    """Exit (status 2) with the command's usage, and the option each mistyped one is likely meant to be."""
    known = [flag for action in command._actions for flag in action.option_strings]
    said = []
    for arg in unknown:
        close = difflib.get_close_matches(arg.split("=")[0], known, 1, cutoff=0.8) if arg.startswith("-") else []
        said.append(f"{arg} (did you mean {close[0]}?)" if close else arg)
    command.error(f"unrecognized arguments: {' '.join(said)}")


def _run(args: argparse.Namespace) -> int:
    return COMMANDS[args.command](args)


def _info(args: argparse.Namespace) -> int:
    from .diagnostics import info

    info()
    return 0


def _make_synthetic(args: argparse.Namespace) -> int:
    from .data import make_synthetic

    out = make_synthetic(args.out, num_train=args.num_train, num_test=args.num_test,
                         height=args.height, width=args.width, seed=args.seed)
    print(f"wrote {args.num_train} training and {args.num_test} test scenes to {out}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out), resolve_device(args.device), seed=args.seed, overwrite=args.overwrite,
                    progress=not args.no_progress)


def _evaluate(args: argparse.Namespace) -> int:
    from .evaluate import EvaluationError, check_evaluation, evaluate_folder, markdown_report

    if bool(args.results) == bool(args.name):
        raise EvaluationError("pass either --results (a folder of generated images) or --name (a run to generate "
                              "them with first), not both" if args.results else "nothing to evaluate: pass --results "
                              "DIR (a folder `fastp2phd test` wrote) or --name RUN (to generate the images first)")
    spec = EvaluationSpec(fid=not args.no_fid, fid_weights=args.fid_weights,
                          seg_model=Path(args.seg_model) if args.seg_model else None, seg_mean=args.seg_mean,
                          seg_std=args.seg_std, batch_size=args.fid_batch_size, kid_subsets=args.kid_subsets,
                          kid_subset_size=max(2, args.kid_subset_size), seed=args.seed)
    check_evaluation(spec, args.dataroot, args.phase, Path(args.results) if args.results else None)
    if args.results:
        results = Path(args.results)
    else:  # --name: generate with the code `test` runs, then score what it wrote
        _test(argparse.Namespace(**vars(args)))
        results = Path(args.results_dir) / args.name / f"{args.phase}_{args.which_epoch}"
    report, json_path, md_path = evaluate_folder(results, args.dataroot, args.phase, spec,
                                                 resolve_device(args.device), how_many=args.how_many, out=args.out,
                                                 progress=not args.no_progress)
    print(markdown_report(report, title=f"Evaluation of {results}"), end="")
    print(f"wrote {json_path} and {md_path}")
    return 0


def _memory(args: argparse.Namespace) -> int:  # models a device; needs none
    from .memory_command import main_memory

    opt = finish_options(args, is_train=True)
    device_type = "cpu" if (opt.device or "cuda").startswith("cpu") else "cuda"
    return main_memory(train_spec(opt), size=args.size, inference=args.inference, as_json=args.json,
                       measure=args.measure, device_type=device_type, precision=args.precision)


def _train(args: argparse.Namespace) -> int:
    from .training import main_train

    opt = finish_options(args, is_train=True)
    return main_train(train_spec(opt), resolve_device(opt.device))


def _load_run(opt: argparse.Namespace):
    """The run the inference commands work on (``--checkpoints_dir/--name``), and its folder."""
    from .inference import load_run

    run_folder = Path(opt.checkpoints_dir) / opt.name
    opt_txt = run_folder / OPT_TXT
    model = load_run(run_folder, opt.which_epoch, resolve_device(opt.device), model=model_spec(opt),
                     cluster_path=getattr(opt, "cluster_path", None), allow_pickle=getattr(opt, "allow_pickle", False),
                     precision=_precision(opt), compile=getattr(opt, "compile", "off"),
                     optimize=_optimize(opt), read_clusters=opt.command != "encode-features",
                     source=f"{opt_txt} (with the flags given)" if opt_txt.is_file() else "the flags given")
    return model, run_folder


def _precision(opt: argparse.Namespace) -> str:
    from .pix2pixhd import fastest_precision

    precision = getattr(opt, "precision", "fp32")
    return fastest_precision(resolve_device(opt.device)) if precision == "auto" else precision


def _optimize(opt: argparse.Namespace) -> bool:
    """test optimizes with --optimize; the editor unless --no_optimize (its latency is what the user feels)."""
    if hasattr(opt, "no_optimize"):
        return not opt.no_optimize
    return getattr(opt, "optimize", False)


def _test(args: argparse.Namespace) -> int:
    from .inference import run_test

    opt = finish_options(args, is_train=False)
    model, _ = _load_run(opt)
    web_dir = Path(opt.results_dir) / opt.name / f"{opt.phase}_{opt.which_epoch}"
    page = run_test(model, data_spec(opt, train=False, read_images=opt.use_encoded_image), web_dir,
                    title=f"Experiment = {opt.name}, Phase = {opt.phase}, Epoch = {opt.which_epoch}",
                    how_many=opt.how_many, use_encoded_image=opt.use_encoded_image, seed=opt.seed,
                    progress=not opt.no_progress)
    print(f"results: {page}")
    return 0


def _encode_features(args: argparse.Namespace) -> int:
    from .encode_features import encode_features

    opt = finish_options(args, is_train=False)
    model, run_folder = _load_run(opt)
    path = encode_features(model, data_spec(opt, train=False, read_images=True), run_folder,
                           batch_size=opt.batchSize, num_workers=opt.nThreads, seed=opt.seed,
                           progress=not opt.no_progress, area_threshold=args.area_threshold)
    print(f"clusters: {path}")
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from .inference import export_onnx

    opt = finish_options(args, is_train=False)
    model, run_folder = _load_run(opt)
    path, difference = export_onnx(model, args.onnx or run_folder / f"{opt.which_epoch}_net_G.onnx")
    checked = ("not checked (install onnxruntime to check it)" if difference is None
               else f"largest difference from PyTorch {difference:.2e}")
    print(f"exported {path}; {checked}")
    return 0


def _edit(args: argparse.Namespace) -> int:
    from .editing.server import main_edit

    opt = finish_options(args, is_train=False)
    model, run_folder = _load_run(opt)
    return main_edit(model, data_spec(opt, train=False, read_images=False), name=opt.name, run_folder=run_folder,
                     host=opt.host, port=opt.port, max_scenes=opt.max_scenes, seed=opt.seed,
                     which_epoch=opt.which_epoch)


# One function per subcommand (a new command is a function here and its parser in fastp2phd.options).
COMMANDS = {
    "info": _info, "make-synthetic": _make_synthetic, "demo": _demo, "evaluate": _evaluate, "memory": _memory,
    "train": _train, "test": _test, "encode-features": _encode_features, "export-onnx": _export_onnx, "edit": _edit,
}


if __name__ == "__main__":
    sys.exit(main())

"""The original code's command-line flags that fastp2phd spells otherwise, or that change nothing there either:
taken so that its scripts run unchanged (``--gpu_ids``, ``--data_type``, ``--model``, ``--use_dropout`` ...)."""
from __future__ import annotations

import argparse
import sys

import torch

from .specs import SpecError


def add_original_flags(p: argparse.ArgumentParser, shown: bool) -> None:
    """The original's flags that fastp2phd spells otherwise or that change nothing there either, so that its
    scripts run: ``apply_original_flags`` translates them."""
    g = p.add_argument_group("the original code's flags", "Accepted so that its scripts run unchanged.") if shown else p
    g.add_argument("--gpu_ids", default=None, help="-1: the CPU; one id N: cuda:N (as --device); several GPUs train "
                   "with torchrun --nproc_per_node N, one GPU each")
    g.add_argument("--data_type", type=int, default=32, choices=[8, 16, 32],
                   help="32: float32; 16: --precision fp16 where a command has --precision (train: use --fp16)")
    g.add_argument("--model", dest="original_model", default="pix2pixHD", choices=["pix2pixHD"],
                   help="the only model there is")  # (TrainSpec.model is the ModelSpec)
    g.add_argument("--use_dropout", action="store_true", help="no effect, as in the original (its generators are "
                   "built without dropout whatever it says)")
    # No effect there either: the visdom window's size, the rank (torchrun sets LOCAL_RANK), test.py's unused two.
    for flag, type_ in (("--display_winsize", int), ("--local_rank", int), ("--ntest", float), ("--aspect_ratio", float)):
        g.add_argument(flag, type=type_, help=argparse.SUPPRESS)


def apply_original_flags(args: argparse.Namespace) -> argparse.Namespace:
    """``--gpu_ids`` and ``--data_type`` as fastp2phd's ``--device`` and ``--precision`` (see ``_add_original_flags``)."""
    if getattr(args, "gpu_ids", None) is not None:
        ids = [i.strip() for i in args.gpu_ids.split(",") if i.strip()]
        if not ids or not all(i.lstrip("-").isdigit() for i in ids):
            raise SpecError(f"--gpu_ids {args.gpu_ids!r} is not a list of GPU ids; use -1 for the CPU or one id such as 0")
        if len(ids) > 1:
            raise SpecError(f"--gpu_ids {args.gpu_ids}: each process here runs on one device; train on several GPUs "
                            f"with torchrun --nproc_per_node {len(ids)} -m fastp2phd train ... (and no --gpu_ids)")
        device = "cpu" if int(ids[0]) < 0 else f"cuda:{ids[0]}"
        if args.device is not None and torch.device(args.device) != torch.device(device):
            raise SpecError(f"--gpu_ids {args.gpu_ids} and --device {args.device} disagree; give one of them")
        args.device = device
    if getattr(args, "fp16", False) and args.command not in ("train", "memory"):
        runs = (f"inference runs in --precision {args.precision} (use --precision bf16 or fp16)"
                if hasattr(args, "precision") else "it changes nothing here")
        print(f"fastp2phd {args.command}: note: --fp16 is a training option; {runs}", file=sys.stderr)
    data_type = getattr(args, "data_type", 32)
    if data_type != 32:
        training = args.command == "train" or not getattr(args, "inference", True)  # (memory of a training step)
        if data_type == 16 and hasattr(args, "precision") and not training:
            args.precision = "fp16"
        else:
            hint = ("train in mixed precision with --fp16" if training else
                    "use --precision bf16 or fp16" if hasattr(args, "precision") else f"{args.command} runs in float32")
            raise SpecError(f"--data_type {data_type} has no counterpart here: {hint}")
    return args

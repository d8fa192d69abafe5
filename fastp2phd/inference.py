"""Generating images from label maps with a trained (or original) pix2pixHD checkpoint."""
from __future__ import annotations

import argparse
import logging
import math
import os
import warnings
from pathlib import Path

import torch

from .console import progress_bar
from .errors import Pix2PixHDError
from .models.checkpoint import CheckpointMismatchError, read_state_dict
from .pix2pixhd import Pix2PixHD, uses_features
from .visualize import HTMLPage, label_to_image, tensor_to_image


class InferenceError(Pix2PixHDError, RuntimeError):
    """Inference cannot run (missing checkpoint or clusters, bad data); the message says why."""


def load_model(opt: argparse.Namespace, device: torch.device) -> Pix2PixHD:
    """A Pix2PixHD in eval mode with ``<which_epoch>_net_G.pth`` (and E, and clusters when needed) loaded."""
    model = Pix2PixHD(opt)
    folder = Path(opt.checkpoints_dir) / opt.name
    load_network_file(model.netG, folder / f"{opt.which_epoch}_net_G.pth")
    if model.netE is not None and getattr(opt, "use_encoded_image", False):
        load_network_file(model.netE, folder / f"{opt.which_epoch}_net_E.pth")
    if uses_features(opt) and not getattr(opt, "use_encoded_image", False) and not opt.load_features:
        name = getattr(opt, "cluster_path", None) or f"features_clustered_{opt.n_clusters:03d}.npz"
        model.clusters = load_cluster_file(folder / name, getattr(opt, "allow_pickle", False))
    return model.to(device).eval()


def load_network_file(net: torch.nn.Module, path: Path) -> None:
    """Load a checkpoint strictly, saying which file is missing or which options differ."""
    if not path.is_file():
        raise InferenceError(f"{path} does not exist: train first, or check --checkpoints_dir, --name and --which_epoch")
    try:
        net.load_state_dict(read_state_dict(path))
    except CheckpointMismatchError as exc:
        raise InferenceError(f"{path}: {exc}") from None


def load_cluster_file(path: Path, allow_pickle: bool) -> dict[int, torch.Tensor]:
    from .features import import_official_clusters, load_clusters

    if not path.is_file():
        raise InferenceError(
            f"{path} does not exist: run `fastp2phd encode-features` with the same --name first, "
            "or pass --use_encoded_image to encode the real images instead"
        )
    if path.suffix == ".npy":
        return import_official_clusters(path, allow_pickle=allow_pickle)
    return load_clusters(path)[0]


def run_test(opt: argparse.Namespace, device: torch.device) -> Path:
    """Generate images for the test set into results_dir/name/<phase>_<which_epoch>; returns the web page."""
    from .data import DatasetError, create_dataset

    model = load_model(opt, device)
    try:
        dataset = create_dataset(opt)
        count = len(dataset)
    except DatasetError as exc:
        raise InferenceError(str(exc)) from None
    count = count if math.isinf(opt.how_many) else min(count, int(opt.how_many))
    web_dir = Path(opt.results_dir) / opt.name / f"{opt.phase}_{opt.which_epoch}"
    page = HTMLPage(web_dir, f"Experiment = {opt.name}, Phase = {opt.phase}, Epoch = {opt.which_epoch}")
    generator = torch.Generator(device=device).manual_seed(opt.seed)
    progress = progress_bar(count, "test", not opt.no_progress)
    for i in range(count):
        item = dataset[i]
        label = item["label"].unsqueeze(0).to(device)
        inst = item["inst"].unsqueeze(0).to(device)
        image = item["image"].unsqueeze(0).to(device) if opt.use_encoded_image else None
        fake = model.inference(label, None if opt.no_instance else inst, image, generator=generator)
        name = Path(item["path"]).stem
        page.add_header(name)
        page.add_images({"input_label": label_to_image(item["label"], opt.label_nc),
                         "synthesized_image": tensor_to_image(fake[0])}, prefix=name)
        progress.update(1)
    progress.close()
    return page.save()


def load_generator(opt: argparse.Namespace) -> torch.nn.Module:
    """The generator of a run (``<which_epoch>_net_G.pth``, strictly loaded) on the CPU, in eval mode."""
    from .pix2pixhd import build_generator

    netG = build_generator(opt)
    load_network_file(netG, Path(opt.checkpoints_dir) / opt.name / f"{opt.which_epoch}_net_G.pth")
    return netG.eval()


def export_onnx(opt: argparse.Namespace, path: str | os.PathLike | None = None) -> tuple[Path, float | None]:
    """Export the generator (any configuration) to ONNX with a dynamic batch, height and width.

    The graph takes the generator's encoded input, named ``input`` (one-hot labels,
    boundary map and features, as ``Pix2PixHD.encode_input`` builds them), and
    returns ``image``. Returns the file and, when onnxruntime is installed, the
    largest difference from PyTorch on an input of another size than the export's.
    """
    from .files import atomic_path
    from .pix2pixhd import size_multiple

    netG = load_generator(opt)
    out = Path(path) if path else Path(opt.checkpoints_dir) / opt.name / f"{opt.which_epoch}_net_G.onnx"
    channels = netG.options["input_nc"]
    multiple = size_multiple(argparse.Namespace(**{**vars(opt), "instance_feat": False, "label_feat": False}))
    example = torch.randn(1, channels, 2 * multiple, 4 * multiple)
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # the exporter's notes on unrelated torchvision ops
    try:
        with atomic_path(out) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(netG, (example,), str(tmp), input_names=["input"], output_names=["image"],
                              dynamic_shapes={"input": {0: "batch", 2: "height", 3: "width"}}, dynamo=True,
                              verbose=False)
    finally:
        onnx_logger.setLevel(level)
    return out, check_onnx(netG, out, channels, multiple)


def check_onnx(netG: torch.nn.Module, path: Path, channels: int, multiple: int) -> float | None:
    """Largest |ONNX - PyTorch| on a batch of 2 at another size, or None without onnxruntime."""
    try:
        import onnxruntime
    except ImportError:
        return None
    x = torch.randn(2, channels, 3 * multiple, 5 * multiple, generator=torch.Generator().manual_seed(0))
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_out,) = session.run(["image"], {"input": x.numpy()})
    with torch.no_grad():
        torch_out = netG(x)
    return float((torch.from_numpy(onnx_out) - torch_out).abs().max())

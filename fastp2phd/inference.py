"""Generating images from label maps with a trained (or original) pix2pixHD checkpoint."""
from __future__ import annotations

import logging
import math
import os
import tempfile
import warnings
from pathlib import Path

import torch

from .compiling import OneSize, compile_networks
from .console import progress_bar
from .errors import Pix2PixHDError
from .files import TEMPORARY_SUFFIX, atomic_write, save_file_set
from .models import Encoder
from .models.checkpoint import CheckpointMismatchError, read_state_dict
from .optimize import optimize_for_inference
from .pix2pixhd import Pix2PixHD, autocast_dtype, encoder_options, generator_options
from .specs import OPT_TXT, DataSpec, ModelSpec, model_spec_from_opt_txt
from .visualize import HTMLPage, label_to_image, tensor_to_image


class InferenceError(Pix2PixHDError, RuntimeError):
    """Inference cannot run (missing checkpoint or clusters, bad data); the message says why."""


def load_run(
    path: str | os.PathLike,
    which_epoch: str = "latest",
    device: str | torch.device | None = None,
    *,
    model: ModelSpec | None = None,
    cluster_path: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    precision: str = "fp32",
    compile: str = "off",
    optimize: bool = False,
    source: str | None = None,
    read_clusters: bool = True,
) -> Pix2PixHD:
    """A trained run, ready to generate: ``Pix2PixHD`` in eval mode on ``device`` (default the CPU).

    ``path`` is the run folder (``checkpoints_dir/name``). The model options come from its
    ``opt.txt`` (written by ``fastp2phd train``, and by the original code), or from ``model``
    for a folder without one, such as original pix2pixHD checkpoints. Loads
    ``<which_epoch>_net_G.pth`` strictly; the encoder ``_net_E.pth`` where the model has one and
    the file is there; and, for a model with features, the clusters ``encode-features`` wrote
    (``features_clustered_<n_clusters>.npz``, or ``cluster_path``: an original pickled
    ``.npy`` only with ``allow_pickle``) where they are there. What is missing is said, in one
    sentence, by the call that needs it. ``precision`` (fp32, bf16, or fp16 on CUDA) is what
    ``generate``/``inference`` run in unless told otherwise; weights stay float32. ``compile``: a
    ``fastp2phd.compiling`` mode for G and E ("off" by default). ``optimize``: run
    ``fastp2phd.optimize_for_inference`` (channels_last: faster on the CPU, the same images). The
    checkpoints' shapes are checked against the options before any network is built; ``source`` names
    where the options came from in the sentence that says they differ (default: the opt.txt, or "the
    model options" for ``model``). ``read_clusters=False`` leaves the clusters unread (encode-features, which
    writes them anew: a damaged file or one of another run must not stop it).
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    autocast_dtype(precision, device)  # refuses fp16 on the CPU before anything is read
    if precision == "bf16" and device.type == "cpu":
        from .diagnostics import cpu_bf16

        if cpu_bf16() is None:
            warnings.warn("this CPU has no native bfloat16 (AVX512-BF16 or AMX), so --precision bf16 is emulated "
                          "and likely slower than fp32; it still halves the activations' memory", stacklevel=2)
    folder = Path(path)
    if not folder.is_dir():
        raise InferenceError(f"{folder} is not a run folder; pass checkpoints_dir/name of a trained run"
                             f"{_runs_in(folder.parent)}")
    if model is None:
        if not (folder / OPT_TXT).is_file():
            raise InferenceError(f"{folder} has no {OPT_TXT}: pass model=ModelSpec(...) with the options the run was "
                                 "trained with")
        model = model_spec_from_opt_txt(folder)
        source = source or str(folder / OPT_TXT)
    g_path, e_path = folder / f"{which_epoch}_net_G.pth", folder / f"{which_epoch}_net_E.pth"
    g_state = read_network_file(g_path)
    e_state = read_network_file(e_path) if model.has_encoder and e_path.is_file() else None
    # Before building: options an edited or damaged opt.txt gives can describe networks larger than the memory.
    check_checkpoint_options(model, g_state, g_path, e_state, e_path, source or "the model options")
    net = Pix2PixHD(model)
    load_network_state(net.netG, g_state, g_path)
    if net.netE is not None:
        if e_state is not None:
            load_network_state(net.netE, e_state, e_path)
        else:
            net.netE = None  # rather than an encoder with random weights
    if model.uses_features and not model.load_features and read_clusters:
        clusters = Path(cluster_path) if cluster_path else folder / f"features_clustered_{model.n_clusters:03d}.npz"
        if not clusters.is_absolute() and cluster_path:
            clusters = folder / clusters
        if clusters.is_file():
            net.clusters = load_cluster_file(clusters, allow_pickle, model.feat_num, cluster_path is None)
        elif cluster_path:
            raise InferenceError(f"the clusters file {clusters} does not exist; check --cluster_path")
    net.precision = precision
    net = net.to(device).eval()
    if optimize:
        optimize_for_inference(net)
    net.one_size = OneSize(compile, device, compile_networks([net.netG, net.netE], compile, device, what="inference",
                                                                 freeze=True))
    return net


def read_network_file(path: Path) -> dict[str, torch.Tensor]:
    """A network's state_dict (weights_only), or the sentence that says the file is missing."""
    if not path.is_file():
        saved = sorted((f.name[:-len("_net_G.pth")] for f in path.parent.glob("*_net_G.pth")),
                       key=lambda label: (not label.isdigit(), int(label) if label.isdigit() else 0, label))
        if len(saved) == 1:
            raise InferenceError(f"{path} does not exist: the run saved only '{saved[0]}'; pass --which_epoch "
                                 f"{saved[0]}")
        if saved:
            raise InferenceError(f"{path} does not exist: the run saved {', '.join(saved)}; pass one of them to "
                                 "--which_epoch")
        raise InferenceError(f"{path} does not exist: train first, or check --checkpoints_dir, --name and --which_epoch"
                             f"{_runs_in(path.parent.parent)}")
    return read_state_dict(path)


def _runs_in(folder: Path) -> str:
    """' (FOLDER holds the runs a, b)' for the sentence that says a run is not there: a typo in --name shows."""
    runs = sorted(f.name for f in folder.glob("*") if (f / OPT_TXT).is_file()) if folder.is_dir() else []
    if not runs:
        return f" ({folder} does not exist)" if not folder.is_dir() else f" ({folder} holds no run)"
    more = ", ..." if len(runs) > 10 else ""
    return f" ({folder} holds the run{'s' if len(runs) > 1 else ''} {', '.join(runs[:10])}{more})"


def load_network_state(net: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``path``'s state_dict strictly, saying which options differ."""
    try:
        net.load_state_dict(state)
    except CheckpointMismatchError as exc:
        raise InferenceError(f"{path}: {exc}") from None


def check_checkpoint_options(model: ModelSpec, g_state, g_path: Path, e_state, e_path: Path, source: str) -> None:
    """Refuse ``model`` where the options read off the checkpoints' shapes differ from it, without building a
    network; what cannot be read off the shapes is left to the strict load."""
    cls, options = generator_options(model)
    netG = "local" if any(k.startswith("model1_") for k in g_state) else "global"
    if "model.1.weight" in g_state and netG != model.netG:  # (a generator's first conv: G1's, in both)
        changes = [("netG", netG, model.netG)]
    else:
        changes = cls.option_changes(options, g_state)
    checks = [(g_path, cls, changes)]
    if e_state is not None:
        checks.append((e_path, Encoder, Encoder.option_changes(encoder_options(model), e_state)))
    for path, net, found in checks:
        if found:
            flags = {**net.FLAGS, "netG": "pix2pixHD flag --netG"}
            saved = "; ".join(f"{name}={theirs!r} (not {ours!r}; {flags.get(name, name)})"
                              for name, theirs, ours in found)
            raise InferenceError(f"{source} does not match the checkpoint {path}, which was saved with {saved}: "
                                 "set the options the run was trained with")


def load_cluster_file(path: Path, allow_pickle: bool, feat_num: int, encoded: bool = False) -> dict[int, torch.Tensor]:
    """The cluster centres in ``path`` (fastp2phd's .npz, or an original .npy), each class's (k, ``feat_num``).
    ``encoded``: ``path`` is the run's own file, which ``encode-features`` writes anew (what a damaged one needs)."""
    from .features import ClustersFileError, import_official_clusters, load_clusters

    again = "; run `fastp2phd encode-features` to write it anew" if encoded else ""
    try:
        clusters = (import_official_clusters(path, allow_pickle=allow_pickle) if path.suffix == ".npy"
                    else load_clusters(path)[0])
    except ClustersFileError as exc:
        if not encoded:  # (the user's --cluster_path: the sentence names it)
            raise
        raise InferenceError(f"{str(exc).rstrip('.')}{again}") from None
    for cls, centres in clusters.items():
        if centres.dim() != 2 or centres.shape[1] != feat_num:
            raise InferenceError(f"{path}: the centres of class {cls} have shape {tuple(centres.shape)}, but this "
                                 f"model's features have {feat_num} values (--feat_num): the clusters come from "
                                 f"another run{again or '; check --cluster_path'} (or --feat_num)")
    return clusters


def run_test(
    model: Pix2PixHD,
    data: DataSpec,
    web_dir: str | os.PathLike,
    *,
    title: str = "pix2pixHD results",
    how_many: float = math.inf,
    use_encoded_image: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """Generate images for ``data`` into ``web_dir`` (images and an index.html); returns the page.

    Features come from the encoded real images with ``use_encoded_image`` (``data`` must read
    them); else from ``<phase>_features/<name>.npz`` next to the label maps where there is one
    (the instance features the editor saved with a scene); else from the model's clusters,
    sampled with ``seed``.
    """
    from .data import DatasetError, create_dataset

    spec = model.spec
    sampled = spec.uses_features and not spec.load_features and not use_encoded_image
    saved = Path(data.dataroot) / f"{data.phase}_features"
    saved = saved if sampled and saved.is_dir() else None
    if spec.uses_features and not spec.load_features:
        if use_encoded_image and model.netE is None:
            raise InferenceError("--use_encoded_image needs the run's encoder (<which_epoch>_net_E.pth), which is not "
                                 "there; sample clusters instead (drop --use_encoded_image)")
        if not use_encoded_image and model.clusters is None and saved is None:
            raise InferenceError("this model uses instance features and the run has no clusters: run `fastp2phd "
                                 "encode-features` with the same --name first, or pass --use_encoded_image")
    device = next(model.parameters()).device
    try:
        dataset = create_dataset(with_step_memory(model, data))
        count = len(dataset)
    except DatasetError as exc:
        raise InferenceError(str(exc)) from None
    count = count if math.isinf(how_many) else min(count, int(how_many))
    page = HTMLPage(Path(web_dir), title)
    generator = torch.Generator(device=device).manual_seed(seed)
    bar = progress_bar(count, "test", progress)
    for i in range(count):
        item = dataset[i]
        label = item["label"].unsqueeze(0).to(device)
        inst = item["inst"].unsqueeze(0).to(device)
        image = item["image"].unsqueeze(0).to(device) if use_encoded_image else None
        name = item["name"]  # a/s for test_label/a/s.png: two scenes named s never share their outputs
        model.check_size(label, item["path"])  # naming the scene
        if saved is not None and (saved / f"{name}.npz").is_file():
            fake = _generate_with_saved_features(model, label, inst, saved / f"{name}.npz", generator)
        else:
            fake = model.inference(label, None if spec.no_instance else inst, image, generator=generator)
        page.add_header(name)
        page.add_images({"input_label": label_to_image(item["label"], spec.label_nc),
                         "synthesized_image": tensor_to_image(fake[0])}, prefix=name)
        bar.update(1)
    bar.close()
    return page.save()


def with_step_memory(model: Pix2PixHD, data: DataSpec) -> DataSpec:
    """``data`` refusing, before it is decoded, an image whose generation by ``model`` would not fit the memory
    (``fastp2phd.memory``'s estimate): with resize_or_crop 'none' the files alone decide the size of the step."""
    if data.resize_or_crop != "none":
        return data
    from .memory import device_memory, inference_bytes_per_pixel

    device = next(model.parameters()).device
    return data.replace(step_bytes_per_pixel=inference_bytes_per_pixel(model.spec, device.type, model.precision),
                        step_device_memory=device_memory(device))


@torch.no_grad()
def _generate_with_saved_features(model: Pix2PixHD, label, inst, path: Path, generator) -> torch.Tensor:
    """Generate with the instance features saved in ``path``; instances it does not name sample the clusters."""
    from .features import ClustersFileError, feature_map_from_vectors, load_instance_vectors, sample_feature_map

    spec = model.spec
    try:
        vectors = load_instance_vectors(path, spec.feat_num)
    except ClustersFileError as exc:
        raise InferenceError(str(exc)) from None
    # The editor saves a vector per instance, --label_feat or not (without instance maps, per label region); what it
    # did not name is sampled as the model does.
    regions = label if spec.no_instance else inst
    missing = sorted(set(torch.unique(regions).tolist()) - set(vectors))
    if missing and model.clusters is None:
        raise InferenceError(f"{path} has no features for instances {missing[:5]} and the run has no clusters to "
                             "sample them from; run `fastp2phd encode-features` first")
    base = (sample_feature_map(label if spec.label_feat else inst, model.clusters, spec.feat_num, generator=generator)
            if missing else torch.zeros(label.shape[0], spec.feat_num, *label.shape[-2:], device=label.device))
    feat = feature_map_from_vectors(regions, vectors, base)
    return model.generate(label, None if spec.no_instance else inst, feat=feat)[0]


# Weights up to this size go inside the .onnx file (protobuf's limit is 2 GB): one file, replaced whole. Above it,
# they go to <name>.data beside it, a file the graph names: torch's default, which named our temporary.
ONNX_INLINE_BYTES = 1 << 30


def export_onnx(model: Pix2PixHD, path: str | os.PathLike) -> tuple[Path, float | None]:
    """Export ``model``'s generator to ONNX with a dynamic batch, height and width.

    The graph takes the generator's encoded input, named ``input`` (one-hot labels,
    boundary map and features, as ``Pix2PixHD.encode_input`` builds them), and
    returns ``image``. Returns the file and, when onnxruntime is installed, the
    largest difference from PyTorch on an input of another size than the export's.
    One self-contained file unless the weights exceed ``ONNX_INLINE_BYTES`` (then also
    ``<file>.data``); an existing file that is not an ONNX model is refused, not replaced.
    """
    out = Path(path)
    _check_onnx_destination(out)
    try:  # optional packages torch's ONNX exporter imports midway, with a bare ModuleNotFoundError
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise InferenceError(f"export-onnx needs the {exc.name or 'onnx'} package, which is not installed: "
                             'pip install "fastp2phd[onnx]"') from None
    netG = model.netG
    device, training = next(netG.parameters()).device, netG.training
    channels = model.spec.generator_input_nc
    multiple = model.spec.generator_size_multiple
    example = torch.randn(1, channels, 2 * multiple, 4 * multiple)
    inline = sum(t.numel() * t.element_size() for t in netG.state_dict().values()) <= ONNX_INLINE_BYTES
    onnx_logger = logging.getLogger("torch.onnx")
    level = onnx_logger.level
    onnx_logger.setLevel(logging.ERROR)  # the exporter's notes on unrelated torchvision ops

    def export(destination: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(netG, (example,), str(destination), input_names=["input"], output_names=["image"],
                              dynamic_shapes={"input": {0: "batch", 2: "height", 3: "width"}}, dynamo=True,
                              verbose=False, external_data=not inline)
    try:
        netG.cpu().eval()
        if inline:
            atomic_write(out, export)
        else:
            _export_with_external_data(export, out)
        return out, check_onnx(netG, out, channels, multiple)
    finally:
        onnx_logger.setLevel(level)
        netG.to(device).train(training)  # the caller's model is left where and as it was


def _check_onnx_destination(out: Path) -> None:
    """Refuse, before the export, a folder or a file that is not an ONNX model (a checkpoint, say) at ``out``."""
    if out.is_dir():
        raise InferenceError(f"{out} is a folder; pass --onnx a file name (such as {out / 'net_G.onnx'})")
    if out.is_file() and out.stat().st_size:
        with open(out, "rb") as f:
            ours = f.read(1) == b"\x08"  # a serialised ModelProto starts with its ir_version (field 1, a varint)
        if not ours:
            raise InferenceError(f"{out} exists and is not an ONNX model, so export-onnx does not replace it; choose "
                                 "another --onnx file name")


def _export_with_external_data(export, out: Path) -> None:
    """Export to ``out`` and ``out.data``, which the graph names: under their final names in a scratch folder, then
    both replace their old versions together (a graph next to another export's weights reads garbage)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", suffix=TEMPORARY_SUFFIX, dir=out.parent) as scratch:
        export(Path(scratch) / out.name)
        with save_file_set(out.parent, "ONNX export") as files:
            for name in (out.name, f"{out.name}.data"):
                files.write(name, lambda tmp, name=name: os.replace(Path(scratch) / name, tmp))


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

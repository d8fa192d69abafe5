"""Scoring generated images against the real ones: FID and KID, and segmentation scores (mIoU, pixel accuracy).

The protocol (written into every report):

* Pairs: ``<results>/images/<stem>_synthesized_image.png`` (what ``fastp2phd test`` writes; the ones its last
  run's ``index.html`` shows, when there is one) for each label map
  ``<dataroot>/<phase>_label/**/<stem>.png``; the real photo is the file of ``<phase>_img`` at the same
  sorted position (the dataset's pairing). Generated images may differ in size from one another.
* FID and KID on pool3 features (2048-d) of the FID Inception v3 (pytorch-fid's network: TensorFlow's
  ``inception-2015-12-05`` with its weights ``pt_inception-2015-12-05-6726825d.pth``). Real photos are
  first resized to their generated image's size (PIL bicubic); then every image, RGB in [0, 1], is resized
  to 299x299 (bilinear, align_corners=False) and scaled to [-1, 1], as pytorch-fid does. KID is the unbiased
  MMD^2 with the kernel (x.y/2048 + 1)^3, averaged over random subsets.
* Segmentation: a user's network (TorchScript, or a torch.export ``.pt2``) sees each generated image at
  the generated resolution, RGB in [0, 1] normalised with ``seg_mean``/``seg_std`` (ImageNet's by
  default), and returns logits (1, 19, h, w), upsampled bilinearly to the image size where they differ.
  The ground truth is the Cityscapes label-id map resized to the generated size by nearest neighbour and
  mapped to the 19 train ids; every other id is ignored (255). IoU per class over all images (NaN where a
  class is neither in the truth nor predicted), mIoU = their mean ignoring NaN, pixel accuracy over the
  pixels not ignored.

The FID Inception is rebuilt here (the same modules and state_dict keys as pytorch-fid's ``FIDInception*``
blocks on torchvision's ``Inception3``), so it needs neither torchvision nor pytorch-fid: on Linux, PyPI
has only CUDA builds of torchvision, which do not import next to a CPU-only torch. Its weights are
never downloaded here; see :func:`find_fid_weights`.
"""
from __future__ import annotations

import html
import json
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import unquote

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import EvaluationError  # noqa: F401  (re-exported, as the names below: evaluate's API)
from .evaluation_fid import (FID_DIMS, FID_SIZE, FID_WEIGHTS_NAME, FID_WEIGHTS_URL, FIDInceptionV3,  # noqa: F401
                             feature_statistics, fid_from_features, find_fid_weights, frechet_distance,
                             kernel_inception_distance, load_fid_inception, sha256_of)
from .evaluation_segmentation import (IGNORE_ID, NUM_CLASSES, TRAIN_LABEL_IDS, as_logits,  # noqa: F401
                                      check_seg_model, confusion_matrix, label_ids_to_train_ids, load_segmenter,
                                      segmentation_scores)
from .specs import IMAGENET_MEAN, IMAGENET_STD, EvaluationSpec  # noqa: F401  (re-exported)

SYNTHESIZED_SUFFIX = "_synthesized_image"


def _train_id_names() -> tuple[str, ...]:
    from .data import CITYSCAPES_CLASSES

    return tuple(CITYSCAPES_CLASSES[i][0] for i in TRAIN_LABEL_IDS)


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Pair:
    name: str
    generated: Path
    label: Path
    real: Path | None


def _image_folder(results: Path) -> Path:
    """``results`` or its images/ subfolder (a ``fastp2phd test`` web folder), whichever holds the images."""
    if (results / "images").is_dir() and any((results / "images").rglob(f"*{SYNTHESIZED_SUFFIX}.png")):
        return results / "images"
    return results


def _on_page(results: Path, images: list[Path]) -> list[Path]:
    """Those of ``images`` that the page of the last ``fastp2phd test`` into ``results`` shows; all of them when there
    is no such page. A rerun with a smaller --how_many, or after more training, leaves the earlier run's other
    images in the folder: they are not this run's."""
    try:
        page = (results / "index.html").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return images
    links = {(results / unquote(html.unescape(src))).resolve() for src in re.findall(r'<img src="([^"]+)"', page)}
    return [p for p in images if p.resolve() in links] or images


def _check_folders(dataroot, phase: str, results: Path | None) -> None:
    """The folders evaluation reads exist (checked before anything slow or the FID weights)."""
    if str(dataroot) == "synthetic":
        raise EvaluationError("--dataroot synthetic has no real images on disk to compare with; write the scenes "
                              "with `fastp2phd make-synthetic --out DIR` and pass --dataroot DIR")
    if results is not None and not results.is_dir():
        raise EvaluationError(f"the results folder {results} does not exist; pass the folder `fastp2phd test` "
                              "wrote (results_dir/name/<phase>_<epoch>), or --name to generate the images first")
    label_dir = Path(dataroot) / f"{phase}_label"
    if not label_dir.is_dir() and (Path(dataroot) / f"{phase}_A").is_dir():
        raise EvaluationError(f"{dataroot} holds image-to-image data ({phase}_A, {phase}_B: --label_nc 0), which "
                              f"evaluate does not score yet: it pairs generated images with {phase}_label and {phase}_img")
    if not label_dir.is_dir():
        raise EvaluationError(f"the label maps folder {label_dir} does not exist; check --dataroot and --phase")


def pair_results(results: str | os.PathLike, dataroot: str | os.PathLike, phase: str = "test",
                 how_many: float = math.inf, need_real: bool = True) -> list[Pair]:
    """Generated image, label map and real photo of each of the first ``how_many`` scenes of ``dataroot``'s
    ``phase``; every mismatch between the folders is one sentence."""
    from .data.folder import list_images
    from .data.pairing import unpaired

    results, root = Path(results), Path(dataroot)
    _check_folders(dataroot, phase, results)
    folder = _image_folder(results)
    # Keyed by the scene's name, its label map's path in <phase>_label without the extension (a/s for
    # a/s.png), which is where `test` writes its image: images/a/s_synthesized_image.png.
    images = list(folder.rglob(f"*{SYNTHESIZED_SUFFIX}.png"))
    if folder != results:  # a `fastp2phd test` web folder: its page says which images are its last run's
        images = _on_page(results, images)
    generated = {p.relative_to(folder).as_posix()[:-len(SYNTHESIZED_SUFFIX) - 4]: p for p in images}
    if not generated:
        raise EvaluationError(f"{folder} holds no *{SYNTHESIZED_SUFFIX}.png images; pass the folder `fastp2phd "
                              "test` wrote (it holds images/<name>_synthesized_image.png)")
    label_dir, real_dir = root / f"{phase}_label", root / f"{phase}_img"
    labels = list_images(str(label_dir))
    if not labels:
        raise EvaluationError(f"the label maps folder {label_dir} holds no images; check --dataroot and --phase")
    reals: list[str | None] = [None] * len(labels)
    if need_real:
        if not real_dir.is_dir():
            raise EvaluationError(f"the real images folder {real_dir} does not exist, and FID compares with them; "
                                  "check --dataroot and --phase, or pass --no_fid")
        reals = list_images(str(real_dir))
        if len(reals) != len(labels):
            raise EvaluationError(f"{real_dir} holds {len(reals)} images but {label_dir} holds {len(labels)} label "
                                  "maps; each label map needs its real image (paired by sorted path)")
        mismatch = unpaired({"label": (str(label_dir), labels), "image": (str(real_dir), reals)})
        if mismatch:  # (one photo missing and another extra scored every later scene against another's photo)
            raise EvaluationError(mismatch)
    stems = [Path(p).relative_to(label_dir).with_suffix("").as_posix() for p in labels]
    unknown = sorted(set(generated) - set(stems))
    if unknown:
        raise EvaluationError(f"{generated[unknown[0]]} has no label map named {unknown[0]} in {label_dir} "
                              f"({len(unknown)} generated images have none); the results come from another dataset "
                              "or phase: check --results, --dataroot and --phase")
    count = len(labels) if math.isinf(how_many) else min(len(labels), int(how_many))
    missing = [s for s in stems[:count] if s not in generated]
    if missing:
        raise EvaluationError(f"{folder} holds {len(generated)} generated images but {label_dir} has {count} label "
                              f"maps to score (the first missing: {missing[0]}{SYNTHESIZED_SUFFIX}.png); generate "
                              f"them all (`fastp2phd test --how_many inf`) or score the first ones with --how_many N")
    return [Pair(stems[i], generated[stems[i]], Path(labels[i]), Path(reals[i]) if reals[i] else None)
            for i in range(count)]


def _read_rgb(path: Path) -> Image.Image:
    from .data.folder import open_image

    return open_image(str(path)).convert("RGB")


def _read_label(path: Path) -> np.ndarray:
    from .data.folder import _LABEL_MODES, _grey, open_image

    img = open_image(str(path))
    if img.mode == "RGB" and _grey(img):  # ids in three equal channels, as training reads them
        img = img.getchannel(0)
    if img.mode not in _LABEL_MODES:
        raise EvaluationError(f"label map {path} has PIL mode {img.mode}, not one Cityscapes label id per pixel; "
                              "pass the *_labelIds.png maps (single channel)")
    return np.asarray(img)


def _resize_nearest(ids: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest neighbour at pixel centres (as PIL's NEAREST)."""
    h, w = ids.shape
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return ids[rows[:, None], cols[None, :]]


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, np.float32) / 255).permute(2, 0, 1).unsqueeze(0)


# Aspect ratios of a generated image and its label map may differ this much (sizes rounded to what the
# generator takes); more means a crop, which cannot be paired pixel by pixel.
_ASPECT_TOLERANCE = 0.1


def _check_aspect(pair: Pair, generated: tuple[int, int], label: tuple[int, int]) -> None:
    (gw, gh), (lw, lh) = generated, label
    if abs((gw / gh) / (lw / lh) - 1) > _ASPECT_TOLERANCE:
        raise EvaluationError(f"{pair.generated} is {gw}x{gh} but its label map {pair.label} is {lw}x{lh}, another "
                              "aspect ratio: the image was cropped and cannot be compared pixel by pixel; generate "
                              "with --resize_or_crop scale_width or none")


# ----------------------------------------------------------------------------- the evaluation


def evaluate(pairs: Sequence[Pair], spec: EvaluationSpec, device: str | torch.device = "cpu",
             progress: bool = True) -> dict[str, Any]:
    """Score ``pairs``; returns the report (scores and protocol) that :func:`write_report` writes."""
    from ._version import __version__
    from .console import progress_bar

    device = torch.device(device)
    if not spec.fid and spec.seg_model is None:
        raise EvaluationError("nothing to compute: FID is off (--no_fid) and there is no --seg_model; drop "
                              "--no_fid or pass a segmentation network")
    if len(pairs) < (2 if spec.fid else 1):  # before any image goes through the networks
        raise EvaluationError(f"{len(pairs)} image{'' if len(pairs) == 1 else 's'} to score, and "
                              + ("FID and KID need at least 2" if spec.fid else "there must be at least 1")
                              + ": raise --how_many, or check --results")
    # Fail on missing weights or a bad segmenter before reading any image.
    weights = find_fid_weights(spec.fid_weights) if spec.fid else None
    inception = load_fid_inception(weights, device) if weights else None
    segmenter = load_segmenter(spec.seg_model, device) if spec.seg_model is not None else None
    mean = torch.tensor(spec.seg_mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(spec.seg_std, device=device).view(1, 3, 1, 1)

    fake_feats, real_feats, batch_fake, batch_real = [], [], [], []
    confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), np.int64)
    sizes: Counter = Counter()
    resized_real = 0

    def flush():
        if batch_fake:
            with torch.no_grad():
                fake_feats.append(inception(torch.cat(batch_fake).to(device)).double().cpu())
                real_feats.append(inception(torch.cat(batch_real).to(device)).double().cpu())
            batch_fake.clear()
            batch_real.clear()

    bar = progress_bar(len(pairs), "evaluate", progress)
    for pair in pairs:
        fake = _read_rgb(pair.generated)
        width, height = fake.size
        sizes[f"{width}x{height}"] += 1
        label = _read_label(pair.label)
        _check_aspect(pair, (width, height), (label.shape[1], label.shape[0]))
        fake_t = _to_tensor(fake)
        if inception is not None:
            real = _read_rgb(pair.real)
            if real.size != (label.shape[1], label.shape[0]):
                raise EvaluationError(f"real image {pair.real} is {real.size[0]}x{real.size[1]} but its label map "
                                      f"{pair.label} is {label.shape[1]}x{label.shape[0]}; they must match")
            if real.size != fake.size:
                real = real.resize(fake.size, Image.BICUBIC)
                resized_real += 1
            # Resized to 299x299 one by one, so images of different sizes share a batch.
            batch_fake.append(F.interpolate(fake_t, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False))
            batch_real.append(F.interpolate(_to_tensor(real), size=(FID_SIZE, FID_SIZE), mode="bilinear",
                                            align_corners=False))
            if len(batch_fake) == spec.batch_size:
                flush()
        if segmenter is not None:
            with torch.no_grad():
                logits = as_logits(segmenter((fake_t.to(device) - mean) / std), spec.seg_model, (height, width))
            prediction = logits.argmax(1)[0].cpu().numpy()
            truth = label_ids_to_train_ids(_resize_nearest(label, height, width))
            confusion += confusion_matrix(truth, prediction)
        bar.update(1)
    flush()
    bar.close()

    report: dict[str, Any] = {"images": len(pairs), "fid": None, "kid": None, "segmentation": None}
    protocol: dict[str, Any] = {
        "images": len(pairs),
        "resolutions (width x height: images)": dict(sizes),
        "pairing": "generated <stem>_synthesized_image.png with the label map <phase>_label/**/<stem> and the real "
                   "image at the same sorted position in <phase>_img",
        "fastp2phd": __version__,
    }
    if inception is not None:
        fake_all, real_all = torch.cat(fake_feats).numpy(), torch.cat(real_feats).numpy()
        report["fid"] = fid_from_features(fake_all, real_all)
        kid_mean, kid_std = kernel_inception_distance(fake_all, real_all, spec.kid_subsets, spec.kid_subset_size,
                                                      spec.seed)
        subset = min(spec.kid_subset_size, len(pairs))
        report["kid"] = {"mean": kid_mean, "std": kid_std, "subsets": spec.kid_subsets, "subset_size": subset}
        protocol["fid"] = {
            "network": "FID Inception v3 (pytorch-fid's network, TensorFlow inception-2015-12-05), pool3 features, "
                       "2048-d",
            "weights": str(weights),
            "weights_sha256": sha256_of(weights),
            "real images": f"resized to their generated image's size with PIL bicubic ({resized_real} of "
                           f"{len(pairs)} needed it)",
            "inception input": "RGB in [0, 1] resized to 299x299 (bilinear, align_corners=False), scaled to [-1, 1]",
            "kid": f"unbiased MMD^2, kernel (x.y/2048 + 1)^3, mean and std over {spec.kid_subsets} subsets of "
                   f"{subset} images",
        }
    if segmenter is not None:
        scores = segmentation_scores(confusion)
        report["segmentation"] = {
            "miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"],
            "per_class_iou": {name: float(v) for name, v in zip(_train_id_names(), scores["iou"])},
            "confusion (rows: truth, columns: prediction)": confusion.tolist(),
        }
        protocol["segmentation"] = {
            "model": str(spec.seg_model),
            "input": f"the generated image at the generated resolution, RGB/255 normalised with mean "
                     f"{list(spec.seg_mean)} and std {list(spec.seg_std)}",
            "output": f"logits (1, {NUM_CLASSES}, h, w), upsampled bilinearly to the image size where they differ; "
                      "argmax",
            "ground truth": "Cityscapes label ids resized to the generated resolution by nearest neighbour, mapped "
                            "to the 19 train ids; all other ids ignored (255)",
            "label id -> train id": {str(i): t for t, i in enumerate(TRAIN_LABEL_IDS)},
            "iou": "per class over all images' pixels; NaN (null) where a class is neither true nor predicted; "
                   "mIoU = mean over the others; pixel accuracy over the pixels not ignored",
        }
    report["protocol"] = protocol
    return report


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


def markdown_report(report: dict[str, Any], title: str = "Evaluation") -> str:
    """The report as a small Markdown page: scores, per-class IoU, and the protocol."""
    lines = [f"# {title}", "", "| score | value |", "| --- | --- |"]
    if report["fid"] is not None:
        kid = report["kid"]
        lines += [f"| FID | {_number(report['fid'], 3)} |",
                  f"| KID | {kid['mean']:.4g} ± {kid['std']:.2g} |"]
    seg = report["segmentation"]
    if seg is not None:
        lines += [f"| mIoU | {_number(seg['miou'])} |", f"| pixel accuracy | {_number(seg['pixel_accuracy'])} |"]
    lines.append(f"| images | {report['images']} |")
    if seg is not None:
        lines += ["", "| train id | class | IoU |", "| ---: | --- | ---: |"]
        lines += [f"| {i} | {name} | {_number(v)} |" for i, (name, v) in enumerate(seg["per_class_iou"].items())]
    lines += ["", "## Protocol", ""]
    for key, value in report["protocol"].items():
        if isinstance(value, dict):
            lines.append(f"- {key}:")
            lines += [f"  - {k}: {json.dumps(v) if isinstance(v, dict) else v}" for k, v in value.items()]
        else:
            lines.append(f"- {key}: {json.dumps(value) if isinstance(value, dict) else value}")
    return "\n".join(lines) + "\n"


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_report(report: dict[str, Any], out: str | os.PathLike, title: str = "Evaluation") -> tuple[Path, Path]:
    """``out/evaluation.json`` and ``out/evaluation.md``; returns their paths."""
    from .files import write_text

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "evaluation.json", json.dumps(_json_safe(report), indent=2) + "\n")
    write_text(out / "evaluation.md", markdown_report(report, title))
    return out / "evaluation.json", out / "evaluation.md"


# ----------------------------------------------------------------------------- the command's steps


def check_evaluation(spec: EvaluationSpec, dataroot: str | os.PathLike, phase: str, results: Path | None) -> None:
    """Everything ``fastp2phd evaluate`` can check before generating or scoring, cheapest first: the folders
    (``results`` None: they are generated first), the segmenter, then the FID weights."""
    if not spec.fid and spec.seg_model is None:
        raise EvaluationError("nothing to compute: FID is off (--no_fid) and there is no --seg_model; drop "
                              "--no_fid or pass a segmentation network")
    _check_folders(dataroot, phase, results)
    if spec.seg_model is not None:
        check_seg_model(spec.seg_model)
    if spec.fid:
        find_fid_weights(spec.fid_weights)


def evaluate_folder(results: Path, dataroot: str | os.PathLike, phase: str, spec: EvaluationSpec,
                    device: torch.device, *, how_many: float = math.inf, out: str | os.PathLike | None = None,
                    progress: bool = True) -> tuple[dict[str, Any], Path, Path]:
    """Score the images in ``results`` against ``dataroot``'s ``phase``; writes the report into ``out``
    (default ``results``) and returns (report, its JSON path, its Markdown path)."""
    pairs = pair_results(results, dataroot, phase, how_many, need_real=spec.fid)
    report = evaluate(pairs, spec, device, progress=progress)
    json_path, md_path = write_report(report, out or results, title=f"Evaluation of {results}")
    return report, json_path, md_path

"""The Cityscapes-style folder dataset of pix2pixHD (``AlignedDataset``).

Layout under ``spec.dataroot`` (a ``DataSpec``) for phase P ('train' or 'test'):

* ``P_label/``: label maps, single-channel ids (PIL mode L, P, I or I;16); with
  ``label_nc == 0`` the input folder is ``P_A/`` and holds RGB images instead;
* ``P_img/``: photos (``P_B/`` when label_nc == 0), read when ``spec.read_images``;
* ``P_inst/``: instance maps (8- or 16-bit ids), unless ``spec.no_instance``;
* ``P_feat/``: precomputed feature maps (RGB images), when ``spec.load_features``.

Each folder is searched recursively for image files (.png .jpg .jpeg .bmp .tif .tiff,
any case); the lists are sorted by path and paired by position (names that show a file missing or
extra in one folder are refused: ``fastp2phd.data.pairing``), then cut to
``spec.max_dataset_size`` items.

Item ``i`` (a dict):

* ``'label'``: LongTensor (1, H, W) of label ids; FloatTensor (3, H, W) in [-1, 1]
  when label_nc == 0;
* ``'inst'``: IntTensor (1, H, W) int32 instance ids (zeros when no_instance);
* ``'image'``: FloatTensor (3, H, W) in [-1, 1] (zeros when the photo is not read);
* ``'feat'``: FloatTensor (3, H, W) in [-1, 1] when load_features (resampled NEAREST,
  since feature maps are constant per instance), else zeros (1, H, W);
* ``'path'``: the label map's path (str);
* ``'name'``: the label map's path inside its folder, without the extension, with '/' between
  subfolders (``a/s`` for ``test_label/a/s.png``): unique per item, so outputs named after it never collide.

Randomness: item ``i`` draws its crop and flip from ``random.Random`` seeded with
(spec.seed, epoch, i), where ``epoch`` is what ``set_epoch`` last set (0 at first); the
draw does not depend on the global RNGs, the worker or the order items are read in, so a
training run resumed at an epoch sees the same crops and flips. Call ``set_epoch``
before creating the epoch's DataLoader iterator (with ``persistent_workers=True`` the
workers keep the epoch they were started with).

Every problem with the files raises :class:`DatasetError` (a ValueError; a missing
folder raises :class:`DatasetNotFoundError`, also a FileNotFoundError) whose message
names the folder or file. An image too large to decode, or to process in the memory
there is, is refused from its header, before it is decoded (:func:`check_image_size`).
"""
from __future__ import annotations

import math
import os
import random
import stat
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch
from PIL import Image, ImageChops
from torch.utils.data import Dataset

from ..errors import Pix2PixHDError
from ..files import finish_interrupted_save
from ..memory import host_memory
from ..specs import DataSpec
from .pairing import unpaired
from .transforms import (get_params, processed_size, to_image_tensor, to_instance_tensor, to_label_tensor,
                         transform)

__all__ = ["AlignedDataset", "DatasetError", "DatasetNotFoundError", "IMAGE_EXTENSIONS", "build_item",
           "check_image_size", "item_rng", "list_images"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".ppm", ".bmp", ".tif", ".tiff")  # the original's, and .tif
_LABEL_MODES = ("L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")


class DatasetError(Pix2PixHDError, ValueError):
    """Bad dataset input: missing or empty folders, unpaired files, unreadable images, bad ids."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """A dataset folder does not exist."""


def item_rng(rng_seed: int, epoch: int, index: int) -> random.Random:
    """The private RNG of one item read in one epoch (a string seed: hashed with SHA-512,
    so independent of PYTHONHASHSEED and of the process)."""
    return random.Random(f"fastp2phd:{int(rng_seed)}:{int(epoch)}:{int(index)}")


def _folder_key(path: str):
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _check_regular(path: str) -> None:
    """Refuse a FIFO, socket or device named like an image: opening one would block or read forever."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # a broken link: open_image says it cannot read it
    if not stat.S_ISREG(mode):
        kind = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
                stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}.get(stat.S_IFMT(mode), "not a file")
        raise DatasetError(f"{path} is not a regular file ({kind}): remove it from the dataset folder.")


def list_images(folder: str) -> List[str]:
    """Image files under ``folder`` (recursively, following linked folders), sorted by path.

    Every real folder is walked once, so a link back up the tree (a loop) does not walk forever;
    a FIFO, socket or device named like an image raises DatasetError."""
    found = []
    seen = {_folder_key(folder)}
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs.sort()  # the first of several paths to one folder is the one listed, whatever the disk's order
        keep = []
        for name in dirs:
            key = _folder_key(os.path.join(root, name))
            if key is not None and key not in seen:
                seen.add(key)
                keep.append(name)
        dirs[:] = keep
        for name in files:
            if name.lower().endswith(IMAGE_EXTENSIONS):
                path = os.path.join(root, name)
                _check_regular(path)
                found.append(path)
    return sorted(found)


# The most pixels an image may have to be decoded at all: 16 Cityscapes images (2048x1024), 8K UHD fits. PIL only
# warns below twice its MAX_IMAGE_PIXELS (11000x11000 passed, and took a run to 22 GB), and a user may lift that.
MAX_SOURCE_PIXELS = 16 * 2048 * 1024
# Bytes per pixel of an item's files as decoded (label and instance ids up to 4 bytes each, the photo 3 and its
# RGB copy), and per pixel it is processed at (resized images; int64 labels, int32 instances, float32 photos).
DECODED_BYTES_PER_PIXEL = 16
ITEM_BYTES_PER_PIXEL = 48
_GiB = 1024**3


def open_image(path: str, spec: Optional[DataSpec] = None) -> Image.Image:
    """Open and fully decode an image file, so that a truncated or corrupt file raises
    DatasetError here (PIL decodes lazily otherwise). Truncation is only detected while
    ``PIL.ImageFile.LOAD_TRUNCATED_IMAGES`` is False (PIL's default). An image too large to
    decode, or (with ``spec``) to process as ``spec`` says, is refused from its header first
    (``check_image_size``)."""
    with _open_lazily(path) as img:
        check_image_size(path, img.size, spec)
        try:
            img.load()
        except Exception as error:
            raise _unreadable(path, error) from error
        return img


def read_header(path: str, spec: Optional[DataSpec] = None) -> tuple[str, tuple[int, int]]:
    """An image file's PIL mode and size from its header alone (no decoding), refused as ``open_image`` would."""
    with _open_lazily(path) as img:
        check_image_size(path, img.size, spec)
        return img.mode, img.size


def _open_lazily(path: str) -> Image.Image:
    _check_regular(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_image_size says more
            return Image.open(path)
    except Image.DecompressionBombError as error:
        raise DatasetError(f"Image file {path} is too large to decode ({error}); downscale it first.") from None
    except Exception as error:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ...
        raise _unreadable(path, error) from error


def _unreadable(path: str, error: Exception) -> DatasetError:
    detail = str(error) or type(error).__name__
    return DatasetError(f"Cannot read image file {path} ({detail}): it is unreadable, truncated or not an image.")


def check_image_size(path: str, size, spec: Optional[DataSpec] = None) -> None:
    """Refuse, from the PIL size (w, h) of an image's header, one with more than ``MAX_SOURCE_PIXELS``, or one
    whose item (and the step ``spec.step_bytes_per_pixel`` says, at the size ``spec`` processes it at) needs more
    memory than there is."""
    w, h = size
    if spec is not None:
        _check_memory(path, (w, h), spec)
    if w * h > MAX_SOURCE_PIXELS:
        raise DatasetError(f"Image file {path} is {w}x{h} pixels, more than the {MAX_SOURCE_PIXELS / 1e6:.1f} million "
                           "fastp2phd decodes (16 Cityscapes images); downscale it first.")


def _check_memory(path: str, size, spec: DataSpec) -> None:
    w, h = size
    pw, ph = processed_size(spec, (w, h))
    decoded, data = w * h * DECODED_BYTES_PER_PIXEL, pw * ph * ITEM_BYTES_PER_PIXEL
    step = pw * ph * spec.step_bytes_per_pixel
    if spec.step_device_memory:  # the step runs on a GPU, the data stays here
        checks = [(decoded + data, decoded, host_memory(), "this machine"),
                  (step, 0, spec.step_device_memory, "the GPU")]
    else:
        checks = [(decoded + data + step, decoded, host_memory(), "this machine")]
    for need, fixed, have, who in checks:
        if need <= have:
            continue
        advice = "use a smaller image"  # (always, for one larger than MAX_SOURCE_PIXELS)
        if spec.resize_or_crop != "none" and w * h <= MAX_SOURCE_PIXELS:
            advice = "use a smaller --loadSize or --fineSize, or a smaller image"
        elif w * h <= MAX_SOURCE_PIXELS:
            # The largest --loadSize whose scale_width size fits what is left beside the decoded files.
            fit = max(have - fixed, 0) / ((need - fixed) / (pw * ph))
            width = int(math.sqrt(fit * w / h)) // spec.size_base * spec.size_base
            if width >= spec.size_base:
                advice = f"use --resize_or_crop scale_width with --loadSize {width} (or less), or a smaller image"
        raise DatasetError(f"Image file {path} is {w}x{h} pixels, which --resize_or_crop {spec.resize_or_crop} "
                           f"processes at {pw}x{ph}: that needs about {need / _GiB:.1f} GiB of memory, and {who} "
                           f"has {have / _GiB:.1f} GiB; {advice}.")


def _rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def _zeros_like_hw(channels: int, hw, dtype) -> torch.Tensor:
    return torch.zeros((channels, hw[0], hw[1]), dtype=dtype)


def build_item(
    spec: DataSpec,
    label: Image.Image,
    inst: Optional[Image.Image],
    image: Optional[Image.Image],
    feat: Optional[Image.Image],
    rng: random.Random,
    path: str,
    label_nc: int,
    name: str,
) -> Dict[str, object]:
    """Transform one item's PIL images with one shared ``get_params`` draw into the item dict.

    Photos (and feature maps, and the input image when label_nc == 0) are converted to RGB
    before they are resized, as the original does: a palette or partly transparent image
    resized in its own mode would come out different.
    """
    params = get_params(spec, label.size, rng)
    if label_nc == 0:
        label_t = to_image_tensor(transform(_rgb(label), spec, params, nearest=False))
    else:
        label_t = to_label_tensor(transform(label, spec, params, nearest=True))
    hw = label_t.shape[-2:]
    inst_t = (to_instance_tensor(transform(inst, spec, params, nearest=True)) if inst is not None
              else _zeros_like_hw(1, hw, torch.int32))
    image_t = (to_image_tensor(transform(_rgb(image), spec, params, nearest=False)) if image is not None
               else _zeros_like_hw(3, hw, torch.float32))
    feat_t = (to_image_tensor(transform(_rgb(feat), spec, params, nearest=True)) if feat is not None
              else _zeros_like_hw(1, hw, torch.float32))
    return {"label": label_t, "inst": inst_t, "image": image_t, "feat": feat_t, "path": path, "name": name}


def label_id_map(img: Image.Image, path: str, label_nc: int) -> Image.Image:
    """``img`` as a single-channel map of ids in 0..label_nc-1, or DatasetError. A grey map saved as RGB (three
    equal channels) is its first channel, as the original reads it (its one-hot scatter sees the same id thrice)."""
    if img.mode == "RGB" and _grey(img):
        img = img.getchannel(0)
    if img.mode not in _LABEL_MODES:
        if img.mode == "RGBA" and _grey(img):
            raise DatasetError(f"Label map {path} holds its ids in three equal colour channels (PIL mode {img.mode}), "
                               f"but label maps must be single-channel; save it as one (PIL's .convert('L')).")
        raise _not_label_ids(path, img.mode, label_nc)
    low, high = img.getextrema()
    if low < 0 or high >= label_nc:
        bad = low if low < 0 else high
        ignore = (" (255 marks ignored pixels in Cityscapes' *_labelTrainIds.png: use its *_labelIds.png)"
                  if bad == 255 else "")
        raise DatasetError(
            f"Label map {path} contains id {bad}, outside 0..{label_nc - 1} for label_nc={label_nc}; check --label_nc"
            f"{ignore}."
        )
    return img


def _not_label_ids(path: str, mode: str, label_nc: int) -> DatasetError:
    return DatasetError(
        f"Label map {path} has PIL mode {mode}, but with label_nc={label_nc} label maps must hold one class id "
        f"per pixel (8- or 16-bit single channel, such as Cityscapes' *_labelIds.png, not its colour pictures "
        f"*_color.png); use such id maps, or --label_nc 0 to take RGB images as input."
    )


def _not_instance_ids(path: str, mode: str) -> DatasetError:
    return DatasetError(f"Instance map {path} has PIL mode {mode}, but instance maps must hold one id per pixel "
                        f"(8- or 16-bit single channel, such as Cityscapes' *_gtFine_instanceIds.png); use such maps.")


def _size_mismatch(index: int, label: tuple[str, tuple[int, int]], what: str, other: tuple[str, tuple[int, int]]):
    (label_path, (lw, lh)), (path, (w, h)) = label, other
    return DatasetError(f"Files of item {index} differ in size: label map {label_path} is {lw}x{lh} but {what} {path} "
                        f"is {w}x{h} (width x height must match).")


def _missing_folder_hint(spec: DataSpec, key: str) -> str:
    if key == "inst" and spec.train:
        return " (or pass --no_instance to train without instance maps)"
    if key == "inst":  # the run's opt.txt says no_instance False: its networks take a boundary map
        return " (the run was trained with instance maps, so it needs them here too)"
    if key == "label" and spec.label_nc == 0 and os.path.isdir(os.path.join(spec.dataroot, f"{spec.phase}_label")):
        return f" (it holds {spec.phase}_label/: label maps need --label_nc, the number of label classes)"
    root = os.path.normpath(str(spec.dataroot))
    if key == "label" and os.path.basename(root).endswith(("_label", "_img", "_inst", "_A", "_B")):
        return f" (--dataroot is the folder that holds {os.path.basename(root)}/: {os.path.dirname(root) or '.'})"
    return ""


def _refuse_jpeg_ids(files: List[str], what: str) -> None:
    """Ids saved as JPEG are changed along every edge by its lossy compression, into ids of other classes."""
    jpeg = next((f for f in files if f.lower().endswith((".jpg", ".jpeg"))), None)
    if jpeg is not None:
        raise DatasetError(f"{jpeg} is a JPEG, whose lossy compression changes the ids of {what} along every edge; "
                           f"use the original id maps saved as PNG.")


def _grey(img: Image.Image) -> bool:
    r, g, b = img.convert("RGB").split()
    return ImageChops.difference(r, g).getbbox() is None and ImageChops.difference(r, b).getbbox() is None


def _dataset_size(n: int, max_size) -> int:
    if max_size is None or (isinstance(max_size, float) and math.isinf(max_size)):
        return n
    return min(n, int(max_size))


class AlignedDataset(Dataset):
    """pix2pixHD's paired folder dataset; see the module docstring for layout and items."""

    def __init__(self, spec: DataSpec):
        self.spec = spec
        self.phase = spec.phase
        self.rng_seed = spec.seed
        self.epoch = 0
        self.label_nc = spec.label_nc
        self.root = str(spec.dataroot)
        self.load_image = spec.read_images
        self.load_instance = not spec.no_instance
        self.load_features = spec.load_features

        p = self.phase
        if self.label_nc == 0:
            label_dir, image_dir = (f"{p}_A", "input images"), (f"{p}_B", "photos")
        else:
            label_dir, image_dir = (f"{p}_label", "label maps"), (f"{p}_img", "photos")
        wanted = [("label", label_dir)]
        if self.load_image:
            wanted.append(("image", image_dir))
        if self.load_instance:
            wanted.append(("inst", (f"{p}_inst", "instance maps")))
        if self.load_features:
            wanted.append(("feat", (f"{p}_feat", "feature maps")))

        if not os.path.isdir(self.root):
            raise DatasetNotFoundError(f"Dataset root {self.root} does not exist or is not a folder (check --dataroot).")
        finish_interrupted_save(self.root)  # scenes the editor was saving into it when killed
        parts = [f"{name}/ ({what})" for _, (name, what) in wanted]
        layout = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        lists = {}
        for key, (name, what) in wanted:
            folder = os.path.join(self.root, name)
            if not os.path.isdir(folder):
                raise DatasetNotFoundError(
                    f"Folder {folder} ({what}) does not exist: for phase '{p}' with label_nc={self.label_nc} "
                    f"the dataset root {self.root} must contain {layout}" + _missing_folder_hint(spec, key) + "."
                )
            files = list_images(folder)
            if not files:
                raise DatasetError(f"Folder {folder} ({what}) holds no image files ({' '.join(IMAGE_EXTENSIONS)}).")
            if key == "inst" or (key == "label" and self.label_nc > 0):
                _refuse_jpeg_ids(files, what)
            lists[key] = (folder, files)
        counts = {len(files) for _, files in lists.values()}
        if len(counts) > 1:
            listing = ", ".join(f"{folder} has {len(files)}" for folder, files in lists.values())
            raise DatasetError(
                f"Dataset folders hold different numbers of image files ({listing}); each label map needs exactly "
                f"one file in every folder, paired by sorted path."
            )
        mismatch = unpaired(lists)
        if mismatch:
            raise DatasetError(mismatch)
        n = _dataset_size(counts.pop(), spec.max_dataset_size)
        self.label_folder = lists["label"][0]
        self.label_paths = lists["label"][1][:n]
        self.image_paths = lists["image"][1][:n] if "image" in lists else None
        self.inst_paths = lists["inst"][1][:n] if "inst" in lists else None
        self.feat_paths = lists["feat"][1][:n] if "feat" in lists else None

    def __len__(self) -> int:
        return len(self.label_paths)

    def check_headers(self) -> None:
        """Refuse, from the files' headers alone (no decoding: seconds for Cityscapes), what reading an item would
        refuse mid-epoch: an unreadable file, a map whose mode holds no ids, an item's files of different sizes, an
        image too large. (Ids out of range, and colour label maps saved as RGB, show only when decoded.)"""
        kinds = (("inst", self.inst_paths, "instance map"), ("image", self.image_paths, "photo"),
                 ("feat", self.feat_paths, "feature map"))
        for index, label_path in enumerate(self.label_paths):
            mode, size = read_header(label_path, self.spec)
            if self.label_nc > 0 and mode not in _LABEL_MODES + ("RGB", "RGBA"):  # (RGB ones may be grey: ids)
                raise _not_label_ids(label_path, mode, self.label_nc)
            for key, paths, what in kinds:
                if paths is not None:
                    other_mode, other_size = read_header(paths[index], self.spec)
                    if other_size != size:
                        raise _size_mismatch(index, (label_path, size), what, (paths[index], other_size))
                    if key == "inst" and other_mode not in _LABEL_MODES:
                        raise _not_instance_ids(paths[index], other_mode)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and flips the items get (see the module docstring)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> Dict[str, object]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"AlignedDataset index {index} out of range for {len(self)} items")
        label_path = self.label_paths[index]
        label = open_image(label_path, self.spec)
        if self.label_nc > 0:
            label = label_id_map(label, label_path, self.label_nc)
        others = {}
        for key, paths, what in (
            ("inst", self.inst_paths, "instance map"),
            ("image", self.image_paths, "photo"),
            ("feat", self.feat_paths, "feature map"),
        ):
            if paths is None:
                others[key] = None
                continue
            img = open_image(paths[index], self.spec)
            if img.size != label.size:
                raise _size_mismatch(index, (label_path, label.size), what, (paths[index], img.size))
            if key == "inst" and img.mode not in _LABEL_MODES:
                raise _not_instance_ids(paths[index], img.mode)
            others[key] = img
        rng = item_rng(self.rng_seed, self.epoch, index)
        name = Path(os.path.relpath(label_path, self.label_folder)).with_suffix("").as_posix()
        return build_item(self.spec, label, others["inst"], others["image"], others["feat"], rng, label_path,
                          self.label_nc, name)

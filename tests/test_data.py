"""fastp2phd.data: pix2pixHD transforms, the folder dataset, its errors, and the synthetic scenes."""
from __future__ import annotations

import itertools
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastp2phd.data import (
    CITYSCAPES_CLASSES,
    THING_CLASSES,
    AlignedDataset,
    DatasetError,
    SyntheticDataset,
    class_of_instance,
    colorize_labels,
    create_dataset,
    get_params,
    label_palette,
    make_synthetic,
    render_scene,
    transform,
)
from fastp2phd.data.folder import DatasetNotFoundError, item_rng
from fastp2phd.data.synthetic import scene_seed
from fastp2phd.data.transforms import to_image_tensor, to_instance_tensor, to_label_tensor
from fastp2phd.specs import DataSpec, ModelSpec

ROOT = Path(__file__).resolve().parents[1]


def make_opt(**overrides) -> DataSpec:
    """A DataSpec from option-style settings: isTrain (training: flips, photos), use_encoded_image
    (photos), and the generator's netG / n_downsample_global / n_local_enhancers (the size base)."""
    options = dict(resize_or_crop="none", loadSize=256, fineSize=128, no_flip=False, isTrain=True,
                   n_downsample_global=4, netG="global", n_local_enhancers=1, dataroot="synthetic", phase="train",
                   label_nc=35, no_instance=False, max_dataset_size=float("inf"), load_features=False,
                   use_encoded_image=False)
    options.update(overrides)
    model = ModelSpec(netG=options.pop("netG"), n_downsample_global=options.pop("n_downsample_global"),
                      n_local_enhancers=options.pop("n_local_enhancers"), label_nc=options["label_nc"],
                      no_instance=options["no_instance"], load_features=options["load_features"])
    train = options.pop("isTrain")
    read_images = train or options.pop("use_encoded_image")
    options.pop("use_encoded_image", None)
    for key in ("label_nc", "no_instance", "load_features"):
        options.pop(key)
    return DataSpec.for_model(model, train=train, read_images=read_images, **options)


def coordinate_images(w, h):
    """Label, instance and photo whose pixels encode their own (x, y)."""
    ys, xs = np.mgrid[0:h, 0:w]
    code = ys * w + xs  # < 65536 for the sizes used here
    inst = Image.fromarray(code.astype(np.uint16))
    label = Image.fromarray((code % 35).astype(np.uint8))
    photo = Image.fromarray(np.stack([xs % 256, ys, xs // 256], -1).astype(np.uint8))
    return label, inst, photo


def decode_photo(t):
    """(3, H, W) tensor in [-1, 1] -> (x, y) integer maps."""
    rgb = torch.round((t + 1) * 127.5).to(torch.int64)
    return rgb[0] + 256 * rgb[2], rgb[1]


def write_dataset(root, n=3, size=(40, 24), phase="train", label_ids=(0, 7, 26), with_image=True, with_inst=True):
    """A tiny Cityscapes-style folder; returns the folders."""
    w, h = size
    rs = np.random.RandomState(0)
    dirs = {"label": root / f"{phase}_label", "img": root / f"{phase}_img", "inst": root / f"{phase}_inst"}
    for kind, folder in dirs.items():
        if (kind == "img" and not with_image) or (kind == "inst" and not with_inst):
            continue
        folder.mkdir(parents=True)
        for i in range(n):
            if kind == "label":
                Image.fromarray(rs.choice(label_ids, (h, w)).astype(np.uint8)).save(folder / f"s{i}_labelIds.png")
            elif kind == "inst":
                Image.fromarray(rs.choice([7, 26000, 26001, 33000], (h, w)).astype(np.uint16)).save(folder / f"s{i}_instanceIds.png")
            else:
                Image.fromarray(rs.randint(0, 256, (h, w, 3)).astype(np.uint8)).save(folder / f"s{i}_leftImg8bit.png")
    return dirs


# ----------------------------------------------------------------------------- labels
def test_palettes_and_label_helpers():
    assert len(CITYSCAPES_CLASSES) == 35
    pal = label_palette(35)
    assert pal.shape == (35, 3) and pal.dtype == np.uint8
    assert tuple(pal[7]) == (128, 64, 128) and tuple(pal[26]) == (0, 0, 142) and tuple(pal[23]) == (70, 130, 180)
    assert [tuple(c) for c in pal] == [c for _, c in CITYSCAPES_CLASSES]
    voc = label_palette(300)
    assert voc.shape == (300, 3)
    assert [tuple(c) for c in voc[:5]] == [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128)]
    assert len({tuple(c) for c in voc}) == 300
    np.testing.assert_array_equal(label_palette(300), voc)  # deterministic

    labels = np.array([[0, 7], [26, 34]])
    rgb = colorize_labels(labels, 35)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[1, 0], (0, 0, 142))
    np.testing.assert_array_equal(colorize_labels(torch.from_numpy(labels), 35), rgb)
    with pytest.raises(ValueError, match="35"):
        colorize_labels(np.array([[35]]), 35)

    ids = np.array([7, 999, 26000, 26017, 33001], np.int32)
    np.testing.assert_array_equal(class_of_instance(ids), [7, 999, 26, 26, 33])
    t = class_of_instance(torch.from_numpy(ids))
    assert t.dtype == torch.int32 and t.tolist() == [7, 999, 26, 26, 33]
    assert THING_CLASSES == {24, 25, 26, 27, 28, 29, 30, 31, 32, 33}


# ----------------------------------------------------------------------------- transforms
@pytest.mark.parametrize(
    "mode, netG, expected",
    [
        ("resize_and_crop", "global", (128, 128)),
        ("crop", "global", (128, 128)),
        ("scale_width", "global", (256, 170)),  # int(256 * 200 / 300) = 170
        ("scale_width_and_crop", "global", (128, 128)),
        ("none", "global", (304, 192)),  # base 16: round(18.75) = 19 -> 304; round(12.5) = 12 -> 192
        ("none", "local", (288, 192)),  # base 32: round(9.375) = 9 -> 288; round(6.25) = 6 -> 192
    ],
)
def test_transform_sizes(mode, netG, expected):
    opt = make_opt(resize_or_crop=mode, netG=netG, loadSize=256, fineSize=128)
    img = Image.new("RGB", (300, 200))
    rng = random.Random(5)
    for _ in range(20):
        params = get_params(opt, img.size, rng)
        x, y = params["crop_pos"]
        new_w, new_h = {"resize_and_crop": (256, 256), "scale_width_and_crop": (256, 170)}.get(mode, (300, 200))
        assert 0 <= x <= max(0, new_w - 128) and 0 <= y <= max(0, new_h - 128)
        assert isinstance(params["flip"], bool)
        assert transform(img, opt, params, nearest=False).size == expected
        assert transform(img.convert("L"), opt, params, nearest=True).size == expected


def test_transform_size_edge_cases():
    params = {"crop_pos": (0, 0), "flip": False}
    # crop leaves images no larger than fineSize alone; scale_width leaves width == loadSize alone
    small = Image.new("L", (100, 90))
    assert transform(small, make_opt(resize_or_crop="crop", fineSize=128), params, True).size == (100, 90)
    img = Image.new("L", (256, 77))
    assert transform(img, make_opt(resize_or_crop="scale_width", loadSize=256), params, True) is img
    # 'none' keeps sizes already divisible; local with 2 enhancers uses base 64
    opt = make_opt(resize_or_crop="none", netG="local", n_local_enhancers=2, n_downsample_global=4)
    assert transform(Image.new("L", (1000, 500)), opt, params, True).size == (1024, 512)
    assert transform(Image.new("L", (640, 320)), make_opt(), params, True).size == (640, 320)
    # get_params draws only what the mode allows
    rng = random.Random(0)
    for _ in range(20):
        assert get_params(make_opt(resize_or_crop="scale_width"), (100, 50), rng)["crop_pos"] == (0, 0)
    with pytest.raises(ValueError, match="resize_or_crop"):
        get_params(make_opt(resize_or_crop="scale"), (10, 10), rng)


def test_none_rounds_to_what_the_encoder_takes_too_where_it_downsamples_more_than_g():
    # G1 with 2 downsamplings takes multiples of 4, the encoder's 4 need 16: rounding to 4 (the original's
    # base) gave 128x100, which the encoder cannot take, and 'use --resize_or_crop none' was the advice.
    model = ModelSpec(n_downsample_global=2, instance_feat=True, n_downsample_E=4)
    spec = DataSpec.for_model(model, resize_or_crop="none")
    size = transform(Image.new("L", (130, 100)), spec, {"crop_pos": (0, 0), "flip": False}, True).size
    assert size == (128, 96) and size[0] % model.size_multiple == size[1] % model.size_multiple == 0
    assert DataSpec.for_model(ModelSpec(n_downsample_global=2)).size_base == 4  # without E: the original's


@pytest.mark.parametrize("flip", [False, True])
def test_crop_and_flip_identical_for_label_instance_and_photo(flip):
    w, h = 300, 200
    label, inst, photo = coordinate_images(w, h)
    opt = make_opt(resize_or_crop="crop", fineSize=128, isTrain=True, no_flip=False)
    params = {"crop_pos": (37, 51), "flip": flip}
    lab = to_label_tensor(transform(label, opt, params, nearest=True))[0]
    ins = to_instance_tensor(transform(inst, opt, params, nearest=True))[0]
    img = to_image_tensor(transform(photo, opt, params, nearest=False))
    assert lab.shape == ins.shape == img.shape[1:] == (128, 128)
    ys, xs = torch.meshgrid(torch.arange(128), torch.arange(128), indexing="ij")
    src_x = 37 + (127 - xs if flip else xs)
    src_y = 51 + ys
    assert torch.equal(ins.long(), src_y * w + src_x)
    assert torch.equal(lab, (src_y * w + src_x) % 35)
    px, py = decode_photo(img)
    assert torch.equal(px, src_x) and torch.equal(py, src_y)
    # no flip at test time or with no_flip, whatever params say
    for off in (make_opt(resize_or_crop="crop", isTrain=False), make_opt(resize_or_crop="crop", no_flip=True)):
        ins2 = to_instance_tensor(transform(inst, off, params, nearest=True))[0]
        assert torch.equal(ins2.long(), src_y * w + 37 + xs)


@pytest.mark.parametrize("mode", ["resize_and_crop", "scale_width", "scale_width_and_crop", "none"])
def test_nearest_resampling_keeps_ids(mode):
    rs = np.random.RandomState(1)
    label = Image.fromarray(rs.choice([0, 7, 26, 33], (123, 211)).astype(np.uint8))
    inst = Image.fromarray(rs.choice([7, 26000, 33001, 40000], (123, 211)).astype(np.uint16))
    opt = make_opt(resize_or_crop=mode, loadSize=150, fineSize=64)
    params = get_params(opt, label.size, random.Random(3))
    lab = to_label_tensor(transform(label, opt, params, nearest=True))
    ins = to_instance_tensor(transform(inst, opt, params, nearest=True))
    assert lab.dtype == torch.int64 and ins.dtype == torch.int32
    assert set(lab.unique().tolist()) <= {0, 7, 26, 33}
    assert set(ins.unique().tolist()) <= {7, 26000, 33001, 40000}
    assert lab.shape[-2:] != (123, 211)  # it was really resampled
    assert len(ins.unique()) == 4  # and no id vanished


def test_image_tensor_scaling():
    img = Image.fromarray(np.array([[[0, 128, 255]]], np.uint8))
    t = to_image_tensor(img)
    assert t.shape == (3, 1, 1) and t.dtype == torch.float32
    assert t.flatten().tolist() == [-1.0, pytest.approx((128 / 255 - 0.5) / 0.5, abs=1e-6), 1.0]
    assert to_image_tensor(img.convert("L")).shape == (3, 1, 1)


def test_16bit_instance_ids_survive_png_round_trip(tmp_path):
    ids = np.array([[0, 7, 26000, 32767], [32768, 33001, 40000, 65535]], np.uint16)
    Image.fromarray(ids).save(tmp_path / "inst.png")
    with Image.open(tmp_path / "inst.png") as img:
        t = to_instance_tensor(img)
        assert t.dtype == torch.int32 and t.shape == (1, 2, 4)
        np.testing.assert_array_equal(t[0].numpy(), ids.astype(np.int32))
        np.testing.assert_array_equal(to_instance_tensor(img.convert("I"))[0].numpy(), ids.astype(np.int32))
    # and through the dataset, with a nearest resize
    write_dataset(tmp_path / "d", n=1, size=(40, 24))
    Image.fromarray(np.tile(ids, (12, 10))).save(tmp_path / "d" / "train_inst" / "s0_instanceIds.png")
    ds = AlignedDataset(make_opt(dataroot=str(tmp_path / "d"), resize_or_crop="scale_width", loadSize=80))
    inst = ds[0]["inst"]
    assert inst.shape == (1, 48, 80) and set(inst.unique().tolist()) == set(ids.ravel().tolist())


# ----------------------------------------------------------------------------- folder dataset
def test_aligned_dataset_items_and_shared_draw(tmp_path):
    w, h = 300, 200
    label, inst, photo = coordinate_images(w, h)
    root = tmp_path / "coords"
    for sub, img, name in (("train_label", label, "a.png"), ("train_inst", inst, "a.png"), ("train_img", photo, "a.png")):
        (root / sub / "city").mkdir(parents=True)  # files are found recursively
        img.save(root / sub / "city" / name)
    opt = make_opt(dataroot=str(root), resize_or_crop="crop", fineSize=128)
    ds = AlignedDataset(opt.replace(seed=11))
    seen_flips = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        item = ds[0]
        params = get_params(opt, (w, h), item_rng(11, epoch, 0))
        (x0, y0), flip = params["crop_pos"], params["flip"]
        seen_flips.add(flip)
        assert item["label"].dtype == torch.int64 and item["label"].shape == (1, 128, 128)
        assert item["inst"].dtype == torch.int32 and item["image"].dtype == torch.float32
        assert item["feat"].shape == (1, 128, 128) and not item["feat"].any()
        assert item["path"].endswith("a.png") and "train_label" in item["path"]
        xs = torch.arange(128)
        src_x = x0 + (127 - xs if flip else xs)
        code = item["inst"][0].long()
        assert torch.equal(code[0], y0 * w + src_x)
        assert torch.equal(item["label"][0], code % 35)
        px, py = decode_photo(item["image"])
        assert torch.equal(py * w + px, code)
    assert seen_flips == {False, True}


def test_photos_in_the_original_codes_file_types_are_read(tmp_path):
    # The original lists .jpg, .png, .ppm, .bmp and .tiff files (any case); a .ppm photo is read as it is.
    dirs = write_dataset(tmp_path, n=2, size=(64, 32), with_inst=False)
    for i, path in enumerate(sorted(dirs["img"].iterdir())):
        photo = Image.open(path)
        path.unlink()
        photo.save(dirs["img"] / f"s{i}_leftImg8bit.{'PPM' if i else 'ppm'}")
    item = AlignedDataset(make_opt(dataroot=str(tmp_path), resize_or_crop="none", no_instance=True, no_flip=True))[1]
    assert item["path"].endswith("s1_labelIds.png")
    assert torch.equal(item["image"], to_image_tensor(Image.open(dirs["img"] / "s1_leftImg8bit.PPM")))


def test_aligned_dataset_options(tmp_path):
    write_dataset(tmp_path, n=5, size=(40, 24), with_image=False, with_inst=False)
    # test phase, no instance maps, no photos: zeros of the documented shapes
    for sub in ("test_label",):
        (tmp_path / sub).mkdir()
        for i in range(2):
            Image.fromarray(np.full((24, 40), 7, np.uint8)).save(tmp_path / sub / f"{i}.png")
    opt = make_opt(dataroot=str(tmp_path), phase="test", isTrain=False, no_instance=True)
    ds = AlignedDataset(opt)
    assert len(ds) == 2
    item = ds[1]
    assert item["label"].shape == (1, 32, 32)  # 'none', base 16: round(2.5) = 2, round(1.5) = 2
    assert item["inst"].dtype == torch.int32 and item["inst"].shape == (1, 32, 32) and not item["inst"].any()
    assert item["image"].shape == (3, 32, 32) and not item["image"].any()
    # max_dataset_size truncates the sorted lists; phase argument overrides opt.phase
    ds = AlignedDataset(make_opt(dataroot=str(tmp_path), isTrain=False, no_instance=True, max_dataset_size=3, phase="train"))
    assert len(ds) == 3 and [p.rsplit("/", 1)[1] for p in ds.label_paths] == ["s0_labelIds.png", "s1_labelIds.png", "s2_labelIds.png"]
    # label_nc == 0: RGB inputs from train_A / train_B
    for sub in ("train_A", "train_B"):
        (tmp_path / sub).mkdir()
        Image.new("RGB", (32, 16), (255, 0, 0)).save(tmp_path / sub / "x.jpg")
    item = AlignedDataset(make_opt(dataroot=str(tmp_path), label_nc=0, no_instance=True))[0]
    assert item["label"].dtype == torch.float32 and item["label"].shape == (3, 16, 32)
    assert item["label"][0].min() > 0.95 and item["image"].shape == (3, 16, 32)
    # precomputed features (train_feat/) come back like photos, resampled NEAREST
    write_dataset(tmp_path / "f", n=2, size=(40, 24))
    (tmp_path / "f" / "train_feat").mkdir()
    for i in range(2):
        feat = np.zeros((24, 40, 3), np.uint8)
        feat[:, 20:] = (255, 0, 51)
        Image.fromarray(feat).save(tmp_path / "f" / "train_feat" / f"s{i}_feat.png")
    item = AlignedDataset(make_opt(dataroot=str(tmp_path / "f"), load_features=True, resize_or_crop="scale_width", loadSize=60))[1]
    assert item["feat"].shape == (3, 36, 60) and item["feat"].dtype == torch.float32
    assert set(item["feat"][0].unique().tolist()) == {-1.0, 1.0} and torch.allclose(item["feat"][2].unique(), torch.tensor([-1.0, -0.6]))
    # a DataLoader batches items
    ds = AlignedDataset(make_opt(dataroot=str(tmp_path), isTrain=False, no_instance=True))
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch["label"].shape == (2, 1, 32, 32) and len(batch["path"]) == 2


def test_set_epoch_reproducibility(tmp_path):
    write_dataset(tmp_path, n=4, size=(90, 70))
    opt = make_opt(dataroot=str(tmp_path), resize_or_crop="crop", fineSize=32)

    def epoch_items(ds, epoch, order=range(4)):
        ds.set_epoch(epoch)
        return {i: ds[i] for i in order}

    a = AlignedDataset(opt.replace(seed=3))
    e0, e1 = epoch_items(a, 0), epoch_items(a, 1)
    again = epoch_items(AlignedDataset(opt.replace(seed=3)), 1, order=[3, 1, 0, 2])  # fresh object, other order
    for i in range(4):
        assert all(torch.equal(e1[i][k], again[i][k]) for k in ("label", "inst", "image"))
    assert any(not torch.equal(e0[i]["inst"], e1[i]["inst"]) for i in range(4))
    other_seed = epoch_items(AlignedDataset(opt.replace(seed=4)), 1)
    assert any(not torch.equal(e1[i]["inst"], other_seed[i]["inst"]) for i in range(4))
    # the global RNGs play no part
    random.seed(123)
    torch.manual_seed(123)
    assert torch.equal(epoch_items(a, 1)[2]["image"], e1[2]["image"])


# ----------------------------------------------------------------------------- errors
def test_error_missing_folders(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="nowhere"):
        AlignedDataset(make_opt(dataroot=str(tmp_path / "nowhere")))
    write_dataset(tmp_path, n=2, with_inst=False)
    with pytest.raises(DatasetError, match="train_inst") as info:
        AlignedDataset(make_opt(dataroot=str(tmp_path)))
    assert isinstance(info.value, FileNotFoundError) and "train_label/" in str(info.value)
    with pytest.raises(DatasetError, match="test_label"):
        AlignedDataset(make_opt(dataroot=str(tmp_path), phase="test"))
    with pytest.raises(DatasetError, match="train_feat"):
        AlignedDataset(make_opt(dataroot=str(tmp_path), no_instance=True, load_features=True))


def test_error_empty_folder(tmp_path):
    write_dataset(tmp_path, n=2)
    for f in (tmp_path / "train_img").iterdir():
        f.unlink()
    (tmp_path / "train_img" / "notes.txt").write_text("not an image")
    with pytest.raises(DatasetError, match="train_img.*no image files"):
        AlignedDataset(make_opt(dataroot=str(tmp_path)))


def test_error_mismatched_counts(tmp_path):
    write_dataset(tmp_path, n=3)
    (tmp_path / "train_img" / "s2_leftImg8bit.png").unlink()
    with pytest.raises(DatasetError) as info:
        AlignedDataset(make_opt(dataroot=str(tmp_path)))
    message = str(info.value)
    assert "train_label has 3" in message and "train_img has 2" in message and "train_inst has 3" in message


def test_error_mismatched_sizes(tmp_path):
    write_dataset(tmp_path, n=2, size=(40, 24))
    Image.new("RGB", (40, 20)).save(tmp_path / "train_img" / "s1_leftImg8bit.png")
    ds = AlignedDataset(make_opt(dataroot=str(tmp_path)))
    ds[0]  # the good item loads
    with pytest.raises(DatasetError) as info:
        ds[1]
    message = str(info.value)
    assert "s1_labelIds.png" in message and "s1_leftImg8bit.png" in message and "40x24" in message and "40x20" in message


@pytest.mark.parametrize("victim", ["train_label/s1_labelIds.png", "train_img/s1_leftImg8bit.png", "train_inst/s1_instanceIds.png"])
def test_error_truncated_or_unreadable(tmp_path, victim):
    write_dataset(tmp_path, n=2, size=(64, 48))
    path = tmp_path / victim
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # header intact, pixel data cut
    ds = AlignedDataset(make_opt(dataroot=str(tmp_path)))
    ds[0]
    with pytest.raises(DatasetError, match=path.name):
        ds[1]
    path.write_bytes(b"this is not a PNG")
    with pytest.raises(DatasetError, match=path.name):
        ds[1]


def test_error_label_ids_out_of_range(tmp_path):
    write_dataset(tmp_path, n=2)
    bad = np.full((24, 40), 7, np.uint8)
    bad[3, 5] = 40
    Image.fromarray(bad).save(tmp_path / "train_label" / "s1_labelIds.png")
    ds = AlignedDataset(make_opt(dataroot=str(tmp_path)))
    ds[0]
    with pytest.raises(DatasetError) as info:
        ds[1]
    message = str(info.value)
    assert "s1_labelIds.png" in message and "40" in message and "--label_nc" in message
    bad[3, 5] = 255  # Cityscapes' train ids mark what they ignore 255
    Image.fromarray(bad).save(tmp_path / "train_label" / "s1_labelIds.png")
    with pytest.raises(DatasetError, match=r"id 255, .*; check --label_nc \(255 marks ignored pixels in Cityscapes' "
                                           r"\*_labelTrainIds\.png: use its \*_labelIds\.png\)\.$"):
        ds[1]
    # negative ids (a 32-bit TIFF label map), and RGB label maps where ids are expected
    neg = np.full((24, 40), 7, np.int32)
    neg[0, 0] = -1
    (tmp_path / "train_label" / "s1_labelIds.png").unlink()
    Image.fromarray(neg).save(tmp_path / "train_label" / "s1_labelIds.tif")
    with pytest.raises(DatasetError, match=r"s1_labelIds\.tif.*-1.*--label_nc"):
        AlignedDataset(make_opt(dataroot=str(tmp_path)))[1]
    Image.new("RGB", (40, 24), (7, 8, 9)).save(tmp_path / "train_label" / "s0_labelIds.png")
    with pytest.raises(DatasetError, match=r"s0_labelIds\.png.*mode RGB"):
        AlignedDataset(make_opt(dataroot=str(tmp_path)))[0]


def _in_subprocess(code: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter, so that a hang fails the test instead of blocking the run."""
    try:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout,
                              cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"hung for {timeout} s: {code}")


def test_linked_folders_that_loop_are_walked_once(tmp_path):
    folder = tmp_path / "test_label"
    (folder / "a").mkdir(parents=True)
    Image.new("L", (8, 8)).save(folder / "a" / "x.png")
    (folder / "a" / "loop").symlink_to("..")  # back up to test_label
    (folder / "a" / "self").symlink_to(".")
    (tmp_path / "more").mkdir()
    Image.new("L", (8, 8)).save(tmp_path / "more" / "y.png")
    (folder / "more").symlink_to(tmp_path / "more")  # a linked folder that is no loop is still read
    done = _in_subprocess(f"from fastp2phd.data.folder import list_images; print(*list_images({str(folder)!r}))")
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(folder / "a" / "x.png"), str(folder / "more" / "y.png")]


def test_a_fifo_named_like_an_image_is_refused_not_read(tmp_path):
    write_dataset(tmp_path, n=2)
    fifo = tmp_path / "train_label" / "s2_labelIds.png"
    os.mkfifo(fifo)
    code = (f"from fastp2phd.data.folder import DatasetError, list_images, open_image\n"
            f"for call in (list_images, open_image):\n"
            f"    try:\n        call({str(fifo.parent)!r} if call is list_images else {str(fifo)!r})\n"
            f"    except DatasetError as exc:\n        print(exc)\n")
    done = _in_subprocess(code)
    assert done.returncode == 0, done.stderr
    sentence = f"{fifo} is not a regular file (a FIFO): remove it from the dataset folder."
    assert done.stdout.splitlines() == [sentence, sentence]


def test_label_and_instance_maps_saved_as_jpeg_are_refused_before_reading(tmp_path):
    # JPEG turns the ids along every edge into other ids: some out of range, others silently another class.
    dirs = write_dataset(tmp_path, n=2)
    for path in sorted(dirs["inst"].iterdir())[1:]:
        Image.open(path).convert("L").save(path.with_suffix(".jpg"))
        path.unlink()
    with pytest.raises(DatasetError, match=r"s1_instanceIds\.jpg is a JPEG.*instance maps.*PNG"):
        AlignedDataset(make_opt(dataroot=str(tmp_path)))
    AlignedDataset(make_opt(dataroot=str(tmp_path), no_instance=True))  # photos may be JPEGs


def test_a_grey_label_map_saved_as_rgb_is_read_as_its_ids(tmp_path):
    """Three equal channels hold the ids, and the original reads them (its one-hot scatter sees each id thrice)."""
    write_dataset(tmp_path, n=1)
    expected = AlignedDataset(make_opt(dataroot=str(tmp_path)))[0]["label"]
    ids = np.array(Image.open(tmp_path / "train_label" / "s0_labelIds.png"))
    Image.fromarray(np.stack([ids] * 3, -1)).save(tmp_path / "train_label" / "s0_labelIds.png")
    assert Image.open(tmp_path / "train_label" / "s0_labelIds.png").mode == "RGB"
    assert torch.equal(AlignedDataset(make_opt(dataroot=str(tmp_path)))[0]["label"], expected)


@pytest.mark.parametrize("picture", ["colour", "grey"])
def test_a_colour_label_map_says_which_files_hold_ids(tmp_path, picture):
    write_dataset(tmp_path, n=1)
    ids = np.array(Image.open(tmp_path / "train_label" / "s0_labelIds.png"))
    # (A grey RGBA map: the original's scatter would read its alpha, 255, as an id.)
    colours = label_palette(35)[ids] if picture == "colour" else np.stack([ids] * 3 + [ids * 0 + 255], -1)
    Image.fromarray(colours.astype(np.uint8)).save(tmp_path / "train_label" / "s0_labelIds.png")
    with pytest.raises(DatasetError) as info:
        AlignedDataset(make_opt(dataroot=str(tmp_path)))[0]
    expected = ("*_labelIds.png, not its colour pictures *_color.png", "--label_nc 0") if picture == "colour" else (
        "three equal colour channels", "convert('L')")
    assert all(text in str(info.value) for text in expected), info.value
    shutil.move(tmp_path / "train_label" / "s0_labelIds.png", tmp_path / "train_inst" / "s0_instanceIds.png")
    Image.fromarray(ids).save(tmp_path / "train_label" / "s0_labelIds.png")
    with pytest.raises(DatasetError, match=r"Instance map .* mode RGB.*Cityscapes' \*_gtFine_instanceIds\.png\); use"):
        AlignedDataset(make_opt(dataroot=str(tmp_path)))[0]


def test_files_that_do_not_pair_up_by_name_are_refused(tmp_path):
    # Pairing is by sorted position: one missing instance map and one extra pair every scene with another's.
    dirs = write_dataset(tmp_path, n=3)
    (dirs["inst"] / "s0_instanceIds.png").rename(dirs["inst"] / "s3_instanceIds.png")
    with pytest.raises(DatasetError) as info:
        AlignedDataset(make_opt(dataroot=str(tmp_path)))
    message = str(info.value)
    assert "s0_labelIds.png would be paired with" in message and "s1_instanceIds.png" in message, message
    assert "has no file for s0 and has s3" in message, message
    # names of other schemes, with a suffix or in subfolders, pair as they are
    for i, path in enumerate(sorted(dirs["img"].iterdir())):
        path.rename(dirs["img"] / f"photo{i}.png")
    (dirs["inst"] / "s3_instanceIds.png").rename(dirs["inst"] / "s0_instanceIds.png")
    for folder in dirs.values():
        (folder / "city").mkdir()
        for path in folder.glob("*.png"):
            path.rename(folder / "city" / path.name)
    assert len(AlignedDataset(make_opt(dataroot=str(tmp_path)))) == 3


def test_a_missing_folder_says_what_fits_the_case(tmp_path):
    write_dataset(tmp_path, n=1, with_inst=False)
    with pytest.raises(DatasetError, match=r"\(or pass --no_instance to train without instance maps\)"):
        AlignedDataset(make_opt(dataroot=str(tmp_path)))
    with pytest.raises(DatasetError, match=r"the run was trained with instance maps, so it needs them here too"):
        AlignedDataset(make_opt(dataroot=str(tmp_path), isTrain=False))  # test: the model takes boundary maps
    with pytest.raises(DatasetError, match=r"it holds train_label/: label maps need --label_nc"):
        AlignedDataset(make_opt(dataroot=str(tmp_path), label_nc=0, no_instance=True))
    with pytest.raises(DatasetError, match=re.escape(f"(--dataroot is the folder that holds train_label/: {tmp_path})")):
        AlignedDataset(make_opt(dataroot=str(tmp_path / "train_label"), no_instance=True))


# ----------------------------------------------------------------------------- synthetic scenes
def test_render_scene_content():
    for (h, w), seeds in (((32, 64), range(40)), ((128, 256), range(12)), ((256, 512), range(3))):
        for seed in seeds:
            label, inst, image = render_scene(h, w, seed)
            assert label.shape == (h, w) and label.dtype == np.uint8
            assert inst.shape == (h, w) and inst.dtype == np.int32
            assert image.shape == (h, w, 3) and image.dtype == np.uint8
            np.testing.assert_array_equal(class_of_instance(inst), label)  # stuff carries its class id
            assert {7, 8, 23, 11}.issubset(set(np.unique(label).tolist()))
            assert label[0].tolist().count(23) > 0 and (label[-1] == 7).mean() > 0.3  # sky on top, road at the bottom
            ids = np.unique(inst)
            cars = [int(i) for i in ids if i >= 1000 and i // 1000 == 26]
            persons = [int(i) for i in ids if i >= 1000 and i // 1000 == 24]
            assert cars == list(range(26000, 26000 + len(cars))) and 2 <= len(cars) <= 6
            assert persons == list(range(24000, 24000 + len(persons))) and 1 <= len(persons) <= 4
            means = [image[inst == c].reshape(-1, 3).astype(float).mean(0) for c in cars]
            for a, b in itertools.combinations(means, 2):
                assert np.abs(a - b).max() > 15, f"cars of scene {seed} at {h}x{w} share a colour"


def test_render_scene_deterministic_and_seed_dependent():
    a = render_scene(64, 128, 7)
    b = render_scene(64, 128, 7)
    c = render_scene(64, 128, 8)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[2], c[2])
    assert scene_seed(0, "train", 0) != scene_seed(0, "test", 0) != scene_seed(1, "test", 0)


def test_render_speed():
    render_scene(256, 512, 0)
    start = time.perf_counter()
    for seed in range(5):
        render_scene(256, 512, seed)
    assert (time.perf_counter() - start) / 5 < 0.1


def test_make_synthetic_round_trip(tmp_path):
    out = make_synthetic(tmp_path / "syn", num_train=3, num_test=2, height=64, width=128, seed=5)
    assert out == tmp_path / "syn"
    assert sorted(p.name for p in (out / "train_inst").iterdir())[0] == "scene_00000_gtFine_instanceIds.png"
    assert sorted(p.name for p in (out / "test_img").iterdir()) == ["scene_00000_leftImg8bit.png", "scene_00001_leftImg8bit.png"]
    with Image.open(out / "train_inst" / "scene_00000_gtFine_instanceIds.png") as img:
        assert img.mode == "I;16"
    opt = make_opt(dataroot=str(out), resize_or_crop="none", no_flip=True)
    ds = AlignedDataset(opt)
    assert len(ds) == 3
    for i in range(3):
        label, inst, image = render_scene(64, 128, scene_seed(5, "train", i))
        item = ds[i]
        assert torch.equal(item["label"][0], torch.from_numpy(label).long())
        assert torch.equal(item["inst"][0], torch.from_numpy(inst))
        assert torch.equal(item["image"], to_image_tensor(Image.fromarray(image)))
        assert item["inst"].max() > 26000
    # with crops and flips, the folder and SyntheticDataset give the same items
    opt = make_opt(dataroot=str(out), resize_or_crop="crop", fineSize=48, phase="test")
    files, rendered = AlignedDataset(opt.replace(seed=5)), SyntheticDataset(opt.replace(seed=5), 2, size=(64, 128))
    for epoch in (0, 1):
        files.set_epoch(epoch)
        rendered.set_epoch(epoch)
        for i in range(2):
            x, y = files[i], rendered[i]
            assert all(torch.equal(x[k], y[k]) for k in ("label", "inst", "image", "feat"))
            assert x["path"].rsplit("/", 1)[1] == y["path"].rsplit("/", 1)[1]


def test_make_synthetic_never_loses_user_files(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not empty"):
        make_synthetic(target, num_train=1, num_test=1, height=32, width=64)
    assert (target / "notes.txt").read_text() == "keep me"
    make_synthetic(target, num_train=3, num_test=1, height=32, width=64, overwrite=True)
    (target / "train_img" / "my_photo.png").write_bytes(b"user data")
    make_synthetic(target, num_train=1, num_test=1, height=32, width=64, seed=1, overwrite=True)
    assert (target / "notes.txt").read_text() == "keep me"
    assert (target / "train_img" / "my_photo.png").read_bytes() == b"user data"
    assert sorted(p.name for p in (target / "train_label").iterdir()) == ["scene_00000_gtFine_labelIds.png"]


def test_create_dataset_synthetic():
    train = create_dataset(make_opt(dataroot="synthetic", phase="train", fineSize=128))
    test = create_dataset(make_opt(dataroot="synthetic", phase="test", isTrain=False, fineSize=128))
    assert isinstance(train, SyntheticDataset) and len(train) == 64 and len(test) == 16
    assert len(create_dataset(make_opt(dataroot="synthetic"), length=5)) == 5
    assert len(create_dataset(make_opt(dataroot="synthetic", synthetic_size=7))) == 7
    assert len(create_dataset(make_opt(dataroot="synthetic", max_dataset_size=3))) == 3
    item = train[0]
    assert item["label"].dtype == torch.int64 and item["label"].shape == (1, 64, 128)
    assert item["inst"].dtype == torch.int32 and item["inst"].shape == (1, 64, 128)
    assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 64, 128)
    assert -1 <= item["image"].min() < item["image"].max() <= 1
    assert item["feat"].dtype == torch.float32 and item["feat"].shape == (1, 64, 128)
    assert int(item["label"].max()) < 35 and item["inst"].max() >= 26000
    t = test[0]
    assert t["image"].shape == (3, 64, 128) and not t["image"].any()  # photos are not read at test time
    assert not torch.equal(t["label"], train[0]["label"])  # test scenes differ from train scenes
    # sizes that do not suit the generator fall back to 128x256; label_nc=0 gives RGB inputs
    odd = create_dataset(make_opt(dataroot="synthetic", fineSize=100, label_nc=0))
    assert odd[0]["label"].dtype == torch.float32 and odd[0]["label"].shape == (3, 128, 256)
    with pytest.raises(DatasetError, match="label_nc"):
        create_dataset(make_opt(dataroot="synthetic", label_nc=20))
    # a folder dataroot gives the folder dataset
    with pytest.raises(DatasetNotFoundError):
        create_dataset(make_opt(dataroot="/nonexistent/fastp2phd"))


def test_synthetic_dataset_epochs_and_transforms():
    opt = make_opt(resize_or_crop="scale_width_and_crop", loadSize=96, fineSize=32)
    ds = SyntheticDataset(opt.replace(seed=2), 4, size=(64, 128))
    first = [ds[i]["inst"] for i in range(4)]
    assert all(t.shape == (1, 32, 32) for t in first)
    ds.set_epoch(1)
    second = [ds[i]["inst"] for i in range(4)]
    assert any(not torch.equal(a, b) for a, b in zip(first, second))
    ds.set_epoch(0)
    assert all(torch.equal(a, ds[i]["inst"]) for i, a in enumerate(first))
    assert torch.equal(SyntheticDataset(opt.replace(seed=2), 4, size=(64, 128))[3]["inst"], first[3])
    with pytest.raises(IndexError):
        ds[4]

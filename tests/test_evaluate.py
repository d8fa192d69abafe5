"""`fastp2phd evaluate`: the Fréchet distance, KID, the FID Inception, the segmentation scores through the
command line with TorchScript "oracle" segmenters, and every bad input ending in one sentence."""
from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from fastp2phd.cli import main
from fastp2phd.data import CITYSCAPES_CLASSES
from fastp2phd.errors import EvaluationError
from fastp2phd.evaluate import (FID_WEIGHTS_NAME, FID_WEIGHTS_URL, IMAGENET_MEAN, IMAGENET_STD, TRAIN_LABEL_IDS,
                                FIDInceptionV3, fid_from_features, frechet_distance, kernel_inception_distance,
                                label_ids_to_train_ids)

# Cityscapes label ids used by the scenes below, and their train ids.
SKY, UNLABELED, SIDEWALK, ROAD, CAR = 23, 0, 8, 7, 26
ROAD_T, SIDEWALK_T = 0, 1
PALETTE = np.array([CITYSCAPES_CLASSES[i][1] for i in TRAIN_LABEL_IDS], np.uint8)  # 19 distinct colours


# ----------------------------------------------------------------------------- Fréchet distance and KID


def scipy_frechet(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's calculate_frechet_distance (scipy's general matrix square root), in float64."""
    from scipy import linalg

    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


@pytest.mark.parametrize("n_a, n_b, dims", [(200, 300, 8), (40, 60, 32), (5, 7, 16), (3, 3, 64)])
def test_frechet_distance_matches_scipy(n_a, n_b, dims):
    """Full-rank covariances, and rank-deficient ones (fewer samples than dimensions: fid_from_features then
    takes its low-rank route, frechet_distance on the statistics the eigendecompositions)."""
    pytest.importorskip("scipy")
    rng = np.random.default_rng(n_a + dims)
    mix = rng.normal(size=(dims, dims))
    a = rng.normal(size=(n_a, dims)) @ mix
    b = rng.normal(size=(n_b, dims)) @ mix * 1.3 + 0.5
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    expected = scipy_frechet(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7, abs=1e-7 * np.trace(s1 + s2))
    assert fid_from_features(a, b) == pytest.approx(expected, rel=1e-7, abs=1e-7 * np.trace(s1 + s2))


def test_frechet_distance_of_shifted_copies_is_the_squared_shift():
    """Equal covariances give tr sqrt(S S) = tr S, so only ||shift||^2 remains (also for singular S)."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(10, 50))  # rank 9
    shift = rng.normal(size=50)
    assert fid_from_features(a, a) == pytest.approx(0, abs=1e-9)
    assert fid_from_features(a, a + shift) == pytest.approx(float(shift @ shift), rel=1e-10)
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)  # the same through the D x D eigendecompositions
    assert frechet_distance(mu, sigma, mu + shift, sigma) == pytest.approx(float(shift @ shift), rel=1e-9)


def test_kid_against_a_hand_computed_case():
    """3 vs 3 points in 2-d, one subset of all 3: the unbiased MMD^2, in exact fractions."""
    x = [(0, 0), (1, 0), (0, 1)]
    y = [(1, 1), (2, 0), (0, 0)]

    def k(p, q):  # (p.q / d + 1)^3 with d = 2
        return (Fraction(p[0] * q[0] + p[1] * q[1], 2) + 1) ** 3

    m = 3
    kxx = sum(k(p, q) for i, p in enumerate(x) for j, q in enumerate(x) if i != j)  # 6 off-diagonal pairs
    kyy = sum(k(p, q) for i, p in enumerate(y) for j, q in enumerate(y) if i != j)
    kxy = sum(k(p, q) for p in x for q in y)  # all 9 pairs
    expected = kxx / (m * (m - 1)) + kyy / (m * (m - 1)) - 2 * kxy / (m * m)
    # By hand: x pairs all have dot 0, kxx = 2 * 3 * 1 = 6; y: (1,1).(2,0) = 2 -> 8, the others 1: kyy = 2 * 10 = 20;
    # kxy: (0,0) with y: 3 * 1; (1,0): dots 1, 2, 0 -> 27/8 + 8 + 1; (0,1): dots 1, 0, 0 -> 27/8 + 1 + 1; sum 83/4.
    # MMD^2 = 6/6 + 20/6 - 2 * (83/4) / 9 = -5/18 (the unbiased estimate can be negative).
    assert (kxx, kyy, kxy) == (6, 20, Fraction(83, 4)) and expected == Fraction(-5, 18)
    mean, std = kernel_inception_distance(np.array(x, float), np.array(y, float), subsets=1, subset_size=3)
    assert mean == pytest.approx(float(expected), rel=1e-12)
    assert std == 0.0
    # Subsets that are the whole sets in another order give the same value, so the spread is 0.
    mean5, std5 = kernel_inception_distance(np.array(x, float), np.array(y, float), subsets=5, subset_size=10)
    assert mean5 == pytest.approx(float(expected), rel=1e-12) and std5 == pytest.approx(0, abs=1e-12)


def test_label_ids_map_to_the_19_train_ids():
    ids = np.arange(-1, 40)
    train = label_ids_to_train_ids(ids)
    expected = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
                27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
    assert {int(i): int(t) for i, t in zip(ids, train) if t != 255} == expected
    assert label_ids_to_train_ids(np.array([255, 1000, 65535])).tolist() == [255, 255, 255]


# ----------------------------------------------------------------------------- a tiny dataset and segmenters


def scene_ids(kind: str) -> np.ndarray:
    """Label ids at the generated resolution, 8x16 (rows of 2 or 4)."""
    ids = np.zeros((8, 16), np.uint8)
    if kind == "a":
        ids[0:2], ids[2:4], ids[4:6], ids[6:8] = SKY, UNLABELED, SIDEWALK, ROAD
    else:
        ids[0:4], ids[4:8] = CAR, ROAD
    return ids


def painted(ids: np.ndarray) -> np.ndarray:
    """Each pixel in its train id's palette colour; ignored ids black."""
    train = label_ids_to_train_ids(ids)
    return np.where((train != 255)[..., None], PALETTE[np.minimum(train, 18)], 0).astype(np.uint8)


@pytest.fixture()
def scenes(tmp_path) -> tuple[Path, Path]:
    """A dataroot with label maps at 16x32 (2x2 blocks) and real photos, and a results folder with the
    scenes painted at 8x16, as `fastp2phd test` would name them."""
    root, results = tmp_path / "data", tmp_path / "results"
    for sub in ("test_label", "test_img"):
        (root / sub).mkdir(parents=True)
    (results / "images").mkdir(parents=True)
    for kind in ("a", "b"):
        ids = scene_ids(kind)
        big = np.repeat(np.repeat(ids, 2, 0), 2, 1)
        Image.fromarray(big).save(root / "test_label" / f"{kind}_gtFine_labelIds.png")
        Image.fromarray(painted(big)).save(root / "test_img" / f"{kind}_leftImg8bit.png")
        Image.fromarray(painted(ids)).save(results / "images" / f"{kind}_gtFine_labelIds_synthesized_image.png")
    return root, results


class Oracle(nn.Module):
    """Undoes the ImageNet normalisation, takes the nearest palette colour, and returns its train id
    (through ``remap``) as one-hot logits (N, classes, H, W)."""

    def __init__(self, remap, classes: int = 19):
        super().__init__()
        self.register_buffer("palette", torch.tensor(PALETTE, dtype=torch.float32).view(1, 19, 3, 1, 1))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.register_buffer("remap", torch.tensor(remap, dtype=torch.long))
        self.classes = classes

    def forward(self, x):
        rgb = (x * self.std + self.mean) * 255
        nearest = ((rgb.unsqueeze(1) - self.palette) ** 2).sum(2).argmin(1)
        return F.one_hot(self.remap[nearest], self.classes).permute(0, 3, 1, 2).float()


def save_oracle(path: Path, remap=tuple(range(19)), classes: int = 19) -> Path:
    torch.jit.script(Oracle(list(remap), classes)).save(str(path))
    return path


def evaluate(*argv) -> int:
    return main(["evaluate", "--no_progress", "--device", "cpu", *[str(a) for a in argv]])


def scores(folder: Path) -> dict:
    return json.loads((folder / "evaluation.json").read_text())


# ----------------------------------------------------------------------------- segmentation scores


def test_oracle_segmenter_scores_one(scenes, tmp_path, capsys):
    root, results = scenes
    assert evaluate("--results", results, "--dataroot", root, "--no_fid",
                    "--seg_model", save_oracle(tmp_path / "oracle.pt")) == 0
    report = scores(results)
    seg = report["segmentation"]
    assert seg["miou"] == 1.0 and seg["pixel_accuracy"] == 1.0
    present = {name for name, iou in seg["per_class_iou"].items() if iou is not None}
    assert present == {"road", "sidewalk", "sky", "car"}
    assert report["fid"] is None and report["images"] == 2
    protocol = report["protocol"]
    assert protocol["resolutions (width x height: images)"] == {"16x8": 2}
    assert "nearest neighbour" in protocol["segmentation"]["ground truth"]
    assert "0.485" in protocol["segmentation"]["input"]
    out = capsys.readouterr().out
    assert "| mIoU | 1.0000 |" in out and "| pixel accuracy | 1.0000 |" in out
    assert "| 13 | car | 1.0000 |" in (results / "evaluation.md").read_text()


def test_a_grey_label_map_saved_as_rgb_is_scored_as_its_ids(scenes, tmp_path):
    """As training reads it: the ids are in three equal channels."""
    root, results = scenes
    path = root / "test_label" / "a_gtFine_labelIds.png"
    ids = np.asarray(Image.open(path))
    Image.fromarray(np.stack([ids] * 3, -1)).save(path)
    assert evaluate("--results", results, "--dataroot", root, "--no_fid",
                    "--seg_model", save_oracle(tmp_path / "oracle.pt")) == 0
    assert scores(results)["segmentation"]["miou"] == 1.0


def test_segmenter_with_a_known_confusion(scenes, tmp_path):
    """Road predicted as sidewalk. Pixels scored at 8x16: scene a has sky 32, sidewalk 32, road 32 (and 32
    ignored), scene b car 64 and road 64. Road: 0 hits of 96 -> IoU 0; sidewalk: 32 hits, union 32 + 96 -> 0.25;
    sky and car 1. mIoU = (0 + 0.25 + 1 + 1) / 4 = 0.5625; accuracy = (32 + 32 + 64) / 224 = 4/7."""
    root, results = scenes
    remap = list(range(19))
    remap[ROAD_T] = SIDEWALK_T
    out = tmp_path / "report"
    assert evaluate("--results", results, "--dataroot", root, "--no_fid", "--out", out,
                    "--seg_model", save_oracle(tmp_path / "confused.pt", remap)) == 0
    seg = scores(out)["segmentation"]
    assert seg["per_class_iou"]["road"] == 0.0
    assert seg["per_class_iou"]["sidewalk"] == 0.25
    assert seg["per_class_iou"]["sky"] == 1.0 and seg["per_class_iou"]["car"] == 1.0
    assert seg["miou"] == pytest.approx(0.5625, abs=1e-12)
    assert seg["pixel_accuracy"] == pytest.approx(4 / 7, abs=1e-12)
    confusion = np.array(seg["confusion (rows: truth, columns: prediction)"])
    assert confusion[ROAD_T, SIDEWALK_T] == 96 and confusion.sum() == 224
    assert not (results / "evaluation.json").exists()


def test_a_torch_export_program_is_a_segmenter_too(scenes, tmp_path):
    root, results = scenes
    program = torch.export.export(Oracle(list(range(19))), (torch.zeros(1, 3, 8, 16),))
    torch.export.save(program, tmp_path / "oracle.pt2")
    assert evaluate("--results", results, "--dataroot", root, "--no_fid", "--seg_model", tmp_path / "oracle.pt2") == 0
    assert scores(results)["segmentation"]["miou"] == 1.0


def test_evaluate_with_name_runs_test_first(scenes, tmp_path):
    """--name generates the images with `test`'s code (an untrained tiny generator), then scores them."""
    from fastp2phd.pix2pixhd import Pix2PixHD
    from fastp2phd.specs import ModelSpec

    root, _ = scenes
    shutil.copytree(root / "test_label", root / "test_inst")  # instance maps: one instance per class
    torch.manual_seed(0)
    model = Pix2PixHD(ModelSpec(ngf=4, n_downsample_global=2, n_blocks_global=1))
    (tmp_path / "ck" / "run").mkdir(parents=True)
    torch.save(model.netG.state_dict(), tmp_path / "ck" / "run" / "latest_net_G.pth")
    assert evaluate("--name", "run", "--checkpoints_dir", tmp_path / "ck", "--dataroot", root, "--no_fid",
                    "--results_dir", tmp_path / "res", "--ngf", "4", "--n_downsample_global", "2",
                    "--n_blocks_global", "1", "--resize_or_crop", "none", "--nThreads", "0",
                    "--seg_model", save_oracle(tmp_path / "oracle.pt")) == 0
    folder = tmp_path / "res" / "run" / "test_latest"
    assert len(list((folder / "images").glob("*_synthesized_image.png"))) == 2
    report = scores(folder)
    assert report["images"] == 2 and 0 <= report["segmentation"]["pixel_accuracy"] <= 1
    assert report["protocol"]["resolutions (width x height: images)"] == {"32x16": 2}


# ----------------------------------------------------------------------------- FID with a random Inception


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory) -> Path:
    """A randomly initialised FID Inception saved as the weights file (no download). He initialisation keeps
    the activations' scale through its 90-odd layers (PyTorch's default init shrinks the pool3 features to
    ~1e-7, where every FID is ~0 and a test could not tell sets apart)."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    with torch.no_grad():
        features = net.eval()(torch.rand(4, 3, 299, 299))
    assert features.std(0).mean() > 1e-3  # noise images are told apart (default init: ~1e-8)
    path = tmp_path_factory.mktemp("fid") / FID_WEIGHTS_NAME
    torch.save(net.state_dict(), path)
    return path


def test_fid_of_identical_sets_is_zero(scenes, tmp_path, random_weights, capsys):
    root, results = scenes
    for real in sorted((root / "test_img").iterdir()):  # the real photos, under the generated names
        name = real.name.replace("_leftImg8bit", "_gtFine_labelIds_synthesized_image")
        shutil.copy(real, results / "images" / name)
    assert evaluate("--results", results, "--dataroot", root, "--fid_weights", random_weights,
                    "--kid_subset_size", "2") == 0
    report = scores(results)
    assert report["fid"] == pytest.approx(0, abs=1e-9)
    assert np.isfinite(report["kid"]["mean"]) and report["kid"]["subset_size"] == 2
    assert report["segmentation"] is None
    fid = report["protocol"]["fid"]
    assert fid["weights"] == str(random_weights) and "bicubic" in fid["real images"] and "299x299" in fid[
        "inception input"]
    assert "| FID | 0.000 |" in capsys.readouterr().out


def test_fid_of_different_sets_uses_the_hub_cache(scenes, tmp_path, random_weights, monkeypatch):
    """No --fid_weights: the file is found in torch's hub cache; generated and real images differ (the
    photos are 16x32, resized to 8x16 bicubic), so FID is positive."""
    root, results = scenes
    hub = tmp_path / "torch_home"
    (hub / "hub" / "checkpoints").mkdir(parents=True)
    shutil.copy(random_weights, hub / "hub" / "checkpoints" / FID_WEIGHTS_NAME)
    monkeypatch.setenv("TORCH_HOME", str(hub))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert evaluate("--results", results, "--dataroot", root, "--seg_model", save_oracle(tmp_path / "o.pt")) == 0
    report = scores(results)
    assert report["fid"] > 0.05 and report["segmentation"]["miou"] == 1.0  # (about 0.54; ~1e-14 with default init)
    assert report["protocol"]["fid"]["weights"] == str(hub / "hub" / "checkpoints" / FID_WEIGHTS_NAME)
    assert report["protocol"]["fid"]["real images"].startswith("resized to their generated image's size with PIL "
                                                               "bicubic (2 of 2")


def test_missing_fid_weights_say_where_to_put_them(scenes, tmp_path, monkeypatch, capsys):
    root, results = scenes
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    assert evaluate("--results", results, "--dataroot", root) == 1
    err = capsys.readouterr().err
    cache = tmp_path / "empty_home" / "hub" / "checkpoints"
    assert f"download them from {FID_WEIGHTS_URL} into {cache}/ or pass --fid_weights PATH" in err
    assert err.count("\n") == 1
    assert evaluate("--results", results, "--dataroot", root, "--fid_weights", tmp_path / "nope.pth") == 1
    assert f"--fid_weights {tmp_path / 'nope.pth'} does not exist; download {FID_WEIGHTS_NAME} from" in (
        capsys.readouterr().err)


@pytest.mark.parametrize("missing, words", [("results", "the results folder"), ("labels", "the label maps folder"),
                                            ("seg_model", "--seg_model"), ("run's labels", "the label maps folder")])
def test_a_missing_folder_is_reported_before_the_missing_fid_weights(missing, words, scenes, tmp_path, capsys):
    root, results = scenes  # and no FID weights anywhere
    argv = ["--results", results, "--dataroot", root, "--fid_weights", tmp_path / "nope.pth"]
    if missing == "results":
        argv[1] = tmp_path / "nowhere"
    elif missing == "labels":
        argv[3] = tmp_path / "nowhere"
    elif missing == "seg_model":
        argv += ["--seg_model", tmp_path / "nope.pt"]
    else:  # --name: before generating anything
        argv[:2] = ["--name", "run", "--checkpoints_dir", tmp_path / "ck", "--phase", "val"]
    assert evaluate(*argv) == 1
    err = capsys.readouterr().err
    assert words in err and "does not exist" in err and "nope.pth" not in err and err.count("\n") == 1, err


def test_wrong_fid_weights_are_one_sentence(scenes, tmp_path, capsys):
    root, results = scenes
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "w.pth")
    assert evaluate("--results", results, "--dataroot", root, "--fid_weights", tmp_path / "w.pth") == 1
    assert "is not the FID Inception weights file" in capsys.readouterr().err


def test_the_inception_matches_pytorch_fid(random_weights):
    """Same state_dict keys and features as pytorch-fid's network (where pytorch-fid and a torchvision that
    imports with this torch are installed; PyPI's Linux torchvision is a CUDA build that does not import next to
    a CPU-only torch)."""
    try:
        import pytorch_fid.inception as pi
    except Exception as exc:  # ImportError, or torchvision failing to register its ops
        pytest.skip(f"pytorch-fid does not import here ({type(exc).__name__})")
    state = torch.load(random_weights, weights_only=True)
    inner = pi._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    for name, block in (("Mixed_5b", pi.FIDInceptionA(192, 32)), ("Mixed_5c", pi.FIDInceptionA(256, 64)),
                        ("Mixed_5d", pi.FIDInceptionA(288, 64)), ("Mixed_6b", pi.FIDInceptionC(768, 128)),
                        ("Mixed_6c", pi.FIDInceptionC(768, 160)), ("Mixed_6d", pi.FIDInceptionC(768, 160)),
                        ("Mixed_6e", pi.FIDInceptionC(768, 192)), ("Mixed_7b", pi.FIDInceptionE_1(1280)),
                        ("Mixed_7c", pi.FIDInceptionE_2(2048))):
        setattr(inner, name, block)
    inner.load_state_dict(state)
    pi.fid_inception_v3, original = (lambda: inner), pi.fid_inception_v3  # their wrapper, without the download
    try:
        reference = pi.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    finally:
        pi.fid_inception_v3 = original
    ours = FIDInceptionV3().eval()
    ours.load_state_dict(state)
    x = torch.rand(2, 3, 40, 72, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x)[0].flatten(1), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- bad input, one sentence each


def test_a_state_dict_as_segmenter_is_refused(scenes, tmp_path, capsys):
    root, results = scenes
    torch.save(Oracle(list(range(19))).state_dict(), tmp_path / "weights.pth")
    assert evaluate("--results", results, "--dataroot", root, "--no_fid", "--seg_model", tmp_path / "weights.pth") == 1
    err = capsys.readouterr().err
    assert "is a state_dict (weights without the network's code), which cannot be run" in err
    assert "torch.jit.trace(model.eval(), torch.zeros(1, 3, H, W)).save(path)" in err


def test_wrong_number_of_classes_is_refused(scenes, tmp_path, capsys):
    root, results = scenes
    seg = save_oracle(tmp_path / "o20.pt", classes=20)
    assert evaluate("--results", results, "--dataroot", root, "--no_fid", "--seg_model", seg) == 1
    assert "returns 20 classes, but the scores are over the 19 Cityscapes train ids" in capsys.readouterr().err


def remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


@pytest.mark.parametrize("case, words", [
    ("no results", "the results folder"),
    ("empty results", "holds no *_synthesized_image.png images"),
    ("no labels", "the label maps folder"),
    ("no real images", "the real images folder"),
    ("one real image", "holds 1 images but"),
    ("unpaired real image", "label map {root}/test_label/a_gtFine_labelIds.png would be paired with"),
    ("one generated image", "holds 1 generated images but"),
    ("foreign name", "has no label map named c_gtFine_labelIds"),
    ("cropped", "another aspect ratio"),
    ("real size", "real image"),
    ("nothing to compute", "nothing to compute"),
    ("both", "not both"),
    ("synthetic", "--dataroot synthetic has no real images"),
    ("how_many 0", "0 images to score, and FID and KID need at least 2"),
    ("image to image", "holds image-to-image data (test_A, test_B: --label_nc 0), which evaluate does not score yet"),
    ("how_many 1", "1 image to score, and FID and KID need at least 2"),
])
def test_bad_input_is_one_sentence(scenes, tmp_path, random_weights, capsys, case, words):
    root, results = scenes
    images = results / "images"
    argv = ["--results", results, "--dataroot", root, "--fid_weights", random_weights]
    if case == "no results":
        argv[1] = tmp_path / "nowhere"
    elif case == "empty results":
        remove(images)
    elif case == "no labels":
        remove(root / "test_label")
    elif case == "no real images":
        remove(root / "test_img")
    elif case == "one real image":
        remove(root / "test_img" / "b_leftImg8bit.png")
    elif case == "unpaired real image":  # b's photo at a's position, c's (no label map) at b's
        (root / "test_img" / "a_leftImg8bit.png").rename(root / "test_img" / "c_leftImg8bit.png")
    elif case == "one generated image":
        remove(images / "b_gtFine_labelIds_synthesized_image.png")
    elif case == "foreign name":
        shutil.copy(images / "a_gtFine_labelIds_synthesized_image.png", images / "c_gtFine_labelIds_synthesized_image.png")
    elif case == "cropped":
        Image.new("RGB", (8, 8)).save(images / "a_gtFine_labelIds_synthesized_image.png")
    elif case == "real size":
        Image.new("RGB", (30, 16)).save(root / "test_img" / "a_leftImg8bit.png")
    elif case == "nothing to compute":
        argv.append("--no_fid")
    elif case == "both":
        argv += ["--name", "run"]
    elif case == "synthetic":
        argv[3] = "synthetic"
    elif case == "image to image":
        (root / "test_label").rename(root / "test_A")
        (root / "test_img").rename(root / "test_B")
    elif case.startswith("how_many"):
        argv += ["--how_many", case.split()[1]]
    assert evaluate(*argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastp2phd evaluate: ") and words.format(root=root) in err and err.count("\n") == 1, err
    assert not (results / "evaluation.json").exists()


def test_fewer_images_are_scored_with_how_many(scenes, tmp_path, random_weights, capsys):
    """The mismatched-count sentence names --how_many, which scores the first ones."""
    root, results = scenes
    remove(results / "images" / "b_gtFine_labelIds_synthesized_image.png")
    seg = save_oracle(tmp_path / "o.pt")
    assert evaluate("--results", results, "--dataroot", root, "--no_fid", "--seg_model", seg) == 1
    assert "or score the first ones with --how_many N" in capsys.readouterr().err
    assert evaluate("--results", results, "--dataroot", root, "--no_fid", "--seg_model", seg, "--how_many", "1") == 0
    assert scores(results)["images"] == 1


def test_scenes_in_subfolders_pair_with_the_images_test_wrote_under_their_path(tmp_path):
    """test_label/a/s.png and test_label/b/s.png: `test` writes images/a/s_... and images/b/s_..., and each
    pairs with its own label map and photo (they used to overwrite one another)."""
    from PIL import Image

    from fastp2phd.evaluate import pair_results

    for sub in "ab":
        for folder, mode in (("test_label", "L"), ("test_img", "RGB")):
            (tmp_path / "data" / folder / sub).mkdir(parents=True, exist_ok=True)
            Image.new(mode, (8, 4)).save(tmp_path / "data" / folder / sub / "s.png")
        (tmp_path / "results" / "images" / sub).mkdir(parents=True)
        Image.new("RGB", (8, 4)).save(tmp_path / "results" / "images" / sub / "s_synthesized_image.png")
    pairs = pair_results(tmp_path / "results", tmp_path / "data", "test")
    assert [(p.name, p.generated.parent.name, p.label.parent.name, p.real.parent.name) for p in pairs] == [
        ("a/s", "a", "a", "a"), ("b/s", "b", "b", "b")]


def test_confusion_matrix_counts_and_refuses_classes_out_of_range():
    from fastp2phd.evaluation_segmentation import confusion_matrix

    truth, prediction = np.array([[0, 1], [255, 2]]), np.array([[0, 2], [7, 2]])
    expected = np.zeros((3, 3), np.int64)
    expected[0, 0] = expected[1, 2] = expected[2, 2] = 1  # the ignored pixel (255) counts nowhere
    assert np.array_equal(confusion_matrix(truth, prediction, 3), expected)
    for truth, prediction, bad in (([0, 1], [0, 25], "prediction holds class 25"), ([0, 3], [0, 1], "truth holds class 3"),
                                   ([0, 1], [0, -1], "prediction holds class -1")):
        with pytest.raises(EvaluationError, match=f"confusion_matrix: {bad}, outside 0..2"):
            confusion_matrix(np.array(truth), np.array(prediction), 3)


def test_only_the_images_of_the_last_test_run_are_scored(tmp_path):
    """A rerun of `test` with a smaller --how_many (or after more training) leaves the earlier run's other images
    in its folder: the page says which images are this run's, so they are not scored with them. Names that the
    page's links quote (a space, '#') pair too."""
    import numpy as np
    from PIL import Image

    from fastp2phd.errors import EvaluationError
    from fastp2phd.evaluate import pair_results
    from fastp2phd.visualize import HTMLPage

    names = ["a b", "c#", "d"]
    for name in names:
        for folder, mode in (("test_label", "L"), ("test_img", "RGB")):
            (tmp_path / "data" / folder).mkdir(parents=True, exist_ok=True)
            Image.new(mode, (8, 4)).save(tmp_path / "data" / folder / f"{name}.png")
    results = tmp_path / "results"
    stale = HTMLPage(results, "an earlier run")
    stale.add_images({"synthesized_image": np.zeros((4, 8, 3), np.uint8)}, prefix="d")
    page = HTMLPage(results, "the last run")  # the page of the last run: two images
    for name in names[:2]:
        page.add_images({"synthesized_image": np.zeros((4, 8, 3), np.uint8)}, prefix=name)
    page.save()
    assert len(list((results / "images").glob("*_synthesized_image.png"))) == 3
    with pytest.raises(EvaluationError, match="the first missing: d_synthesized_image.png"):
        pair_results(results, tmp_path / "data", "test")
    assert [p.name for p in pair_results(results, tmp_path / "data", "test", how_many=2)] == names[:2]
    (results / "index.html").unlink()  # no page (images from elsewhere): every image in the folder is scored
    assert [p.name for p in pair_results(results, tmp_path / "data", "test")] == names

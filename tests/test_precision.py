"""Inference precision (``--precision fp32|bf16|fp16``): bf16 runs under autocast and stays within a
derived PSNR bound of fp32 on a trained model; fp16 on the CPU is refused in one sentence everywhere."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from support import psnr, psnr_floor

from fastp2phd.cli import main
from fastp2phd.data import create_dataset, make_synthetic
from fastp2phd.editing import EditSession
from fastp2phd.encode_features import encode_features
from fastp2phd.inference import load_run
from fastp2phd.specs import DataSpec, ModelSpec, TrainSpec
from fastp2phd.training import Trainer

H, W = 64, 128


@pytest.fixture(scope="module", params=["instance", "batch"])
def trained(request, tmp_path_factory):
    """A tiny pix2pixHD with instance features, trained for a few epochs, with its clusters."""
    root = tmp_path_factory.mktemp(f"precision_{request.param}")
    make_synthetic(root / "data", num_train=8, num_test=2, height=H, width=W, seed=3)
    model = ModelSpec(label_nc=35, instance_feat=True, feat_num=3, nef=8, n_downsample_E=2, n_clusters=2, ngf=8,
                      n_downsample_global=2, n_blocks_global=2, norm=request.param)

    def data(phase, train=False):
        return DataSpec.for_model(model, dataroot=str(root / "data"), phase=phase, resize_or_crop="none",
                                  train=train, read_images=True, seed=0)

    spec = TrainSpec(model=model, data=data("train", True), name="run", checkpoints_dir=str(root / "checkpoints"),
                     ndf=8, num_D=1, n_layers_D=2, no_vgg_loss=True, lambda_l1=10.0, lr=0.001, niter=4, niter_decay=0,
                     nThreads=0, batchSize=2, no_progress=True, print_freq=10**6, display_freq=10**6)
    Trainer(spec, torch.device("cpu")).run()
    folder = root / "checkpoints" / "run"
    encode_features(load_run(folder), data("train"), folder, batch_size=4, progress=False)
    return folder, create_dataset(data("test"))


def test_bf16_stays_within_the_derived_psnr_of_fp32(trained):
    folder, test_set = trained
    fp32, bf16 = load_run(folder), load_run(folder, precision="bf16")
    floor = psnr_floor(fp32)
    assert 25 < floor < 45  # the bound is meaningful for this depth (neither vacuous nor exactness)
    for i in range(len(test_set)):
        item = test_set[i]
        label, inst, real = (item[k].unsqueeze(0) for k in ("label", "inst", "image"))
        # Features encoded from the real image, and sampled from the clusters (a fresh generator per call).
        for features in (lambda: {"image": real}, lambda: {"generator": torch.Generator().manual_seed(i)}):
            expected = fp32.inference(label, inst, **features())
            got = bf16.inference(label, inst, **features())
            assert got.dtype == torch.float32 and got.shape == expected.shape
            assert not torch.equal(got, expected)  # it did run in bfloat16
            assert psnr(got, expected) >= floor
            # The per-call precision overrides the model's.
            assert torch.equal(bf16.inference(label, inst, precision="fp32", **features()), expected)


def test_bf16_runs_the_convolutions_in_bfloat16(trained):
    folder, test_set = trained
    model = load_run(folder, precision="bf16")
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
             for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    item = test_set[0]
    model.inference(item["label"][None], item["inst"][None], item["image"][None])
    for h in hooks:
        h.remove()
    assert seen and set(seen) == {torch.bfloat16}


def test_the_editor_honours_the_precision(trained):
    folder, test_set = trained
    item = test_set[0]
    fp32 = EditSession(load_run(folder), item["label"][0], item["inst"][0], seed=0)
    bf16 = EditSession(load_run(folder, precision="bf16"), item["label"][0], item["inst"][0], seed=0)
    a, b = fp32.image(), bf16.image()
    assert a.dtype == b.dtype == np.uint8 and not np.array_equal(a, b)
    floor = psnr_floor(fp32.model)
    assert psnr(torch.from_numpy(a) / 127.5 - 1, torch.from_numpy(b) / 127.5 - 1) >= floor - 1  # 8-bit rounding
    car = next(int(v) for v in torch.unique(item["inst"]) if 26000 <= int(v) < 27000)
    y, x = (int(c) for c in torch.nonzero(item["inst"][0] == car)[0])
    assert len(bf16.style_previews(y, x)) == len(fp32.style_previews(y, x)) > 0


def test_test_command_takes_the_precision(trained, tmp_path):
    folder, _ = trained
    common = ["--name", "run", "--checkpoints_dir", str(folder.parent), "--dataroot", str(folder.parents[1] / "data"),
              "--resize_or_crop", "none", "--results_dir", str(tmp_path), "--device", "cpu", "--no_progress"]
    images = {}
    for precision in ("fp32", "bf16"):
        assert main(["test", *common, "--precision", precision, "--results_dir", str(tmp_path / precision)]) == 0
        found = sorted((tmp_path / precision / "run").rglob("*synthesized_image.png"))
        assert len(found) == 2
        images[precision] = np.asarray(Image.open(found[0]), dtype=np.float64)
    assert not np.array_equal(images["fp32"], images["bf16"])


def test_fp16_on_the_cpu_is_refused_in_one_sentence(trained, capsys):
    folder, test_set = trained
    sentence = "fp16 inference needs a CUDA device (CPUs have no fast float16 convolutions): use --precision bf16"
    with pytest.raises(ValueError, match=r"fp16 inference needs a CUDA device"):
        load_run(folder, precision="fp16")
    item = test_set[0]
    with pytest.raises(ValueError, match=r"fp16 inference needs a CUDA device"):
        load_run(folder).inference(item["label"][None], item["inst"][None], item["image"][None], precision="fp16")
    with pytest.raises(ValueError, match=r"precision must be one of fp32, bf16, fp16, got 'fp8'"):
        load_run(folder, precision="fp8")
    run = ["--name", "run", "--checkpoints_dir", str(folder.parent), "--device", "cpu", "--precision", "fp16"]
    for command in (["test", "--dataroot", str(folder.parents[1] / "data")], ["edit"]):
        assert main([*command, *run]) == 1
        err = capsys.readouterr().err
        assert sentence in err and err.count("\n") == 1


def test_bf16_on_a_cpu_without_native_bf16_warns_that_it_is_emulated(trained, monkeypatch, tmp_path):
    folder, _ = trained
    monkeypatch.setattr("fastp2phd.diagnostics.cpu_bf16", lambda: None)
    with pytest.warns(UserWarning, match=r"this CPU has no native bfloat16 .* emulated and likely slower than fp32"):
        load_run(folder, precision="bf16")
    monkeypatch.setattr("fastp2phd.diagnostics.cpu_bf16", lambda: "AVX512-BF16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_run(folder, precision="bf16")
        load_run(folder)
    # On the command line the warning is one sentence, without a file and line (a process of its own, where
    # Python's own warning display runs rather than pytest's capture).
    run = ["test", "--name", "run", "--checkpoints_dir", str(folder.parent), "--dataroot",
           str(folder.parents[1] / "data"), "--resize_or_crop", "none", "--results_dir", str(tmp_path),
           "--no_progress", "--precision", "bf16"]
    code = ("import sys, fastp2phd.diagnostics as d; d.cpu_bf16 = lambda: None; from fastp2phd.cli import main; "
            f"sys.exit(main({run!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr.startswith("fastp2phd test: warning: this CPU has no native bfloat16")
    assert result.stderr.count("\n") == 1 and ".py:" not in result.stderr

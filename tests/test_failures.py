"""Every failure a sentence, and writes that keep what users share: unreadable run files for every command,
opt.txt values an option does not take, bad numbers, file modes, leftovers of killed writes, the loss log
after a resume, palette photos, and the losses' precision under autocast."""
from __future__ import annotations

import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastp2phd import ops
from fastp2phd.cli import main
from fastp2phd.data import AlignedDataset
from fastp2phd.features import save_clusters
from fastp2phd.files import TEMPORARY_SUFFIX, save_torch
from fastp2phd.inference import load_run
from fastp2phd.options import parse_command_line
from fastp2phd.models import GANLoss
from fastp2phd.pix2pixhd import InputSizeError, Pix2PixHD
from fastp2phd.specs import DataSpec, ModelSpec, SpecError
from support import TINY, TRAIN, copy_run, one_sentence, train_tiny_run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_tiny_run(tmp_path_factory.mktemp("run"))


def command(name, ck, data, *extra):
    argv = {"test": ["test", "--results_dir", str(ck.parent / "results")],
            "export-onnx": ["export-onnx", "--onnx", str(ck.parent / "g.onnx")],
            "encode-features": ["encode-features"],
            "edit": ["edit", "--port", "0"]}[name]
    return [*argv, "--name", "run", "--checkpoints_dir", str(ck), "--dataroot", str(data), "--device", "cpu",
            "--no_progress", *extra]


@pytest.mark.parametrize("name", ["test", "export-onnx", "encode-features", "edit"])
@pytest.mark.parametrize("damage", ["truncated", "empty", "unsafe"])
def test_an_unreadable_checkpoint_is_one_sentence_naming_it(name, damage, trained, tmp_path, capsys):
    ck, data = copy_run(trained, tmp_path)
    g = ck / "run" / "latest_net_G.pth"
    if damage == "truncated":
        g.write_bytes(g.read_bytes()[:2000])
    elif damage == "empty":
        g.write_bytes(b"")
    else:
        torch.save({"weight": torch.zeros(1), "code": os.system}, g)
    capsys.readouterr()
    assert main(command(name, ck, data)) == 1
    expected = ("holds Python objects besides tensors",) if damage == "unsafe" else ("truncated, damaged",)
    err = one_sentence(capsys, "latest_net_G.pth", *expected)
    if damage == "truncated":  # torch's first sentence, whole, without the advice it adds
        with pytest.raises(RuntimeError) as torch_error:
            torch.load(g, weights_only=True)
        assert f"({str(torch_error.value).split('. ')[0]}):" in err and "miniz" not in err, err


def test_opt_txt_values_are_checked(trained, tmp_path, capsys):
    ck, data = copy_run(trained, tmp_path)
    opt_txt = ck / "run" / "opt.txt"
    opt_txt.write_text(opt_txt.read_text().replace("netG: global", "netG: bogus"))
    capsys.readouterr()
    assert main(command("test", ck, data)) == 1
    one_sentence(capsys, "opt.txt says netG: 'bogus'", "global, local")
    with pytest.raises(SpecError, match="opt.txt does not describe a model .*netG must be one of global, local"):
        load_run(ck / "run")
    opt_txt.write_text(opt_txt.read_text().replace("netG: bogus", "netG: global").replace("ngf: 4", "ngf: four"))
    with pytest.raises(SpecError, match="opt.txt says ngf: 'four', which is not a valid value"):
        load_run(ck / "run")


def test_a_network_option_that_differs_from_opt_txt_is_a_warning(trained, capsys):
    ck, data = trained
    capsys.readouterr()
    assert main(command("test", ck, data, "--ngf", "8", "--n_clusters", "2")) == 1  # the checkpoint has ngf 4
    lines = capsys.readouterr().err.strip().split("\n")
    assert lines[0] == "fastp2phd test: warning: --ngf 8 overrides the run's opt.txt (ngf 4)"
    assert len(lines) == 2 and "ngf=4" in lines[1], lines  # then the mismatch, in one sentence
    main(command("export-onnx", ck, data, "--label_feat"))
    assert "warning: --label_feat overrides the run's opt.txt (label_feat False)\n" in capsys.readouterr().err


@pytest.mark.parametrize("trained_with, whole", [("crop", "none"), ("scale_width_and_crop", "scale_width"),
                                                  ("resize_and_crop", "resize")])
def test_a_run_trained_on_crops_generates_whole_scenes(trained_with, whole, trained, tmp_path, capsys):
    # The original's test.py crops only when told to: inheriting a training crop from opt.txt gave 32x32 pieces.
    ck, data = copy_run(trained, tmp_path)
    opt_txt = ck / "run" / "opt.txt"
    opt_txt.write_text(opt_txt.read_text().replace("resize_or_crop: none", f"resize_or_crop: {trained_with}")
                       .replace("fineSize: 512", "fineSize: 32").replace("loadSize: 1024", "loadSize: 64"))
    capsys.readouterr()
    assert parse_command_line(command("test", ck, data)).resize_or_crop == whole
    assert capsys.readouterr().err == (f"fastp2phd test: the run trained on crops (--resize_or_crop {trained_with}); "
                                       f"whole scenes are read with --resize_or_crop {whole} (pass --resize_or_crop "
                                       "to choose)\n")
    for given in (["--resize_or_crop", trained_with], [f"--resize={trained_with}"]):  # a flag (abbreviated too) wins
        assert parse_command_line(command("encode-features", ck, data, *given)).resize_or_crop == trained_with
        assert capsys.readouterr().err == ""
    if trained_with == "crop":
        assert main(command("test", ck, data)) == 0
        images = sorted((ck.parent / "results" / "run" / "test_latest" / "images").glob("*synthesized_image.png"))
        assert len(images) == 2 and all(Image.open(path).size == (64, 32) for path in images)


def test_the_original_codes_flags_run(trained, capsys):
    # Its scripts pass --gpu_ids, --data_type, --model, --use_dropout ...: each means what it meant there.
    ck, data = trained
    args = parse_command_line(command("test", ck, data, "--gpu_ids", "-1", "--data_type", "16", "--model", "pix2pixHD",
                                      "--use_dropout", "--display_winsize", "512", "--ntest", "inf"))
    assert args.device == "cpu" and args.precision == "fp16"
    args = parse_command_line(["train", "--gpu_ids", "-1", "--local_rank", "0", "--data_type", "32"])
    assert args.device == "cpu"
    capsys.readouterr()
    assert parse_command_line(command("test", ck, data, "--fp16")).precision == "fp32"  # train's flag: says so
    assert capsys.readouterr().err == ("fastp2phd test: note: --fp16 is a training option; inference runs in "
                                       "--precision fp32 (use --precision bf16 or fp16)\n")
    for argv, expected in (
            (["train", "--gpu_ids", "0,1"], "torchrun --nproc_per_node 2 -m fastp2phd train"),
            (["train", "--gpu_ids", "zero"], "is not a list of GPU ids"),
            (["train", "--gpu_ids", "-1", "--device", "cuda"], "disagree"),
            (["train", "--data_type", "16"], "train in mixed precision with --fp16"),
            (["memory", "--data_type", "16"], "train in mixed precision with --fp16"),  # (a training step's)
            (command("test", ck, data, "--data_type", "8"), "use --precision bf16 or fp16")):
        capsys.readouterr()
        assert main(argv) == 1
        one_sentence(capsys, expected)


def test_clusters_of_another_feature_width_are_refused_naming_the_file(trained, tmp_path, capsys):
    ck, data = copy_run(trained, tmp_path)
    clusters = ck / "run" / "features_clustered_002.npz"
    assert clusters.is_file()
    save_clusters(clusters, {7: np.zeros((2, 4), np.float32)})  # this run's features have 3 values (--feat_num)
    capsys.readouterr()
    assert main(command("test", ck, data)) == 1
    one_sentence(capsys, str(clusters), "have shape (2, 4)", "3 values (--feat_num)", "run `fastp2phd encode-features` to write it anew")


@pytest.mark.parametrize("flags, expected", [
    (["--output_nc", "1"], "the real photos are read as RGB, so output_nc must be 3 to train on them or encode them, not 1"),
    (["--label_nc", "0", "--input_nc", "1"], "with label_nc 0 the input images are read as RGB, so input_nc must be 3, not 1"),
])
def test_channel_counts_the_loader_cannot_give_are_refused_before_training(flags, expected, tmp_path, capsys):
    # (They failed at the first step with a size mismatch, or a sentence blaming --input_nc given correctly.)
    capsys.readouterr()
    assert main(["train", "--dataroot", "synthetic", "--checkpoints_dir", str(tmp_path), *TINY, *flags]) == 1
    one_sentence(capsys, expected)
    assert not any(tmp_path.iterdir())  # refused before the run folder is made


def test_export_onnx_leaves_the_callers_model_as_it_was(trained, tmp_path):
    from fastp2phd.inference import export_onnx

    model = load_run(trained[0] / "run")
    model.netG.train()  # (and on a GPU, its device: the export runs on the CPU)
    before = {k: v.clone() for k, v in model.netG.state_dict().items()}
    path, difference = export_onnx(model, tmp_path / "g.onnx")
    assert path.is_file() and difference is not None and difference < 1e-4
    assert model.netG.training and all(m.training for m in model.netG.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.netG.state_dict().items())


def test_load_run_without_opt_txt_takes_the_options(trained, tmp_path):
    ck, _ = copy_run(trained, tmp_path)
    (ck / "run" / "opt.txt").unlink()
    with pytest.raises(Exception, match="has no opt.txt: pass model=ModelSpec"):
        load_run(ck / "run")
    spec = ModelSpec(ngf=4, n_downsample_global=2, n_blocks_global=1, instance_feat=True, nef=4, n_downsample_E=2,
                     n_clusters=2)
    model = load_run(ck / "run", model=spec)
    assert model.netE is not None and model.clusters and not model.training


@pytest.mark.parametrize("argv, message", [
    (["edit", "--port", "99999"], "must be a port number, 0 to 65535"),
    (["make-synthetic", "--out", "x", "--height", "-5"], "must be a positive integer, got '-5'"),
    (["make-synthetic", "--out", "x", "--num_train", "-1"], "must be a non-negative integer, got '-1'"),
    (["train", "--label_nc", "abc"], "argument --label_nc: must be a non-negative integer, got 'abc'"),
    (["test", "--how_many", "all"], "argument --how_many: must be a non-negative integer or 'inf', got 'all'"),
    (["memory", "--size", "-128x256"], "expected one argument (a value starting with '-' must be written as --size="),
    (["train", "--netG", "huge"], "invalid choice: 'huge'"),
])
def test_bad_numbers_on_the_command_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_make_synthetic_refuses_scenes_too_small(tmp_path, capsys):
    assert main(["make-synthetic", "--out", str(tmp_path / "s"), "--height", "8"]) == 1
    one_sentence(capsys, "8")


@pytest.mark.parametrize("eps", [math.nan, math.inf, -1.0])
def test_instance_norm_act_refuses_eps_that_is_not_a_finite_non_negative_number(eps):
    with pytest.raises(ValueError, match="eps must be a finite number, 0 or more"):
        ops.instance_norm_act(torch.randn(1, 2, 3, 3), eps=eps)


def test_written_files_respect_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        save_torch({"x": torch.zeros(1)}, tmp_path / "a.pth")
        assert (tmp_path / "a.pth").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        save_torch({"x": torch.zeros(1)}, tmp_path / "b.pth")
        assert (tmp_path / "b.pth").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(previous)


def test_a_new_start_removes_leftovers_of_killed_writes_and_a_resume_forgets_replayed_log_lines(trained, tmp_path):
    ck, data = copy_run(trained, tmp_path)
    folder = ck / "run"
    leftover = folder / f".latest_train_state.pth.x1y2z3{TEMPORARY_SUFFIX}"
    leftover.write_bytes(b"half a train state")
    foreign = folder / ".notes.tmp"
    foreign.write_text("not ours")
    state_steps = torch.load(folder / "latest_train_state.pth", weights_only=True)["total_steps"]
    with open(folder / "loss_log.jsonl", "a") as f:  # steps logged after the last checkpoint, before a kill
        f.write(json.dumps({"epoch": 2, "epoch_iter": 2, "total_steps": state_steps + 2, "G_GAN": 1.0}) + "\n")
    with open(folder / "loss_log.txt", "a") as f:  # the same step in the original's format, and a note of the user's
        f.write("(epoch: 2, iters: 2, time: 0.100) G_GAN: 1.000\n=== resumed by hand ===\n")
    page = folder / "web" / "index.html"
    before = _page_rows(page)
    assert before and max(before) <= state_steps
    replayed = f'<h3>epoch 2, iteration 2</h3>\n<table><tr><td><img src="images/epoch002_iter{state_steps + 2}_x.png">'
    page.write_text(page.read_text().replace("\n</body>", "\n" + replayed + "</td></tr></table>\n</body>"))
    common = ["--name", "run", "--checkpoints_dir", str(ck), "--dataroot", str(data), *TINY]
    assert main(["train", *common, *TRAIN, "--niter", "2", "--continue_train", "--display_freq", "2"]) == 0
    # The page goes on with the rows it showed (it started empty), without the replayed step's row.
    after = _page_rows(page)
    assert after[:len(before)] == before and len(after) > len(before) and after == sorted(set(after))
    assert page.read_text().count("<h3>") == len(after)
    assert not leftover.exists() and foreign.exists()
    steps = [json.loads(line)["total_steps"] for line in (folder / "loss_log.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # no step logged twice
    text = (folder / "loss_log.txt").read_text()
    at = [tuple(map(int, m)) for m in re.findall(r"\(epoch: (\d+), iters: (\d+),", text)]
    assert at == sorted(at) and len(at) == len(set(at)) and (2, 2) in at and "=== resumed by hand ===\n" in text


def _page_rows(page) -> list[int]:
    """The total_steps of the training page's rows, in the page's order."""
    return [int(m) for m in re.findall(r'<img src="images/epoch\d+_iter(\d+)_input_label', page.read_text())]


def test_test_and_encode_features_remove_leftovers_of_their_killed_writes(trained, tmp_path):
    ck, data = copy_run(trained, tmp_path)
    web = ck.parent / "results" / "run" / "test_latest"
    planted = {web: ".index.html.abc", web / "images": ".x.png.abc", ck / "run": ".features.npz.abc"}
    for folder, stem in planted.items():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stem}{TEMPORARY_SUFFIX}").write_bytes(b"half a file")
        (folder / "notes.tmp").write_text("not ours")
    # A checkpoint a running `train` may be writing now into the run folder: encode-features leaves it.
    training = ck / "run" / f".latest_net_G.pth.x1y2z3{TEMPORARY_SUFFIX}"
    training.write_bytes(b"being written")
    assert main(command("test", ck, data, "--how_many", "1")) == 0
    assert main(command("encode-features", ck, data)) == 0
    for folder, stem in planted.items():
        assert not (folder / f"{stem}{TEMPORARY_SUFFIX}").exists() and (folder / "notes.tmp").exists(), folder
    assert training.exists()


@pytest.mark.parametrize("options", [dict(n_downsample_global=2, n_blocks_global=1),
                                     dict(n_downsample_global=2, n_blocks_global=0),
                                     dict(n_downsample_global=4, n_blocks_global=1),
                                     dict(netG="local", n_downsample_global=1, n_blocks_global=1),
                                     dict(netG="local", n_downsample_global=0, n_blocks_global=1, n_local_enhancers=2)])
def test_min_size_is_the_smallest_size_the_generator_takes(options):
    spec = ModelSpec(label_nc=3, no_instance=True, ngf=2, n_blocks_local=1, **options)
    net = Pix2PixHD(spec).eval()
    smallest, multiple = spec.min_size, spec.size_multiple
    label = torch.zeros(1, 1, smallest, smallest + multiple, dtype=torch.long)
    assert net.generate(label)[0].shape[-2:] == label.shape[-2:]
    if smallest > multiple:  # one multiple less: the reflection padding would fail, so check_size refuses it
        with pytest.raises(RuntimeError, match="[Pp]adding"):
            net.netG(net.encode_input(label[..., multiple:, :], None))
        with pytest.raises(InputSizeError, match=f"smaller than the {smallest}x{smallest}"):
            net.generate(label[..., multiple:, :])


def test_scenes_too_small_for_the_generator_are_one_sentence(trained, tmp_path, capsys):
    ck, _ = trained
    data = tmp_path / "small"
    for phase in ("train", "test"):  # 4x4 pixels: 1x1 at G's coarsest map, under its residual blocks' padding
        for folder, image in (("label", Image.new("L", (4, 4), 7)), ("inst", Image.new("L", (4, 4), 7)),
                              ("img", Image.new("RGB", (4, 4)))):
            (data / f"{phase}_{folder}").mkdir(parents=True)
            image.save(data / f"{phase}_{folder}" / "a.png")
    for name in ("test", "encode-features"):
        capsys.readouterr()
        assert main(command(name, ck, data)) == 1, name
        one_sentence(capsys, "a.png is 4x4 pixels", "smaller than the 8x8 this model needs", "--resize_or_crop")


@pytest.mark.parametrize("name", ["test", "export-onnx", "encode-features", "edit"])
def test_a_run_or_epoch_that_is_not_there_says_what_is(name, trained, capsys):
    ck, data = trained
    assert main(command(name, ck, data, "--which_epoch", "7")) == 1
    one_sentence(capsys, "7_net_G.pth does not exist: the run saved only 'latest'; pass --which_epoch latest")
    argv = command(name, ck, data)
    argv[argv.index("--name") + 1] = "rnu"  # a typo
    assert main(argv) == 1
    one_sentence(capsys, "rnu is not a run folder", f"({ck} holds the run run)")


def test_a_size_scale_width_cannot_make_says_why_and_names_the_file(tmp_path, capsys):
    # 130x100 scaled to width 64 is 64x49: --loadSize 64 is a multiple of 4, the height is not.
    data = tmp_path / "odd"
    for folder, image in (("label", Image.new("L", (130, 100), 7)), ("inst", Image.new("L", (130, 100), 7)),
                          ("img", Image.new("RGB", (130, 100)))):
        (data / f"train_{folder}").mkdir(parents=True)
        image.save(data / f"train_{folder}" / "a.png")
    argv = ["train", "--dataroot", str(data), "--checkpoints_dir", str(tmp_path / "ck"), *TINY, *TRAIN, "--batchSize", "1"]
    assert main([*argv, "--resize_or_crop", "scale_width"]) == 1
    one_sentence(capsys, "a.png is 64x49 pixels (width x height)", "not a multiple of 4",
                 "scale_width keeps the aspect ratio, so --loadSize sets only the width")
    assert main([*argv, "--name", "rounded"]) == 0  # TINY's --resize_or_crop none: 128x100, as the original


@pytest.mark.parametrize("package", ["onnxscript", "onnx"])
def test_export_onnx_without_its_optional_packages_says_which_extra_to_install(package, trained, tmp_path, capsys,
                                                                               monkeypatch):
    ck, data = copy_run(trained, tmp_path)
    monkeypatch.setitem(sys.modules, package, None)  # import fails as if not installed
    capsys.readouterr()
    assert main(command("export-onnx", ck, data)) == 1
    one_sentence(capsys, f"needs the {package} package", 'pip install "fastp2phd[onnx]"')
    assert not list(tmp_path.glob("*onnx*"))


def test_palette_and_transparent_photos_are_converted_before_resizing(tmp_path):
    """As the original: Image.open(path).convert('RGB'), then resize."""
    rng = np.random.default_rng(0)
    for sub in ("train_label", "train_img"):
        (tmp_path / sub).mkdir()
    Image.fromarray(rng.integers(0, 35, (40, 60), dtype=np.uint8)).save(tmp_path / "train_label" / "a.png")
    Image.fromarray(rng.integers(0, 35, (40, 60), dtype=np.uint8)).save(tmp_path / "train_label" / "b.png")
    palette = Image.fromarray(rng.integers(0, 16, (40, 60), dtype=np.uint8), mode="P")
    palette.putpalette(list(rng.integers(0, 256, 768, dtype=np.uint8)))
    palette.save(tmp_path / "train_img" / "a.png")
    rgba = rng.integers(0, 256, (40, 60, 4), dtype=np.uint8)
    rgba[..., 3] = rng.integers(0, 2, (40, 60)) * 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "train_img" / "b.png")
    spec = DataSpec(dataroot=str(tmp_path), resize_or_crop="scale_width", loadSize=30, read_images=True,
                    no_instance=True)
    dataset = AlignedDataset(spec)
    for index, name in enumerate(("a.png", "b.png")):
        expected = Image.open(tmp_path / "train_img" / name).convert("RGB").resize((30, 20), Image.BICUBIC)
        expected = torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.allclose(dataset[index]["image"], expected, atol=1e-6), name


def test_lsgan_loss_runs_in_float32_under_autocast_and_is_unchanged_in_float32():
    pred = torch.randn(2, 1, 7, 9)
    gan = GANLoss(use_lsgan=True)
    assert torch.equal(gan(pred, True), (pred - 1.0).pow(2).mean())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert gan(pred.bfloat16(), False).dtype == torch.float32

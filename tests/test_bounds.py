"""Input that would exhaust the memory is refused first, in a sentence: option values out of bounds (from a run's
opt.txt or a flag), an opt.txt that does not match its checkpoint (both before any network is built), and images
too large to decode or to process (from their headers, before they are decoded)."""
from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
from PIL import Image

from fastp2phd.cli import main
from fastp2phd.data import DatasetError
from fastp2phd.files import save_torch, write_text
from fastp2phd.inference import load_run
from fastp2phd.options import parse_command_line
from fastp2phd.pix2pixhd import Pix2PixHD
from fastp2phd.specs import RESIZE_OR_CROP_CHOICES, DataSpec, ModelSpec, SpecError, TrainSpec, recorded_options

GiB = 1024**3
SPEC = ModelSpec(ngf=8, n_downsample_global=2, n_blocks_global=1, n_clusters=2)


def make_run(folder, spec=SPEC):
    """A run folder as `train` leaves it (opt.txt and latest_net_G.pth), without the training."""
    folder.mkdir(parents=True)
    write_text(folder / "opt.txt", recorded_options(TrainSpec(model=spec, name=folder.name,
                                                              checkpoints_dir=str(folder.parent)).options()))
    model = Pix2PixHD(spec)
    save_torch(model.netG.state_dict(), folder / "latest_net_G.pth")
    if model.netE is not None:
        save_torch(model.netE.state_dict(), folder / "latest_net_E.pth")
    return folder


def edit_opt_txt(folder, **values):
    lines = [line if line.split(":")[0] not in values else f"{line.split(':')[0]}: {values[line.split(':')[0]]}"
             for line in (folder / "opt.txt").read_text().splitlines()]
    (folder / "opt.txt").write_text("\n".join(lines) + "\n")


def run_limited(argv, memory=4 * GiB, timeout=60):
    """The command line in a process of its own whose address space is limited to ``memory``: what a failing
    check would allocate stops there, not at the machine's memory. (exit status, stderr, seconds, peak RSS bytes)

    The peak is the process image's own (VmHWM): Linux carries ru_maxrss across fork and exec, so that would
    report the pytest parent's size (1.3 GB after the op tests) rather than the command's."""
    code = textwrap.dedent(f"""
        import re, resource, sys
        resource.setrlimit(resource.RLIMIT_AS, ({memory}, {memory}))
        from fastp2phd.cli import main
        status = main({argv!r})
        try:
            peak_kib = re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1)
        except OSError:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print("maxrss", peak_kib, file=sys.stderr)
        sys.exit(status)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=timeout)
    seconds = time.perf_counter() - start
    err, found, rss = done.stderr.rpartition("maxrss ")
    return done.returncode, (err if found else done.stderr).strip(), seconds, int(rss) * 1024 if found else 0


def one_sentence(err, *expected):
    assert "Traceback" not in err and err.count("\n") == 0, err
    for text in expected:
        assert text in err, err


@pytest.mark.parametrize("values, expected", [
    ({"n_downsample_global": 60}, "n_downsample_global must be in 0..8, got 60"),
    ({"n_blocks_global": 100000000}, "n_blocks_global must be in 0..64, got 100000000"),
    ({"ngf": 10**9}, "ngf must be in 1..1024, got 1000000000"),
    ({"ngf": 1024, "n_downsample_global": 7},
     "ngf 1024 with n_downsample_global 7 make G's widest layer 131072 channels, more than 4096"),
])
def test_an_opt_txt_with_a_network_larger_than_memory_is_refused_before_building(tmp_path, values, expected):
    """These grew to 20 GB (n_downsample_global 60), 7 GB (n_blocks_global 100000000) or crashed in the C++
    allocator (ngf 10**9) before: now the option set is checked first, in seconds and little memory."""
    folder = make_run(tmp_path / "ck" / "run")
    edit_opt_txt(folder, **values)
    argv = ["test", "--name", "run", "--checkpoints_dir", str(folder.parent), "--dataroot", str(tmp_path),
            "--device", "cpu", "--no_progress", "--results_dir", str(tmp_path / "results")]
    status, err, seconds, rss = run_limited(argv)
    assert status == 1, err
    one_sentence(err, f"fastp2phd test: {expected}", f"(from {folder / 'opt.txt'})")
    assert seconds < 30 and rss < GiB, (seconds, rss)
    with pytest.raises(SpecError, match=f"{folder / 'opt.txt'} does not describe a model .*{expected[:20]}"):
        load_run(folder)


def test_an_opt_txt_that_does_not_match_its_checkpoint_is_refused_before_building(tmp_path, capsys):
    """A plausible but wrong ngf (checkpoint 8, opt.txt 16) is said before the networks are built."""
    folder = make_run(tmp_path / "ck" / "run")
    edit_opt_txt(folder, ngf=16)
    argv = ["--name", "run", "--checkpoints_dir", str(folder.parent), "--dataroot", str(tmp_path), "--device", "cpu",
            "--no_progress"]
    expected = (f"{folder / 'opt.txt'} (with the flags given) does not match the checkpoint "
                f"{folder / 'latest_net_G.pth'}, which was saved with ngf=8 (not 16; pix2pixHD flag --ngf)")
    for command in (["test", "--results_dir", str(tmp_path / "results")], ["export-onnx"], ["edit", "--port", "0"]):
        capsys.readouterr()
        assert main([*command, *argv]) == 1
        one_sentence(capsys.readouterr().err.strip(), f"fastp2phd {command[0]}: {expected}")
    with pytest.raises(Exception, match="opt.txt does not match the checkpoint .*saved with ngf=8 .not 16"):
        load_run(folder)
    # The checkpoint's shapes are read, no network built: netG and the encoder are checked too.
    edit_opt_txt(folder, ngf=8, netG="local")
    with pytest.raises(Exception, match="saved with netG='global' .not 'local'; pix2pixHD flag --netG"):
        load_run(folder)
    features = make_run(tmp_path / "ck" / "features", SPEC.replace(instance_feat=True, nef=4, n_downsample_E=2))
    edit_opt_txt(features, nef=8)
    with pytest.raises(Exception, match="latest_net_E.pth, which was saved with ngf=4 .not 8; pix2pixHD flag --nef"):
        load_run(features)
    # A flag that sets it right is taken (opt.txt is read where no flag is given): test goes on to the data.
    edit_opt_txt(folder, netG="global", ngf=16)
    capsys.readouterr()
    assert main(["test", *argv, "--ngf", "8", "--results_dir", str(tmp_path / "results")]) == 1
    warning, error = capsys.readouterr().err.strip().split("\n")
    assert warning == "fastp2phd test: warning: --ngf 8 overrides the run's opt.txt (ngf 16)"
    one_sentence(error, "fastp2phd test: Folder", "test_label")


def test_a_flag_out_of_bounds_is_named_and_train_checks_too():
    status, err, seconds, rss = run_limited(["train", "--ngf", "4096", "--dataroot", "synthetic", "--device", "cpu"])
    assert status == 1
    one_sentence(err, "fastp2phd train: ngf must be in 1..1024, got 4096 (from --ngf)")
    with pytest.raises(SpecError, match=r"num_D must be in 1..8, got 100 \(from --num_D\)"):
        parse_command_line(["memory", "--num_D", "100"])
    with pytest.raises(SpecError, match="n_local_enhancers must be in 1..3, got 4"):
        ModelSpec(netG="local", n_local_enhancers=4)
    with pytest.raises(SpecError, match="loadSize must be in 1..16384, got 100000"):
        DataSpec(loadSize=100000)


def test_the_bounds_take_every_published_configuration():
    from fastp2phd.specs import check_bounds

    published = [  # pix2pixHD's scripts: 512p, 1024p (local), 2048p (two enhancers), features, and large variants
        dict(ngf=64, n_downsample_global=4, n_blocks_global=9),
        dict(netG="local", ngf=32, n_local_enhancers=1, n_blocks_local=3),
        dict(netG="local", ngf=32, n_local_enhancers=2),
        dict(instance_feat=True, nef=16, n_downsample_E=4, feat_num=3, n_clusters=10),
        dict(ngf=128, n_downsample_global=5, n_blocks_global=18, label_nc=182),
        dict(label_nc=0, input_nc=3, no_instance=True, ngf=256, n_downsample_global=4),
    ]
    for options in published:
        ModelSpec(**options)
        check_bounds({**options, "ndf": 64, "n_layers_D": 3, "num_D": 3, "loadSize": 2048, "fineSize": 1024})


@pytest.fixture(scope="module")
def large_scene(tmp_path_factory):
    """A run, and a test set of one 11000x11000 scene: label map, instance map and photo (zeros: 120 KB as PNG),
    under PIL's decompression-bomb error, so PIL only warns."""
    root = tmp_path_factory.mktemp("large")
    Image.new("L", (11000, 11000)).save(root / "big.png")
    for folder in ("test_label", "test_inst", "test_img"):
        (root / "data" / folder).mkdir(parents=True)
        shutil.copy(root / "big.png", root / "data" / folder / "a.png")
    return make_run(root / "ck" / "run"), root / "data"


def test_an_image_too_large_to_process_at_full_size_is_refused_before_it_is_decoded(large_scene):
    """`test --resize_or_crop none` on it reached 22 GB and was killed: now its header is read, the memory model
    estimates the step at that size, and the sentence comes in seconds with little memory."""
    run, data = large_scene
    argv = ["test", "--name", "run", "--checkpoints_dir", str(run.parent), "--dataroot", str(data), "--device", "cpu",
            "--no_progress", "--results_dir", str(data.parent / "results"), "--resize_or_crop", "none"]
    status, err, seconds, rss = run_limited(argv, memory=4 * GiB)
    assert status == 1, err
    one_sentence(err, f"fastp2phd test: Image file {data / 'test_label' / 'a.png'} is 11000x11000 pixels, which "
                      "--resize_or_crop none processes at 11000x11000: that needs about ",
                 " GiB of memory, and this machine has 4.0 GiB; use a smaller image.")
    assert seconds < 30 and rss < GiB, (seconds, rss)


def test_the_size_gate_says_which_load_size_fits_and_takes_large_images_it_resizes(large_scene, monkeypatch):
    from fastp2phd.data.folder import MAX_SOURCE_PIXELS, check_image_size, open_image
    from fastp2phd.memory import inference_bytes_per_pixel

    per_pixel = inference_bytes_per_pixel(SPEC, "cpu")  # the memory model: what G needs per pixel it generates
    assert 100 < per_pixel < 10_000
    monkeypatch.setattr("fastp2phd.data.folder.host_memory", lambda: 8 * GiB)
    none = DataSpec.for_model(SPEC, resize_or_crop="none", step_bytes_per_pixel=per_pixel)
    with pytest.raises(DatasetError, match=r"x.png is 6000x5000 pixels, which --resize_or_crop none processes at "
                                           r"6000x5000: that needs about .* GiB of memory, and this machine has 8.0 "
                                           r"GiB; use --resize_or_crop scale_width with --loadSize (\d+) \(or less\)"
                       ) as refused:
        check_image_size("x.png", (6000, 5000), none)
    load_size = int(refused.value.args[0].split("--loadSize ")[1].split()[0])
    scaled = none.replace(resize_or_crop="scale_width", loadSize=load_size)
    check_image_size("x.png", (6000, 5000), scaled)  # what it says to use is taken
    check_image_size("x.png", (7680, 4320), scaled.replace(loadSize=1024))  # 8K, resized: decoded, then resized
    check_image_size("x.png", (2048, 1024), none)  # Cityscapes at full size
    with pytest.raises(DatasetError, match="needs about .* GiB of memory, and the GPU has 1.0 GiB"):
        check_image_size("x.png", (4096, 2048), none.replace(step_device_memory=GiB))  # the step runs on a GPU
    # Beyond MAX_SOURCE_PIXELS nothing is decoded, whatever the mode, nor does PIL's warning come first.
    with pytest.raises(DatasetError, match="is 11000x11000 pixels, more than the 33.6 million fastp2phd decodes"):
        check_image_size("x.png", (11000, 11000), scaled.replace(loadSize=1024))
    _, data = large_scene
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DatasetError, match="a.png is 11000x11000 pixels, more than"):
            open_image(str(data / "test_img" / "a.png"), scaled.replace(loadSize=1024))
    assert MAX_SOURCE_PIXELS == 16 * 2048 * 1024


@pytest.mark.parametrize("mode", RESIZE_OR_CROP_CHOICES)
def test_processed_size_is_the_size_transform_makes(mode):
    from fastp2phd.data.transforms import get_params, processed_size, transform

    spec = DataSpec(resize_or_crop=mode, loadSize=40, fineSize=24, size_base=8)
    for size in ((60, 30), (30, 60), (40, 20), (20, 10), (17, 45)):
        params = get_params(spec, size, random.Random(0))
        assert transform(Image.new("L", size), spec, params, nearest=True).size == processed_size(spec, size), size


def test_train_refuses_an_image_whose_step_would_not_fit_before_training(tmp_path, monkeypatch, capsys):
    """With --resize_or_crop none the files decide a training step's size: train checks each image against the
    memory model's bytes per pixel of its step, as test does for generation."""
    import fastp2phd.data.folder as folder
    from fastp2phd.data import make_synthetic

    data = make_synthetic(tmp_path / "data", num_train=2, num_test=0, height=64, width=128, seed=1)
    argv = ["train", "--name", "run", "--checkpoints_dir", str(tmp_path / "ck"), "--dataroot", str(data),
            "--resize_or_crop", "none", "--ngf", "4", "--n_downsample_global", "2", "--n_blocks_global", "1",
            "--ndf", "4", "--n_layers_D", "2", "--no_vgg_loss", "--nThreads", "0", "--device", "cpu",
            "--no_progress", "--niter", "1", "--niter_decay", "0"]
    # The data alone (decoded files and item tensors: 64 B/px, 0.5 MiB here) fits; with the step it does not.
    monkeypatch.setattr(folder, "host_memory", lambda: 1 << 20)
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastp2phd train: Image file ") and "128x64 pixels" in err and "GiB of memory" in err, err
    assert "--resize_or_crop scale_width with --loadSize" in err and "\n" not in err
    assert not (tmp_path / "ck" / "run" / "latest_net_G.pth").exists()

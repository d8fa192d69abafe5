"""The command-line workflow on tiny synthetic data: train, resume, test, encode-features, export-onnx,
several processes, coarse-to-fine, and every bad input ending in one clear sentence."""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastp2phd.cli import main
from fastp2phd.data import make_synthetic
from fastp2phd.files import load_torch
from fastp2phd.train_step import ImagePool, learning_rate
from fastp2phd.training import EpochSampler

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--fineSize", "64", "--loadSize", "64", "--resize_or_crop", "none", "--ngf", "4", "--n_downsample_global", "2",
        "--n_blocks_global", "1", "--nThreads", "0", "--device", "cpu", "--no_progress"]
TINY_D = ["--ndf", "4", "--n_layers_D", "2", "--no_vgg_loss", "--batchSize", "2"]
FEATURES = ["--instance_feat", "--nef", "4", "--n_downsample_E", "2"]


@pytest.fixture(scope="module")
def dataroot(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("data") / "scenes", num_train=6, num_test=3, height=32, width=64, seed=3)


def run(*argv) -> int:
    return main([str(a) for a in argv])


def train_args(checkpoints, dataroot, *extra, name="run"):
    return ["train", "--name", name, "--checkpoints_dir", checkpoints, "--dataroot", dataroot, *TINY, *TINY_D, *extra]


def weights(path) -> dict:
    return load_torch(path)


def test_train_continue_test_encode_export(tmp_path, dataroot, capsys):
    ck = tmp_path / "ck"
    assert run(*train_args(ck, dataroot, *FEATURES, "--niter", "1", "--niter_decay", "1", "--print_freq", "2",
                           "--display_freq", "4")) == 0
    folder = ck / "run"
    for name in ("latest_net_G.pth", "latest_net_D.pth", "latest_net_E.pth", "latest_train_state.pth",
                 "loss_log.txt", "loss_log.jsonl", "opt.txt", "iter.txt", "web/index.html"):
        assert (folder / name).is_file(), name
    lines = [json.loads(line) for line in (folder / "loss_log.jsonl").read_text().splitlines()]
    assert lines and all(np.isfinite([row[k] for k in ("G_GAN", "G_GAN_Feat", "D_real", "D_fake")]).all() for row in lines)
    assert "synthesized_image" in (folder / "web" / "index.html").read_text()
    # Plain state_dicts under the original names: loadable with weights_only and strict keys.
    g = weights(folder / "latest_net_G.pth")
    assert all(isinstance(v, torch.Tensor) for v in g.values()) and "model.1.weight" in g
    state = weights(folder / "latest_train_state.pth")  # two epochs done: the third is next, as iter.txt says
    assert (state["epoch"], state["epoch_iter"]) == (3, 0) and (folder / "iter.txt").read_text() == "3,0\n"

    # Continue for one more epoch: starts at epoch 3, weights move.
    assert run(*train_args(ck, dataroot, *FEATURES, "--niter", "2", "--niter_decay", "1", "--continue_train")) == 0
    assert "resuming from" in capsys.readouterr().out
    state = weights(folder / "latest_train_state.pth")
    assert (state["epoch"], state["epoch_iter"]) == (4, 0)
    assert not torch.equal(weights(folder / "latest_net_G.pth")["model.1.weight"], g["model.1.weight"])

    common = ["--name", "run", "--checkpoints_dir", ck, "--dataroot", dataroot, *TINY, *FEATURES]
    assert run("encode-features", *common, "--n_clusters", "2") == 0
    clusters = np.load(folder / "features_clustered_002.npz", allow_pickle=False)
    assert any(key.startswith("class_") for key in clusters.files)
    # Only classes with an instance above the area threshold are clustered; --area_threshold 0 keeps them all.
    features = np.load(folder / "features.npz", allow_pickle=False)
    for threshold in (0.5, 0.0):
        if threshold == 0.0:
            assert run("encode-features", *common, "--n_clusters", "2", "--area_threshold", "0") == 0
        clusters = np.load(folder / "features_clustered_002.npz", allow_pickle=False)
        expected = {k for k in features.files if k.startswith("class_") and (features[k][:, -1] > threshold).any()}
        assert {k for k in clusters.files if k.startswith("class_")} == expected
    assert expected > {k for k in features.files if k.startswith("class_") and (features[k][:, -1] > 0.5).any()}
    results = tmp_path / "results"
    assert run("test", *common, "--n_clusters", "2", "--results_dir", results, "--how_many", "2") == 0
    images = sorted((results / "run" / "test_latest" / "images").glob("*synthesized_image.png"))
    assert len(images) == 2 and Image.open(images[0]).size == (64, 32)
    assert run("test", *common, "--use_encoded_image", "--results_dir", results, "--how_many", "inf") == 0
    assert len(list((results / "run" / "test_latest" / "images").glob("*synthesized_image.png"))) == 3

    pytest.importorskip("onnxruntime")
    assert run("export-onnx", *common, "--onnx", tmp_path / "g.onnx") == 0
    out = capsys.readouterr().out
    difference = float(out.split("largest difference from PyTorch ")[1].split()[0])
    assert (tmp_path / "g.onnx").is_file() and difference < 1e-4


def test_resume_is_exact(tmp_path, dataroot):
    """Two epochs in one go equal one epoch, a stop, and --continue_train for the second."""
    args = ["--niter", "1", "--niter_decay", "1", "--pool_size", "2", *FEATURES]
    assert run(*train_args(tmp_path / "a", dataroot, *args)) == 0
    first = ["--niter", "1", "--niter_decay", "0", "--pool_size", "2", *FEATURES]
    assert run(*train_args(tmp_path / "b", dataroot, *first)) == 0
    assert run(*train_args(tmp_path / "b", dataroot, *args, "--continue_train")) == 0
    for key in ("G", "D", "E"):
        a, b = weights(tmp_path / "a" / "run" / f"latest_net_{key}.pth"), weights(tmp_path / "b" / "run" / f"latest_net_{key}.pth")
        assert all(torch.equal(a[k], b[k]) for k in a), key
    counts = [json.loads((tmp_path / run_name / "run" / "classes.json").read_text()) for run_name in "ab"]
    assert counts[0] == counts[1] and sum(counts[0]["pixels"]) == 2 * 6 * 32 * 64  # two epochs of 6 scenes


class _Stop(Exception):
    pass


def _trainer(folder, dataroot, stop_at: int | None = None):
    """A Trainer of a two-epoch run with features and an image pool; ``stop_at``: it stops (raises _Stop) once
    that many images are done."""
    from fastp2phd.cli import build_parser
    from fastp2phd.options import finish_options, train_spec
    from fastp2phd.training import Trainer

    class Stopping(Trainer):
        def update(self, batch):
            if self.position.total_steps == stop_at:
                raise _Stop
            return super().update(batch)

    argv = train_args(folder, dataroot, "--niter", "1", "--niter_decay", "1", "--pool_size", "2", *FEATURES)
    return Stopping(train_spec(finish_options(build_parser().parse_args([str(a) for a in argv]), is_train=True)),
                    torch.device("cpu"))


def _assert_equal(a, b, where="state"):
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("stop_at", [6, 8], ids=["after epoch 1", "within epoch 2"])
def test_a_trainer_resumes_bit_for_bit_through_its_state_dict(tmp_path, dataroot, stop_at):
    """A run stopped after ``stop_at`` images, its Trainer.state_dict through a file into a fresh Trainer, and
    the rest of the run there, ends with the state of the run done in one go: every part of it, the weights,
    the optimisers, the image pool and the class counts, bit for bit."""
    from fastp2phd.files import save_torch

    straight = _trainer(tmp_path / "straight", dataroot)
    straight.run()
    stopped = _trainer(tmp_path / "stopped", dataroot, stop_at=stop_at)
    with pytest.raises(_Stop):
        stopped.run()
    save_torch(stopped.state_dict(), tmp_path / "state.pth")
    assert (stopped.position.epoch, stopped.position.total_steps) == (1 + stop_at // 6, stop_at)
    torch.manual_seed(1)
    resumed = _trainer(tmp_path / "resumed", dataroot)
    resumed.load_state_dict(load_torch(tmp_path / "state.pth"))
    resumed.run()
    a, b = straight.state_dict(), resumed.state_dict()
    # (The data loader draws a seed from the random state for each pass over the data it starts: the resumed
    # run starts one pass more. Nothing in a step draws from it.)
    a.pop("torch_rng"), b.pop("torch_rng")
    _assert_equal(a, b)
    assert len(a["pools"][0]["images"]) == 2 and a["total_steps"] == 12


def test_killed_run_resumes_at_the_saved_iteration(tmp_path, dataroot):
    ck = tmp_path / "ck"
    argv = [sys.executable, "-m", "fastp2phd", *map(str, train_args(ck, dataroot, "--niter", "50", "--niter_decay", "0",
                                                                      "--save_latest_freq", "4", "--batchSize", "1"))]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    state_path = ck / "run" / "latest_train_state.pth"
    deadline = time.time() + 240
    while time.time() < deadline and not (state_path.is_file() and weights(state_path)["epoch"] >= 2):
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    state = weights(state_path)  # the last checkpoint is intact after the kill
    epoch, epoch_iter = state["epoch"], state["epoch_iter"]
    assert epoch >= 2
    # Resume, training only to the end of the next epoch.
    resumed = [str(epoch + 1) if arg == "50" else arg for arg in argv] + ["--continue_train"]
    result = subprocess.run(resumed, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"at epoch {epoch}, iteration {epoch_iter}" in result.stdout, result.stdout
    first_epoch = epoch + 1 if epoch_iter >= 6 else epoch  # a checkpoint at an epoch's end starts the next one
    assert f"epochs {first_epoch}..{epoch + 1}" in result.stdout
    assert (weights(state_path)["epoch"], weights(state_path)["epoch_iter"]) == (epoch + 2, 0)


def test_two_processes_with_gloo(tmp_path, dataroot):
    ck = tmp_path / "ck"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
               "-m", "fastp2phd", *map(str, train_args(ck, dataroot, "--niter", "1", "--niter_decay", "0",
                                                         "--pool_size", "2", "--print_freq", "2"))]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    assert result.stdout.count("training run:") == 1  # only rank 0 speaks and writes
    state = weights(ck / "run" / "latest_train_state.pth")
    assert state["world"] == 2 and (state["epoch"], state["epoch_iter"]) == (2, 0)
    # Every process's image pool is kept, each holding the fakes that process saw.
    assert len(state["pools"]) == 2 and all(len(pool["images"]) == 2 for pool in state["pools"])
    assert not torch.equal(state["pools"][0]["images"][0], state["pools"][1]["images"][0])
    logged = [json.loads(line) for line in (ck / "run" / "loss_log.jsonl").read_text().splitlines()]
    assert logged and all(np.isfinite(row["G_GAN"]) for row in logged)
    # The classes both processes trained on, each pixel counted once.
    assert sum(json.loads((ck / "run" / "classes.json").read_text())["pixels"]) == 6 * 32 * 64


def test_coarse_to_fine(tmp_path, dataroot, capsys):
    ck = tmp_path / "ck"
    assert run(*train_args(ck, dataroot, "--niter", "1", "--niter_decay", "0", "--ngf", "8", name="global")) == 0
    g1 = weights(ck / "global" / "latest_net_G.pth")
    local = ["--netG", "local", "--ngf", "4", "--n_local_enhancers", "1", "--n_blocks_local", "1",
             "--load_pretrain", ck / "global", "--niter_fix_global", "1", "--num_D", "3"]
    assert run(*train_args(ck, dataroot, *local, "--niter", "1", "--niter_decay", "0", name="local")) == 0
    # As the official 1024p recipe does: G1's D had two scales, and its tensors start this run's three-scale D.
    assert "latest_net_D.pth does not fit this run's D: loaded the" in capsys.readouterr().out
    g2 = weights(ck / "local" / "latest_net_G.pth")
    # After the fixed epoch the global part is still the pretrained G1; the enhancer has been trained.
    assert all(torch.equal(g2[k], g1[k]) for k in g2 if k.startswith("model."))
    assert run(*train_args(ck, dataroot, *local, "--niter", "2", "--niter_decay", "0", "--continue_train",
                           name="local")) == 0
    g2b = weights(ck / "local" / "latest_net_G.pth")
    assert not all(torch.equal(g2b[k], g1[k]) for k in g2b if k.startswith("model."))  # then all of G trains


def test_coarse_to_fine_mistakes_are_sentences(tmp_path, dataroot, capsys):
    ck, local = tmp_path / "ck", ["--netG", "local", "--n_blocks_local", "1", "--niter", "1", "--niter_decay", "0"]
    # G1 frozen for an epoch but never trained: the local enhancer learns around random features
    assert run(*train_args(ck, dataroot, *local, "--niter_fix_global", "1")) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--niter_fix_global 1" in err and "untrained" in err and "--load_pretrain" in err, err
    assert run(*train_args(ck, dataroot, *local, "--load_pretrain", tmp_path / "nowhere")) == 1
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "holds no latest_net_G.pth" in err and "trained --netG global run" in err, err
    # from scratch is allowed (the original allows it), with a word on the recipe; and a batch larger than the data
    with pytest.warns(UserWarning) as warned:
        assert run(*train_args(ck, dataroot, *local, "--batchSize", "8")) == 0
    said = [str(w.message) for w in warned]
    assert any(m.startswith("--netG local without --load_pretrain trains G1 and the local enhancer") for m in said)
    assert any(m.startswith("--batchSize 8 is larger than the 6 image(s) of the dataset") for m in said), said


def test_mixed_precision_trains(tmp_path, dataroot, monkeypatch, capsys):
    monkeypatch.setattr("fastp2phd.diagnostics.cpu_bf16", lambda: None)  # a CPU without native bfloat16
    assert run(*train_args(tmp_path, dataroot, "--niter", "1", "--niter_decay", "0", "--fp16")) == 0
    assert all(torch.isfinite(v).all() for v in weights(tmp_path / "run" / "latest_net_G.pth").values())
    assert "note: --fp16 runs bfloat16 on this CPU without AVX512-BF16 or AMX" in capsys.readouterr().out


def test_bf16_counts_as_emulated_only_on_a_cpu_without_native_bfloat16(monkeypatch):
    from fastp2phd.training import bf16_is_emulated

    monkeypatch.setattr("fastp2phd.diagnostics.cpu_bf16", lambda: "AVX512-BF16")
    assert not bf16_is_emulated(torch.bfloat16, torch.device("cpu"))
    monkeypatch.setattr("fastp2phd.diagnostics.cpu_bf16", lambda: None)
    assert bf16_is_emulated(torch.bfloat16, torch.device("cpu"))
    assert not bf16_is_emulated(None, torch.device("cpu"))  # fp32
    assert not bf16_is_emulated(torch.bfloat16, torch.device("cuda"))


def test_original_checkpoints_go_in(tmp_path, dataroot):
    """A folder with only the original files (nets + iter.txt) is tested and continued."""
    ck = tmp_path / "ck"
    assert run(*train_args(ck, dataroot, "--niter", "1", "--niter_decay", "0")) == 0
    folder = ck / "run"
    (folder / "latest_train_state.pth").unlink()
    (folder / "iter.txt").write_text("2,0\n")
    assert run("test", "--name", "run", "--checkpoints_dir", ck, "--dataroot", dataroot, *TINY,
               "--results_dir", tmp_path / "results") == 0
    assert run(*train_args(ck, dataroot, "--niter", "2", "--niter_decay", "0", "--continue_train")) == 0
    assert weights(folder / "latest_train_state.pth")["epoch"] == 3


def test_an_epochs_networks_continue_after_that_epoch(tmp_path, dataroot, capsys):
    # Epoch 1's networks without their train state (the files users delete to save disk): the run goes on at
    # epoch 2, not at the position iter.txt holds for latest.
    ck = tmp_path / "ck"
    assert run(*train_args(ck, dataroot, "--niter", "3", "--niter_decay", "0", "--save_epoch_freq", "1")) == 0
    (ck / "run" / "1_train_state.pth").unlink()
    capsys.readouterr()
    assert run(*train_args(ck, dataroot, "--niter", "2", "--niter_decay", "0", "--continue_train",
                           "--which_epoch", "1")) == 0
    out = capsys.readouterr().out
    assert "(no optimiser state) at epoch 2, iteration 0" in out and "epochs 2..2" in out


# ----------------------------------------------------------------------------- bad input


def bad_label_folder(tmp_path, dataroot) -> Path:
    root = tmp_path / "bad"
    for sub in ("train_label", "train_img", "train_inst"):
        (root / sub).mkdir(parents=True)
        for f in sorted((dataroot / sub).iterdir()):
            (root / sub / f.name).write_bytes(f.read_bytes())
    label = sorted((root / "train_label").iterdir())[1]
    array = np.array(Image.open(label))
    array[0, 0] = 40
    Image.fromarray(array).save(label)
    return root


@pytest.mark.parametrize("case", ["label id", "missing folder", "size", "nothing to continue", "tf_log", "mismatch",
                                  "no vgg weights", "corrupt vgg weights", "train state holds a list",
                                  "checkpoints_dir is a file", "garbage iter.txt", "truncated train state",
                                  "no epochs", "a trained run in the way"])
def test_bad_input_gives_one_sentence(case, tmp_path, dataroot, capsys, monkeypatch):
    ck = tmp_path / "ck"
    if case == "corrupt vgg weights":
        (tmp_path / "vgg.pth").write_bytes(b"PK\x03\x04 not really a zip")
        argv = [a for a in train_args(ck, dataroot) if a != "--no_vgg_loss"] + ["--vgg_weights", tmp_path / "vgg.pth"]
        expected = ["VGG19 weight file", "vgg.pth", "truncated, damaged or not a PyTorch file"]
    elif case == "train state holds a list":
        (ck / "run").mkdir(parents=True)
        torch.save([1, 2], ck / "run" / "latest_train_state.pth")
        argv, expected = train_args(ck, dataroot, "--continue_train"), ["latest_train_state.pth", "holds a list"]
    elif case == "checkpoints_dir is a file":
        ck.write_text("not a folder")
        argv, expected = train_args(ck, dataroot), ["a file is in the way", "--checkpoints_dir"]
    elif case in ("garbage iter.txt", "truncated train state"):
        assert run(*train_args(ck, dataroot, "--niter", "1", "--niter_decay", "0")) == 0
        if case == "garbage iter.txt":  # the original code's checkpoints: networks and iter.txt
            (ck / "run" / "latest_train_state.pth").unlink()
            (ck / "run" / "iter.txt").write_text("epoch five\n")
            expected = ["iter.txt", "'epoch five'", "not 'epoch,iteration'"]
        else:
            state = ck / "run" / "latest_train_state.pth"
            state.write_bytes(state.read_bytes()[:1000])
            expected = ["train state", "latest_train_state.pth", "truncated"]
        argv = train_args(ck, dataroot, "--niter", "2", "--niter_decay", "0", "--continue_train")
    elif case == "no vgg weights":
        monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))
        monkeypatch.delenv("FASTP2PHD_VGG19_WEIGHTS", raising=False)

        def offline(*args, **kwargs):
            raise OSError("no network")

        monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
        argv = [a for a in train_args(ck, dataroot) if a != "--no_vgg_loss"]
        expected = ["vgg19-dcbb9e9d.pth", "--no_vgg_loss"]
    elif case == "a trained run in the way":  # a new run under its name would overwrite it at the first save
        assert run(*train_args(ck, dataroot, "--niter", "1", "--niter_decay", "0")) == 0
        saved = weights(ck / "run" / "latest_net_G.pth")
        argv, expected = train_args(ck, dataroot, "--niter", "1"), ["latest_net_G.pth", "--continue_train", "--name"]
    elif case == "no epochs":
        argv, expected = train_args(ck, dataroot, "--niter", "0", "--niter_decay", "0"), ["no epoch to train"]
    elif case == "label id":
        argv, expected = train_args(ck, bad_label_folder(tmp_path, dataroot), "--niter", "1"), ["40", "--label_nc"]
    elif case == "missing folder":
        argv, expected = train_args(ck, tmp_path / "nowhere"), ["nowhere"]
    elif case == "size":
        argv = train_args(ck, dataroot, "--resize_or_crop", "crop", "--fineSize", "34", "--loadSize", "64")
        expected = ["not a multiple of 4"]
    elif case == "nothing to continue":  # (with the VGG loss: refused before VGG19 is looked for)
        argv = [a for a in train_args(ck, dataroot, "--continue_train") if a != "--no_vgg_loss"]
        expected = ["nothing to continue", "drop --continue_train"]
    elif case == "tf_log":
        try:
            import tensorboard  # noqa: F401

            pytest.skip("tensorboard is installed here")
        except ImportError:
            argv, expected = train_args(ck, dataroot, "--tf_log"), ["pip install tensorboard"]
    else:  # a checkpoint from another configuration
        assert run(*train_args(ck, dataroot, "--niter", "1", "--niter_decay", "0")) == 0
        argv = ["test", "--name", "run", "--checkpoints_dir", ck, "--dataroot", dataroot, *TINY, "--ngf", "8"]
        expected = ["ngf=4", "--ngf"]
    capsys.readouterr()
    assert run(*argv) == 1
    err = capsys.readouterr().err.strip()
    if case == "mismatch":  # after the warning that --ngf 8 overrides opt.txt
        warning, err = err.split("\n", 1)
        assert warning.endswith("warning: --ngf 8 overrides the run's opt.txt (ngf 4)")
    assert "Traceback" not in err and err.count("\n") == 0, err
    for text in expected:
        assert text in err, err
    if case == "a trained run in the way":
        assert all(torch.equal(v, saved[k]) for k, v in weights(ck / "run" / "latest_net_G.pth").items())
    if case == "nothing to continue":  # refused before the run folder is made
        assert not ck.exists()


def test_a_failed_start_keeps_the_runs_opt_txt(tmp_path, dataroot):
    # test, encode-features and edit configure themselves from opt.txt: a continue with a wrong flag, or a
    # mistyped --dataroot, must not rewrite it.
    ck = tmp_path / "ck"
    assert run(*train_args(ck, dataroot, "--niter", "1", "--niter_decay", "0")) == 0
    recorded = (ck / "run" / "opt.txt").read_bytes()
    assert run(*train_args(ck, dataroot, "--niter", "2", "--niter_decay", "0", "--continue_train", "--ngf", "8")) == 1
    assert run(*train_args(ck, tmp_path / "typo", "--niter", "2", "--niter_decay", "0", "--continue_train")) == 1
    assert (ck / "run" / "opt.txt").read_bytes() == recorded
    assert run(*train_args(ck, dataroot, "--niter", "2", "--niter_decay", "0", "--continue_train")) == 0
    rewritten = (ck / "run" / "opt.txt").read_text()  # a start that succeeds records its options
    assert "niter: 2\n" in rewritten and "continue_train: True\n" in rewritten


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, dataroot, monkeypatch, capsys):
    ck = tmp_path / "ck"
    assert run(*train_args(ck, dataroot, "--niter", "1", "--niter_decay", "0")) == 0
    before = weights(ck / "run" / "latest_net_G.pth")
    from fastp2phd.models import GANLoss

    # A NaN that carries gradients, as a diverged loss does: the step reads it only after the backwards.
    monkeypatch.setattr(GANLoss, "forward", lambda self, input, real: input[0][-1].mean() * float("nan"))
    assert run(*train_args(ck, dataroot, "--niter", "2", "--niter_decay", "0", "--continue_train")) == 1
    err = capsys.readouterr().err
    assert "diverged" in err and "nan" in err
    after = weights(ck / "run" / "latest_net_G.pth")
    assert all(torch.equal(before[k], after[k]) for k in before)


# ----------------------------------------------------------------------------- pieces


def test_learning_rate_schedule_matches_the_original():
    import argparse

    opt = argparse.Namespace(lr=0.0002, niter=2, niter_decay=4)
    # The original lowers lr by lr/niter_decay at the end of every epoch past niter.
    lrs = [learning_rate(opt, e) for e in range(1, 7)]
    assert lrs == pytest.approx([0.0002, 0.0002, 0.0002, 0.00015, 0.0001, 0.00005])


def test_epoch_sampler_gives_every_rank_data_when_ranks_outnumber_items():
    """Padding repeats the order as often as needed (as DistributedSampler does): 4 ranks, 1 image."""
    samplers = [EpochSampler(1, False, 0, rank=r, world=4) for r in range(4)]
    assert [list(s) for s in samplers] == [[0], [0], [0], [0]]
    samplers = [EpochSampler(3, True, 0, rank=r, world=7) for r in range(7)]
    assert all(len(list(s)) == 1 for s in samplers)
    assert {i for s in samplers for i in s} == {0, 1, 2}


def test_epoch_sampler_shards_and_skips():
    a, b = EpochSampler(7, True, 1, rank=0, world=2), EpochSampler(7, True, 1, rank=1, world=2)
    for s in (a, b):
        s.set_epoch(3)
    assert len(list(a)) == len(list(b)) == 4 and set(a) | set(b) == set(range(7))
    full = list(a)
    a.set_epoch(3, skip=2)
    assert list(a) == full[2:] and len(a) == 2
    a.set_epoch(4)
    assert list(a) != full  # a new permutation every epoch


def test_saved_images_are_the_original_codes_bytes():
    from fastp2phd.visualize import tensor_to_image

    # The original's tensor2im: (x + 1) / 2 * 255 in float32, clipped, truncated by astype(uint8).
    def tensor2im(t):
        return np.clip((np.transpose(t.numpy(), (1, 2, 0)) + 1) / 2.0 * 255.0, 0, 255).astype(np.uint8)

    g = torch.Generator().manual_seed(0)
    levels = torch.arange(256, dtype=torch.float32) / 127.5 - 1  # each 8-bit level, and either side of it
    values = torch.cat([levels, levels.nextafter(torch.tensor(-2.0)), levels.nextafter(torch.tensor(2.0)),
                        torch.tensor([-1.5, 1.5, -1, 1, 0]), torch.rand(60 * 64 * 3 - 773, generator=g) * 2.2 - 1.1])
    t = values[torch.randperm(values.numel(), generator=g)].reshape(3, 60, 64)
    assert np.array_equal(tensor_to_image(t), tensor2im(t))
    photo = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 8, 8), dtype=np.uint8))
    decoded = (photo.float() / 255 - 0.5) / 0.5  # as the data loader reads a photo
    assert np.array_equal(tensor_to_image(decoded), tensor2im(decoded))
    assert (tensor_to_image(t).astype(int) - ((t + 1) * 127.5).round().permute(1, 2, 0).clamp(0, 255).numpy()).min() == -1


def test_image_pool_keeps_history():
    pool = ImagePool(2, seed=0)
    first = torch.zeros(2, 1, 1, 1)
    assert torch.equal(pool.query(first), first)
    outs = [pool.query(torch.full((1, 1, 1, 1), float(i))) for i in range(1, 30)]
    assert any(o.item() != i for o, i in zip(outs, range(1, 30)))  # older images come back
    assert torch.equal(ImagePool(0, 0).query(first + 5), first + 5)


def test_every_original_option_is_accepted():
    from fastp2phd.cli import build_parser

    parser = build_parser()
    train_flags = ("--name x --checkpoints_dir c --dataroot d --label_nc 35 --input_nc 3 --output_nc 3 --no_instance "
                   "--label_feat --feat_num 3 --nef 16 --n_downsample_E 4 --n_clusters 10 --netG local --ngf 32 "
                   "--n_downsample_global 4 --n_blocks_global 9 --n_local_enhancers 1 --n_blocks_local 3 "
                   "--niter_fix_global 0 --norm instance --batchSize 1 --loadSize 1024 --fineSize 512 "
                   "--resize_or_crop none --no_flip --serial_batches --nThreads 2 --max_dataset_size inf --niter 100 "
                   "--niter_decay 100 --lr 0.0002 --beta1 0.5 --num_D 2 --n_layers_D 3 --ndf 64 --lambda_feat 10 "
                   "--no_ganFeat_loss --no_vgg_loss --no_lsgan --pool_size 0 --continue_train --load_pretrain p "
                   "--which_epoch latest --display_freq 100 --print_freq 100 --save_latest_freq 1000 "
                   "--save_epoch_freq 10 --fp16 --tf_log --debug --device cpu")
    opt = parser.parse_args(["train", *train_flags.split()])
    assert opt.netG == "local" and opt.max_dataset_size == float("inf") and opt.fp16 and opt.debug
    opt = parser.parse_args(["test", *"--results_dir r --how_many 5 --use_encoded_image --cluster_path c.npz".split()])
    assert opt.how_many == 5 and opt.use_encoded_image
    for command in ("train", "test", "encode-features", "export-onnx"):
        sub = parser._subparsers._group_actions[0].choices[command]
        assert all(action.help for action in sub._actions), command  # every option says what it does


def test_original_pickled_clusters_need_allow_pickle(tmp_path, dataroot, capsys):
    ck = tmp_path / "ck"
    assert run(*train_args(ck, dataroot, *FEATURES, "--niter", "1", "--niter_decay", "0")) == 0
    centers = {26: np.random.default_rng(0).normal(size=(3, 3)).astype(np.float32)}
    np.save(ck / "run" / "features_clustered_010.npy", centers, allow_pickle=True)
    common = ["test", "--name", "run", "--checkpoints_dir", ck, "--dataroot", dataroot, *TINY, *FEATURES,
              "--cluster_path", "features_clustered_010.npy", "--results_dir", tmp_path / "r", "--how_many", "1"]
    capsys.readouterr()
    assert run(*common) == 1
    err = capsys.readouterr().err
    assert "allow_pickle" in err and err.strip().count("\n") == 0
    assert run(*common, "--allow_pickle") == 0


def test_bad_data_in_a_loader_worker_is_one_sentence(tmp_path, dataroot, capsys):
    argv = train_args(tmp_path / "ck", bad_label_folder(tmp_path, dataroot), "--niter", "1")
    argv[argv.index("--nThreads") + 1] = "1"
    capsys.readouterr()
    assert run(*argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "40" in err and "--label_nc" in err, err
    assert err.startswith("fastp2phd train: ") and "Error" not in err, err  # the sentence, not the worker's class


def _mean_in_process(rank: int, store_path: str, out_path: str) -> None:
    import torch.distributed as dist

    from fastp2phd.training import Trainer

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=2)
    try:
        trainer = types.SimpleNamespace(distributed=True, device=torch.device("cpu"), world=2)
        values = {"G_GAN": 1.0 + rank, "D_fake": 10.0 * rank, "D_real": -0.25}
        torch.save(Trainer._mean_over_processes(trainer, values), f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_logged_losses_are_the_mean_over_processes(tmp_path):
    """What rank 0 logs under torchrun: every loss averaged over the processes, names kept in order."""
    torch.multiprocessing.spawn(_mean_in_process, args=(str(tmp_path / "store"), str(tmp_path / "mean")), nprocs=2)
    for rank in (0, 1):
        mean = torch.load(f"{tmp_path / 'mean'}.{rank}")
        assert list(mean) == ["G_GAN", "D_fake", "D_real"]
        assert mean == {"G_GAN": 1.5, "D_fake": 5.0, "D_real": -0.25}


@pytest.mark.parametrize("damage", ["size", "mode"])
def test_a_bad_file_late_in_the_dataset_is_refused_before_the_first_step(damage, tmp_path, dataroot, capsys,
                                                                          monkeypatch):
    """The files' headers are read before training: a bad last file stopped the run at the end of the epoch."""
    import shutil

    from fastp2phd.data import AlignedDataset

    data = tmp_path / "data"
    shutil.copytree(dataroot, data)
    last = sorted((data / "train_inst").iterdir())[-1]
    image = Image.open(last)
    (image.resize((16, 16)) if damage == "size" else image.convert("RGB")).save(last)
    read, getitem = [], AlignedDataset.__getitem__
    monkeypatch.setattr(AlignedDataset, "__getitem__", lambda self, i: read.append(i) or getitem(self, i))
    capsys.readouterr()
    assert run(*train_args(tmp_path / "ck", data)) == 1
    err = capsys.readouterr().err
    assert last.name in err and ("differ in size" if damage == "size" else "has PIL mode RGB") in err, err
    assert read == []  # no item was read: refused before the epoch began


def test_a_bad_file_met_mid_run_keeps_the_steps_before_it(tmp_path, dataroot, capsys):
    """Ids beyond --label_nc show only when a map is decoded: the run stops at that file, after saving the steps
    trained since the last save, and goes on from there once the file is fixed."""
    ck, data = tmp_path / "ck", bad_label_folder(tmp_path, dataroot)  # (its second label map holds id 40)
    argv = train_args(ck, data, "--niter", "1", "--niter_decay", "0", "--serial_batches", "--batchSize", "1")
    capsys.readouterr()
    assert run(*argv) == 1
    out, err = capsys.readouterr()
    assert "saving the latest model (epoch 1, total steps 1) before stopping" in out, out
    assert "40" in err and "--label_nc" in err, err
    assert (ck / "run" / "iter.txt").read_text() == "1,1\n"
    state = weights(ck / "run" / "latest_train_state.pth")
    assert (state["epoch"], state["epoch_iter"], state["total_steps"]) == (1, 1, 1)
    bad = sorted((data / "train_label").iterdir())[1]
    bad.write_bytes((dataroot / "train_label" / bad.name).read_bytes())
    assert run(*argv, "--continue_train") == 0
    assert (ck / "run" / "iter.txt").read_text() == "2,0\n"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_ends_the_run_after_its_step_and_saves_it(signum, tmp_path, dataroot, capsys, monkeypatch):
    """Ctrl-C, or a scheduler's SIGTERM, during a step: the step finishes and is saved, and the run resumes there.
    A second Ctrl-C stops at once, keeping the last save; another SIGTERM is the same request (Slurm signals every
    process of a job, and torchrun passes its own on: each process may get two)."""
    from fastp2phd.training import Trainer

    ck = tmp_path / "ck"
    argv = train_args(ck, dataroot, "--niter", "1", "--niter_decay", "0", "--serial_batches", "--batchSize", "1")
    update, signals_in_step = Trainer.update, {2: 1}  # step number -> signals sent during it

    def update_with_signals(self, batch):
        values = update(self, batch)
        for _ in range(signals_in_step.get(self.position.total_steps + 1, 0)):
            signal.raise_signal(signum)
        return values

    monkeypatch.setattr(Trainer, "update", update_with_signals)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)}
    capsys.readouterr()
    assert run(*argv) == 128 + signum
    out, err = capsys.readouterr()
    assert f"{signum.name}: stopping after this step" in out and "total steps 2" in out, out
    assert err.strip() == (f"fastp2phd train: stopped by {signum.name} at epoch 1, total steps 2, and saved: add "
                           "--continue_train to go on from there"), err
    assert (ck / "run" / "iter.txt").read_text() == "1,2\n"
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # (the run's handlers are gone with it)

    signals_in_step.clear()
    signals_in_step[4] = 2  # a second signal
    if signum == signal.SIGINT:  # stopped at once, the save of step 2 kept
        assert run(*argv, "--continue_train") == 130
        assert "interrupted" in capsys.readouterr().err
        assert (ck / "run" / "iter.txt").read_text() == "1,2\n"
    else:  # step 4 finished and saved
        assert run(*argv, "--continue_train") == 128 + signum
        assert "total steps 4, and saved" in capsys.readouterr().err
        assert (ck / "run" / "iter.txt").read_text() == "1,4\n"

    signals_in_step.clear()
    assert run(*argv, "--continue_train") == 0
    assert (ck / "run" / "iter.txt").read_text() == "2,0\n"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_loader_workers_outlive_stop_signals(signum, tmp_path, dataroot):
    # A terminal, a scheduler and torchrun signal the whole process group. A worker the signal ended would break the
    # batch the training process waits for (once the queued ones are used: a run bound by its data loading waits on
    # an empty queue), where it should finish its step and save. The signal comes as the workers start, too: it
    # waits for them to ignore it, and then reaches the training process.
    from fastp2phd.cli import build_parser
    from fastp2phd.options import finish_options, train_spec
    from fastp2phd.training import Trainer

    argv = [str(a) for a in train_args(tmp_path / "ck", dataroot, "--batchSize", "1")]
    argv[argv.index("--nThreads") + 1] = "2"
    trainer = Trainer(train_spec(finish_options(build_parser().parse_args(argv), is_train=True)), torch.device("cpu"))
    received, received_as_they_start = [], []

    class SignalledAsWorkersStart:
        def __iter__(self):
            batches = iter(trainer.loader)
            for pid in [worker.pid for worker in batches._workers] + [os.getpid()]:
                os.kill(pid, signum)
            received_as_they_start.extend(received)
            return batches

    previous = signal.signal(signum, lambda s, frame: received.append(s))
    try:
        with trainer.worker_signals.batches(SignalledAsWorkersStart()) as batches:
            for _ in range(6):  # every image of the epoch still comes
                next(batches)
            assert all(worker.is_alive() for worker in batches._workers)
            assert received_as_they_start == [] and received == [signum]
    finally:
        signal.signal(signum, previous)
    del batches


def test_a_run_interrupted_while_a_loader_worker_hangs_ends(tmp_path, dataroot):
    # The workers ignore the stop signals while the run takes their batches; once it leaves them, the loader's
    # shutdown ends one that never returns from the dataset (a hung network read, say) with SIGTERM, as before.
    hung = ("import sys, time; from fastp2phd.data import AlignedDataset; "
            "AlignedDataset.__getitem__ = lambda self, i: time.sleep(3600); "
            "from fastp2phd.cli import main; sys.exit(main(sys.argv[1:]))")
    args = [*map(str, train_args(tmp_path / "ck", dataroot, "--batchSize", "1"))]
    args[args.index("--nThreads") + 1] = "2"
    process = subprocess.Popen([sys.executable, "-c", hung, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=ROOT, start_new_session=True)
    try:
        assert process.stdout.readline().startswith("training run:")
        for _ in range(2):  # a stop request, which the step waiting on the hung batch never honours; then at once
            time.sleep(2)
            os.killpg(process.pid, signal.SIGINT)
        out, err = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130 and "interrupted" in err, out + err


def cli_slowed(bound_by: str | None) -> str:
    """Python source that runs the command line with each image's loading, or each step, taking 0.5 s more."""
    slowed = {None: "", "loading": "from fastp2phd.data import AlignedDataset as slowed; slow = '__getitem__'; ",
              "steps": "from fastp2phd.training import Trainer as slowed; slow = 'update'; "}[bound_by]
    if slowed:
        slowed += ("call = getattr(slowed, slow); "
                   "setattr(slowed, slow, lambda self, i: (time.sleep(0.5), call(self, i))[1]); ")
    return f"import sys, time; {slowed}from fastp2phd.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("signum, bound_by", [(signal.SIGINT, None), (signal.SIGTERM, "loading"),
                                               (signal.SIGTERM, "steps")], ids=["ctrl-c", "sigterm-loading",
                                                                                "sigterm-steps"])
def test_a_signal_to_the_whole_group_stops_the_run_after_a_saved_step(signum, bound_by, tmp_path, dataroot):
    # A terminal's Ctrl-C and a scheduler's SIGTERM reach the whole process group, loader workers included, which
    # ignore them: the run finishes its step, whether it is in one or waits on the workers for the next batch (a
    # run bound by its data loading), and saves it, without a traceback.
    ck = tmp_path / "ck"
    args = [*map(str, train_args(ck, dataroot, "--niter", "1000", "--niter_decay", "0", "--batchSize", "1"))]
    args[args.index("--nThreads") + 1] = "2"
    process = subprocess.Popen([sys.executable, "-c", cli_slowed(bound_by), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                               start_new_session=True)
    try:
        assert process.stdout.readline().startswith("training run:")
        time.sleep(3)  # (some steps in)
        os.killpg(process.pid, signum)
        out, err = process.communicate(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 128 + signum, out + err
    assert err.startswith(f"fastp2phd train: stopped by {signum.name} at epoch ") and "Traceback" not in err, err
    assert f"{signum.name}: stopping after this step" in out, out
    epoch, epoch_iter = map(int, (ck / "run" / "iter.txt").read_text().split(","))
    assert f"total steps {(epoch - 1) * 6 + epoch_iter}, and saved" in err, err  # (6 images an epoch)

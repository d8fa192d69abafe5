"""The files commands write or read back besides checkpoints (test_file_sets.py has those): opt.txt, iter.txt,
the loss logs, the results pages, clusters, ONNX exports, the editor's saved scenes, the demo's folder and the
bench's results. Each is replaced whole or not at all, never replaces a file of another kind, stays inside the
folder it belongs to, and a damaged one is one sentence naming it."""
from __future__ import annotations

import shutil

import pytest

from fastp2phd.cli import main
from fastp2phd.data import make_synthetic
from fastp2phd.files import write_text

TINY = ["--fineSize", "64", "--loadSize", "64", "--resize_or_crop", "none", "--ngf", "4", "--n_downsample_global", "2",
        "--n_blocks_global", "1", "--nThreads", "0", "--device", "cpu", "--no_progress", "--instance_feat", "--nef", "4",
        "--n_downsample_E", "2", "--n_clusters", "2"]
TRAIN = ["--ndf", "4", "--n_layers_D", "2", "--no_vgg_loss", "--batchSize", "2", "--niter", "1", "--niter_decay", "0",
         "--print_freq", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(checkpoints folder, data folder) of a tiny run with features, trained one epoch and clustered."""
    root = tmp_path_factory.mktemp("run")
    data = make_synthetic(root / "data", num_train=6, num_test=2, height=32, width=64, seed=3)
    common = ["--name", "run", "--checkpoints_dir", str(root / "ck"), "--dataroot", str(data), *TINY]
    assert main(["train", *common, *TRAIN]) == 0
    assert main(["encode-features", *common]) == 0
    return root / "ck", data


def copy_run(trained, tmp_path):
    ck, data = trained
    shutil.copytree(ck, tmp_path / "ck")
    return tmp_path / "ck", data


def run_args(command, ck, data, *extra):
    return [command, "--name", "run", "--checkpoints_dir", str(ck), "--dataroot", str(data), "--device", "cpu",
            "--no_progress", *extra]


def one_sentence(capsys, *expected):
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("\n") == 0, err
    for text in expected:
        assert text in err, err
    return err


def test_a_folder_where_a_file_goes_is_named_not_the_temporary(tmp_path):
    (tmp_path / "opt.txt").mkdir()
    with pytest.raises(OSError) as caught:
        write_text(tmp_path / "opt.txt", "x")
    assert caught.value.filename == str(tmp_path / "opt.txt")
    assert [p.name for p in tmp_path.iterdir()] == ["opt.txt"]  # and no temporary is left

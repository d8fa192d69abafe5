"""Files saved as one unit (fastp2phd.files.save_file_set): after a failure, a full disk or a kill -9 at
any moment, a reader sees every file of the last complete save and nothing of a later one; a full disk
is one sentence naming the file."""
from __future__ import annotations

import errno
import filecmp
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fastp2phd.files as files
from fastp2phd.cli import main
from fastp2phd.data import make_synthetic
from fastp2phd.errors import CheckpointReadError, DiskFullError
from support import fill_disk_at_write
from fastp2phd.files import (SAVE_JOURNAL, TEMPORARY_SUFFIX, finish_interrupted_save, load_torch,
                             remove_leftover_temporaries, save_file_set)

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("a.txt", "sub/b.txt", "c.pth")


def save_version(root: Path, version: int) -> None:
    with save_file_set(root, "test set") as fs:
        fs.write_text("a.txt", f"{version}\n" * (1 + version % 7))
        fs.write_text("sub/b.txt", str(version))
        fs.save_torch({"version": torch.tensor(version), "pad": torch.zeros(1000 * (version % 5))}, "c.pth")


def versions(root: Path) -> set[int]:
    return {int((root / "a.txt").read_text().split()[0]), int((root / "sub/b.txt").read_text()),
            int(load_torch(root / "c.pth")["version"])}


def temporaries(root: Path) -> list[Path]:
    return list(root.rglob(f"*{TEMPORARY_SUFFIX}"))


def test_a_set_replaces_all_its_files_or_none(tmp_path):
    save_version(tmp_path, 1)
    assert versions(tmp_path) == {1} and not temporaries(tmp_path) and not (tmp_path / SAVE_JOURNAL).exists()
    with pytest.raises(KeyError):
        with save_file_set(tmp_path, "test set") as fs:
            fs.write_text("a.txt", "2\n")
            fs.write_text("sub/b.txt", "2")
            raise KeyError("the caller failed before the last file")
    assert versions(tmp_path) == {1} and not temporaries(tmp_path)
    save_version(tmp_path, 2)
    assert versions(tmp_path) == {2}


@pytest.mark.parametrize("failing_sync", range(4))  # each of the 3 files, then the journal (the commit point)
def test_a_full_disk_at_any_write_keeps_the_previous_set_and_says_so(tmp_path, monkeypatch, failing_sync):
    save_version(tmp_path, 1)
    before = {name: (tmp_path / name).read_bytes() for name in NAMES}
    fill_disk_at_write(monkeypatch, failing_sync)
    with pytest.raises(DiskFullError, match=r"disk is full.*previous test set .*intact") as caught:
        save_version(tmp_path, 2)
    assert str(tmp_path) in str(caught.value) and "\n" not in str(caught.value)
    assert {name: (tmp_path / name).read_bytes() for name in NAMES} == before
    assert not temporaries(tmp_path) and not (tmp_path / SAVE_JOURNAL).exists()


def interrupt_save_after_two_renames(tmp_path, monkeypatch) -> None:
    """Version 1 saved, then version 2 stopped between the renames of its set (after its commit point)."""
    save_version(tmp_path, 1)
    real_replace = os.replace
    renamed = []

    def die_after_two_renames(src, dst):
        if len(renamed) == 2 and not str(dst).endswith(SAVE_JOURNAL):
            raise KeyboardInterrupt  # the process stops here, between the renames of one set
        real_replace(src, dst)
        if not str(dst).endswith(SAVE_JOURNAL):
            renamed.append(dst)

    monkeypatch.setattr(files.os, "replace", die_after_two_renames)
    with pytest.raises(KeyboardInterrupt):
        save_version(tmp_path, 2)
    monkeypatch.setattr(files.os, "replace", real_replace)
    assert (tmp_path / SAVE_JOURNAL).is_file() and len(temporaries(tmp_path)) == 1  # a mix on disk, for now


def test_a_save_interrupted_after_its_commit_point_is_finished_by_the_next_reader(tmp_path, monkeypatch):
    interrupt_save_after_two_renames(tmp_path, monkeypatch)
    assert versions(tmp_path) == {2}  # load_torch finished the save before reading
    assert not (tmp_path / SAVE_JOURNAL).exists() and not temporaries(tmp_path)


def test_a_save_another_process_finishes_meanwhile_is_finished(tmp_path, monkeypatch):
    """Every process of a torchrun run finishes an interrupted save before it reads the checkpoint: the
    journal one found could be gone (finished by another) when it read it, which it called damaged."""
    interrupt_save_after_two_renames(tmp_path, monkeypatch)
    real_read_text = Path.read_text

    def another_process_finishes_it_first(path, *args, **kwargs):
        if path.name == SAVE_JOURNAL:
            monkeypatch.setattr(Path, "read_text", real_read_text)
            finish_interrupted_save(path.parent)
        return real_read_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", another_process_finishes_it_first)
    assert finish_interrupted_save(tmp_path)
    assert versions(tmp_path) == {2} and not (tmp_path / SAVE_JOURNAL).exists() and not temporaries(tmp_path)


def test_a_journal_that_points_outside_its_folder_is_refused(tmp_path):
    (tmp_path / "victim.txt").write_text("keep")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / SAVE_JOURNAL).write_text(json.dumps({"files": [["../victim.txt", "x.fastp2phd.tmp"]]}))
    with pytest.raises(CheckpointReadError, match="not a save journal fastp2phd wrote; remove it"):
        finish_interrupted_save(tmp_path / "run")
    assert (tmp_path / "victim.txt").read_text() == "keep"


KILLED_WRITER = """
import sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_file_sets import save_version
root = Path({root!r})
version = 2
print("saving", flush=True)
while True:
    save_version(root, version)
    version += 1
"""


def test_kill_9_at_random_moments_leaves_exactly_one_complete_set(tmp_path):
    root = tmp_path / "set"
    save_version(root, 1)
    rng = random.Random(0)
    seen = set()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for _ in range(12):
        code = textwrap.dedent(KILLED_WRITER).format(tests=str(ROOT / "tests"), root=str(root))
        writer = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE)
        assert writer.stdout.readline() == b"saving\n"  # imported (seconds on a busy machine); now it saves in a loop
        time.sleep(0.05 + 0.5 * rng.random())
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
        remove_leftover_temporaries(root, recursive=True)  # what the next command does first
        found = versions(root)
        assert len(found) == 1, found
        assert not temporaries(root) and not (root / SAVE_JOURNAL).exists()
        seen |= found
    assert len(seen) > 3  # the kills landed in different saves


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_the_file_size_limit_is_one_sentence_and_the_old_file_stays(tmp_path):
    """A real failed write (ulimit -f), through torch.save's zip writer and a plain write."""
    save_version(tmp_path, 1)
    before = (tmp_path / "c.pth").read_bytes()
    code = textwrap.dedent(f"""
        import resource, sys, torch
        from fastp2phd.errors import DiskFullError
        from fastp2phd.files import save_file_set, write_text
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        for save in (lambda: save_file_set({str(tmp_path)!r}, "checkpoint").__enter__().save_torch(
                         torch.zeros(1 << 20), "c.pth"),
                     lambda: write_text({str(tmp_path / 'big.txt')!r}, "x" * (2 << 20))):
            try:
                save()
            except DiskFullError as exc:
                print(exc)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    assert "could not write" in lines[0] and "c.pth" in lines[0] and "ulimit -f" in lines[0]
    assert "about 4.0 MB" in lines[0] and "previous checkpoint" in lines[0]
    assert "big.txt" in lines[1] and "ulimit -f" in lines[1]
    assert (tmp_path / "c.pth").read_bytes() == before
    assert not (tmp_path / "big.txt").exists() and not temporaries(tmp_path)


# ----------------------------------------------------------------------------- a training run's checkpoints

TRAIN = ["--fineSize", "64", "--loadSize", "64", "--resize_or_crop", "none", "--ngf", "4", "--n_downsample_global", "2",
         "--n_blocks_global", "1", "--nThreads", "0", "--device", "cpu", "--no_progress", "--ndf", "4",
         "--n_layers_D", "2", "--no_vgg_loss", "--batchSize", "2", "--instance_feat", "--nef", "4",
         "--n_downsample_E", "2", "--niter_decay", "0", "--name", "run"]
CHECKPOINT = ("latest_net_G.pth", "latest_net_D.pth", "latest_net_E.pth", "latest_train_state.pth", "iter.txt",
              "classes.json")


def train(checkpoints: Path, dataroot: Path, epochs: int, *extra: str) -> int:
    return main(["train", "--checkpoints_dir", str(checkpoints), "--dataroot", str(dataroot), *TRAIN,
                 "--niter", str(epochs), *extra])


def test_a_full_disk_at_every_write_of_a_checkpoint_keeps_the_last_one_and_the_resume_is_exact(
        tmp_path, monkeypatch, capsys):
    data = make_synthetic(tmp_path / "data", num_train=6, num_test=1, height=32, width=64, seed=3)
    assert train(tmp_path / "straight", data, 2) == 0  # the uninterrupted run
    assert train(tmp_path / "first", data, 1) == 0  # its first epoch, saved
    real_fsync = files._fsync_file
    writes = 8  # opt.txt, then the checkpoint's six files and its journal
    for failing in range(writes):
        run = tmp_path / f"full{failing}"
        shutil.copytree(tmp_path / "first", run)
        calls = fill_disk_at_write(monkeypatch, failing)
        capsys.readouterr()
        assert train(run, data, 2, "--continue_train") == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("fastp2phd train: could not ") and ("disk is full" in err) and "\n" not in err, err
        assert "intact" in err, err
        monkeypatch.setattr(files, "_fsync_file", real_fsync)
        same = filecmp.cmpfiles(tmp_path / "first" / "run", run / "run", CHECKPOINT, shallow=False)[0]
        assert sorted(same) == sorted(CHECKPOINT), failing  # every file of epoch 1's checkpoint, unchanged
        assert not temporaries(run)
        assert train(run, data, 2, "--continue_train") == 0  # and resuming from it ends where the straight run did
        for name in CHECKPOINT[:3]:
            a, b = load_torch(tmp_path / "straight" / "run" / name), load_torch(run / "run" / name)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (failing, name)
    assert len(calls) == writes


def test_a_full_disk_while_logging_losses_is_one_sentence(tmp_path, monkeypatch, capsys):
    data = make_synthetic(tmp_path / "data", num_train=2, num_test=1, height=32, width=64, seed=3)
    real_open = open

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        if "a" in mode and str(path).endswith("loss_log.txt"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", open_on_a_full_disk)
    assert train(tmp_path / "ck", data, 1, "--print_freq", "1") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("fastp2phd train: could not write ") and "loss_log.txt: the disk is full" in err, err
    assert "checkpoints included, is intact" in err and "\n" not in err


@pytest.mark.parametrize("failing_write", range(3))  # features.npz, the clusters, the journal
def test_encode_features_replaces_features_and_clusters_together(tmp_path, monkeypatch, capsys, failing_write):
    data = make_synthetic(tmp_path / "data", num_train=2, num_test=1, height=32, width=64, seed=3)
    assert train(tmp_path / "ck", data, 1) == 0
    run = tmp_path / "ck" / "run"
    from fastp2phd.features import save_clusters

    # An earlier encoding's files, unlike this one's (kind: what encode-features writes, and so replaces).
    save_clusters(run / "features.npz", {26: torch.ones(1, 4)}, {"kind": "features"})
    save_clusters(run / "features_clustered_010.npz", {26: torch.ones(2, 3)}, {"kind": "clusters"})
    old = {name: (run / name).read_bytes() for name in ("features.npz", "features_clustered_010.npz")}
    fill_disk_at_write(monkeypatch, failing_write)
    capsys.readouterr()
    assert main(["encode-features", "--name", "run", "--checkpoints_dir", str(tmp_path / "ck"), "--dataroot", str(data),
                 "--device", "cpu", "--no_progress", "--phase", "train"]) == 1
    err = capsys.readouterr().err
    assert "disk is full" in err and "previous features and clusters" in err, err
    assert {name: (run / name).read_bytes() for name in old} == old and not temporaries(run)

"""`fastp2phd demo`: it never deletes what it did not write, its baseline is the class-mean painting it
claims, and its whole workflow runs (here on a few tiny scenes for one epoch) and prints the three-way table."""
from __future__ import annotations

import json

import pytest
import torch

from fastp2phd import demo
from fastp2phd.cli import main
from fastp2phd.data import create_dataset, make_synthetic
from fastp2phd.demo import DEMO_MODEL, class_mean_colours, demo_data
from fastp2phd.evaluate import FID_WEIGHTS_NAME, FIDInceptionV3


def earlier_demo(out):
    (out / "checkpoints" / "demo").mkdir(parents=True)
    (out / "checkpoints" / "demo" / "latest_net_G.pth").write_bytes(b"weights")
    return out


def test_an_earlier_demo_is_kept_without_overwrite(tmp_path, capsys):
    out = earlier_demo(tmp_path / "demo_output")
    assert main(["demo", "--out", str(out), "--device", "cpu"]) == 1
    assert "pass --overwrite to replace it" in capsys.readouterr().err
    assert (out / "checkpoints" / "demo" / "latest_net_G.pth").read_bytes() == b"weights"


def test_a_folder_that_is_not_a_demo_is_never_replaced(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(out), "--device", "cpu", "--overwrite"]) == 1
    assert "holds no earlier demo; choose another --out" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    assert main(["demo", "--out", str(a_file), "--device", "cpu"]) == 1
    assert "is not a folder" in capsys.readouterr().err
    assert a_file.read_text() == "mine"


def test_overwrite_replaces_an_earlier_demo(tmp_path):
    out = earlier_demo(tmp_path / "demo_output")
    assert demo._prepare(out, overwrite=True) is None
    assert out.is_dir() and not any(out.iterdir())


def test_class_mean_colours_are_the_mean_colour_of_each_class(tmp_path):
    make_synthetic(tmp_path / "data", num_train=3, num_test=1, height=32, width=64, seed=1)
    dataset = create_dataset(demo_data(tmp_path, "train", 1))
    colours = class_mean_colours(dataset, DEMO_MODEL.label_nc)
    items = [dataset[i] for i in range(len(dataset))]
    labels = torch.cat([it["label"].flatten() for it in items])
    pixels = torch.cat([it["image"].reshape(3, -1) for it in items], 1)
    for c in range(DEMO_MODEL.label_nc):
        mask = labels == c
        expected = pixels[:, mask].double().mean(1).float() if mask.any() else torch.zeros(3)
        torch.testing.assert_close(colours[c], expected, atol=1e-6, rtol=0)
    assert int(torch.unique(labels).numel()) >= 5  # the scenes hold several classes, absent ones are zero


@pytest.mark.parametrize("fid_weights", [False, True])
def test_the_whole_demo_runs_and_prints_baseline_untrained_and_trained(tmp_path, monkeypatch, capsys, fid_weights):
    full_training = demo.demo_training
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    if fid_weights:  # a randomly initialised FID Inception stands in for the real weights file
        (tmp_path / "torch_home" / "hub" / "checkpoints").mkdir(parents=True)
        torch.save(FIDInceptionV3().state_dict(), tmp_path / "torch_home" / "hub" / "checkpoints" / FID_WEIGHTS_NAME)
    monkeypatch.setattr(demo, "SCENE", (64, 128))
    monkeypatch.setattr(demo, "NUM_TRAIN", 4)
    monkeypatch.setattr(demo, "NUM_TEST", 2)
    monkeypatch.setattr(demo, "demo_training", lambda out, seed: full_training(out, seed, 1, 0))
    out = tmp_path / "demo_output"
    status = demo.run_demo(out, torch.device("cpu"), seed=0)
    printed = capsys.readouterr()
    assert "[demo] epoch 1/1 done" in printed.out  # progress
    lines = printed.out.splitlines()
    # What it is doing, from the first second: no silence until the first epoch ends.
    assert lines[0].startswith("[demo] writing 4 training and 2 test scenes")
    assert lines[1:3] == ["[demo] building the model", "[demo] training 1 epochs on cpu: epoch 1 started"]
    header = next(i for i, line in enumerate(lines) if "class-mean colours |" in line)
    assert [c.strip() for c in lines[header].removeprefix("[demo]").split("|")] == [
        "class-mean colours", "untrained model", "trained model"]
    baseline, untrained, trained = (float(c) for c in lines[header + 1].removeprefix("[demo]").split("|"))
    # The printed baseline is the class-mean painting's L1, computed here independently.
    colours = class_mean_colours(create_dataset(demo_data(out, "train", 0)), DEMO_MODEL.label_nc)
    test_set = create_dataset(demo_data(out, "test", 0))
    expected = sum((colours[test_set[i]["label"][0]].permute(2, 0, 1) - test_set[i]["image"]).abs().mean().item()
                   for i in range(len(test_set))) / len(test_set)
    assert baseline == round(expected, 3)
    assert 0 < trained and 0 < untrained
    assert status == (0 if trained < baseline else 1)
    assert ("did not beat the class-mean colours" in printed.err) == (status == 1)
    assert (out / "web" / "index.html").is_file()
    assert (out / "checkpoints" / "demo" / "classes.json").is_file()
    fid_line = next(line for line in lines if line.startswith("[demo] FID"))
    if fid_weights:
        report = json.loads((out / "results" / "evaluation.json").read_text())
        assert report["images"] == 2
        assert fid_line.startswith(f"[demo] FID {report['fid']:.1f}, KID {report['kid']['mean']:.4f}")
    else:
        assert fid_line.startswith("[demo] FID: not computed, its Inception weights are missing: download https://")
        assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in fid_line
        assert not (out / "results").exists()


@pytest.mark.parametrize("progress", [True, False])
def test_a_line_every_few_seconds_within_an_epoch_unless_no_progress(tmp_path, monkeypatch, capsys, progress):
    monkeypatch.setattr(demo, "NUM_TRAIN", 12)  # three batches of four
    make_synthetic(tmp_path / "data", num_train=12, num_test=0, height=32, width=64, seed=0)
    now = [0.0]

    def clock():  # a fake clock: every look at it is 30 s later, more than PROGRESS_EVERY
        now[0] += 30.0
        return now[0]

    demo._DemoTrainer(demo.demo_training(tmp_path, 0, 1, 0), torch.device("cpu"), progress, clock).run()
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[demo] epoch 1/1")]
    within = [line.split(" scenes, ")[0] for line in lines[:-1]]
    assert within == (["[demo] epoch 1/1: 4/12", "[demo] epoch 1/1: 8/12"] if progress else [])
    assert all(line.endswith(" so far") for line in lines[:-1])
    assert lines[-1].startswith("[demo] epoch 1/1 done, ") and "about 0:00 to go (" in lines[-1]


def test_demo_no_progress_reaches_the_demo(monkeypatch):
    seen = {}
    monkeypatch.setattr(demo, "run_demo", lambda out, device, **kwargs: seen.update(kwargs) or 0)
    assert main(["demo", "--out", "unused", "--device", "cpu", "--no_progress"]) == 0
    assert seen["progress"] is False

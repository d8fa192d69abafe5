"""The README's Python examples run as written, in order, in one namespace, in a folder where `make demo`
has run (here a quicker stand-in: the demo's model trained for one epoch on a few scenes, its
features clustered) and VGG19 weights are found (random ones, in torchvision's layout)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fastp2phd.data import make_synthetic
from fastp2phd.demo import demo_data, demo_training
from fastp2phd.encode_features import encode_features
from fastp2phd.inference import load_run
from fastp2phd.models.vgg import VGG19_WEIGHTS_ENV, Vgg19
from fastp2phd.training import Trainer

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    out = root / "demo_output"
    make_synthetic(out / "data", num_train=8, num_test=2, height=64, width=128, seed=0)
    torch.manual_seed(0)
    Trainer(demo_training(out, 0, 1, 0), torch.device("cpu")).run()
    run_folder = out / "checkpoints" / "demo"
    encode_features(load_run(run_folder), demo_data(out, "train", 0), run_folder, batch_size=4, progress=False)
    torch.save({f"features.{k}": v for k, v in Vgg19(pretrained=False).features.state_dict().items()},
               root / "vgg19.pth")
    return root


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_python_examples():
    blocks = python_blocks()
    assert len(blocks) >= 5 and "fastp2phd.load_run(" in blocks[0]


def test_readme_python_examples_run_as_written(demo_folder, monkeypatch):
    monkeypatch.chdir(demo_folder)
    monkeypatch.setenv(VGG19_WEIGHTS_ENV, str(demo_folder / "vgg19.pth"))
    namespace: dict = {}
    for number, block in enumerate(python_blocks(), 1):
        try:
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        except Exception as exc:  # say which block failed
            raise AssertionError(f"README python block {number} failed: {type(exc).__name__}: {exc}\n{block}") from exc
    assert namespace["image"].shape == (64, 128, 3)  # the editing example's last image
    assert torch.equal(namespace["same"], namespace["again"])  # a seeded generator: the same styles
    assert (demo_folder / "edited" / "test_label" / "my_scene.png").is_file()

"""ONNX export of networks whose modules take the Triton paths (as a CUDA model does under impl="auto"):
the exporter records the references, and onnxruntime reproduces the model. Before, export failed with
"No ONNX function found for fastp2phd.instance_norm_act"."""
from __future__ import annotations

import pytest
import torch
from export_checks import export_and_run_onnx
from support import cityscapes_like

from fastp2phd.models import Encoder, GlobalGenerator

pytest.importorskip("onnxruntime")


def test_triton_generator_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    netG = GlobalGenerator(6, 3, ngf=4, n_downsampling=2, n_blocks=1, impl="triton").eval()
    difference = export_and_run_onnx(netG, (torch.randn(1, 6, 16, 16),), (torch.randn(2, 6, 24, 32),), ["input"],
                                     tmp_path / "g.onnx")
    assert difference < 1e-5


def test_triton_encoder_exports_to_onnx(tmp_path):
    torch.manual_seed(0)
    netE = Encoder(3, 3, ngf=4, n_downsampling=2, impl="triton").eval()
    example = (torch.randn(1, 3, 16, 32), cityscapes_like(1, 16, 32, seed=0))
    other = (torch.randn(2, 3, 24, 40), cityscapes_like(2, 24, 40, seed=1))
    assert export_and_run_onnx(netE, example, other, ["image", "inst"], tmp_path / "e.onnx") < 1e-5

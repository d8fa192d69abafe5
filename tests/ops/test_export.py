"""Export of models whose modules take the fast paths (here the C++ instance_mean): while an exporter
traces, every op records its reference in standard operators. Before, ONNX export failed with
"No ONNX function found for fastp2phd.instance_mean"."""
from __future__ import annotations

import pytest
import torch
from export_checks import assert_no_fastp2phd_ops, export_and_run_onnx
from support import cityscapes_like, instance_mean_loop, rel_err, requires_extension

from fastp2phd import InstanceMeanPool, fuse_modules
from fastp2phd.models import Encoder

pytestmark = requires_extension


def encoder():
    torch.manual_seed(0)
    return Encoder(3, 3, ngf=4, n_downsampling=2, impl="auto").eval()  # auto: the C++ instance_mean on CPU


def test_encoder_exports_to_onnx_and_runs_in_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    example = (torch.randn(1, 3, 16, 32), cityscapes_like(1, 16, 32, seed=0))
    other = (torch.randn(2, 3, 24, 40), cityscapes_like(2, 24, 40, seed=1))
    assert export_and_run_onnx(encoder(), example, other, ["image", "inst"], tmp_path / "e.onnx") < 1e-5


def test_fused_user_model_exports_to_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = fuse_modules(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.InstanceNorm2d(4),
                                             torch.nn.LeakyReLU(0.2), torch.nn.Conv2d(4, 2, 1)).eval())
    difference = export_and_run_onnx(model, (torch.randn(1, 3, 8, 8),), (torch.randn(3, 3, 10, 6),), ["x"],
                                     tmp_path / "m.onnx")
    assert difference < 1e-5


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the networks' size checks become constants
def test_torch_export_and_jit_trace_record_standard_ops():
    model = encoder()
    image, inst = torch.randn(2, 3, 16, 32), cityscapes_like(2, 16, 32, seed=2)
    expected = model(image, inst)
    exported = torch.export.export(model, (image, inst))
    assert_no_fastp2phd_ops(str(exported.graph))
    other = (torch.randn(2, 3, 16, 32), cityscapes_like(2, 16, 32, seed=3))
    assert rel_err(exported.module()(*other), model(*other)) < 1e-6
    traced = torch.jit.trace(model, (image, inst), check_trace=False)
    assert_no_fastp2phd_ops(str(traced.inlined_graph))
    assert rel_err(traced(image, inst), expected) < 1e-6


IDS = {
    "one segment": torch.full((2, 1, 5, 6), 7),
    "one-pixel segments": torch.arange(30).view(1, 1, 5, 6),
    "Cityscapes-like": cityscapes_like(2, 12, 20, seed=4),
    "uint8": torch.randint(0, 255, (2, 1, 5, 7), dtype=torch.uint8),
    "float": torch.randint(0, 4, (1, 1, 6, 6)).float() * 1000,
    "negative and 64-bit": torch.randint(-3, 3, (2, 1, 4, 9)) * 2**40,
}


@pytest.mark.parametrize("inst", IDS.values(), ids=IDS.keys())
def test_exported_instance_mean_matches_the_loop_definition(inst):
    feat = torch.randn(inst.shape[0], 3, *inst.shape[2:], dtype=torch.float64)
    exported = torch.export.export(InstanceMeanPool("cpp"), (feat, inst)).module()
    assert rel_err(exported(feat, inst), instance_mean_loop(feat, inst)) < 1e-12


def test_instance_mean_pool_exports():
    exported = torch.export.export(InstanceMeanPool("cpp"), (torch.randn(1, 2, 4, 4), torch.randint(0, 3, (1, 1, 4, 4))))
    assert_no_fastp2phd_ops(str(exported.graph))

"""The Triton kernels compile for an H100 (sm_90) without spilling registers.

The interpreter runs the kernels' logic on CPU tensors but never compiles them;
this compiles each kernel to a cubin, at the tile sizes the launchers pick for
pix2pixHD's real shapes, and reads ptxas' register report. No GPU is needed.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastp2phd.kernels import instance_mean as mean_kernels  # noqa: E402
from fastp2phd.kernels import instance_norm_act as norm_kernels  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
PTXAS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas-blackwell")
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                torch.int32: "i32", torch.int64: "i64"}
FLOAT_ARGS = {"eps", "slope"}
INT64_ARGS = {"lowest"}
# (N, C, H, W) of pix2pixHD layers at 1024x512 and 2048x1024 (the benchmark shapes).
SHAPES = [(1, 64, 1024, 512), (1, 64, 2048, 1024), (4, 256, 256, 128), (8, 1024, 64, 32)]

if not os.path.isfile(PTXAS):
    pytest.skip("Triton's NVIDIA backend (ptxas) is not installed", allow_module_level=True)


def compile_kernel(fn, pointer_types: dict, constexprs: dict):
    """Compile ``fn`` for sm_90: pointers typed by ``pointer_types`` (default fp32), other ints i32."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_types.get(name, "fp32")
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if name in INT64_ARGS else "i32"
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=H100)


def register_report(kernel) -> tuple[int, int]:
    """(registers, spill store bytes) from ptxas for the compiled kernel's PTX."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        result = subprocess.run([PTXAS, "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
                                capture_output=True, text=True, timeout=120)
    finally:
        os.unlink(f.name)
    report = result.stdout + result.stderr
    assert result.returncode == 0, report
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return registers, spills


def norm_tilings():
    """Distinct (layout constexpr, BLOCK_C, BLOCK_P, MAX_CHUNKS_P2) the launcher picks for SHAPES."""
    configs = set()
    for n, c, h, w in SHAPES:
        p = h * w
        for stride_c, stride_p, layout in ((p, 1, "stride_p"), (1, c, "stride_c")):
            block_c, block_p, _, _, chunks = norm_kernels._tiling(n, c, p, stride_c, stride_p)
            configs.add((layout, block_c, block_p, triton.next_power_of_2(chunks)))
    return sorted(configs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", norm_tilings(), ids=str)
def test_instance_norm_act_kernels_compile_without_spills(config, dtype):
    layout, block_c, block_p, max_chunks = config
    tiles = {"BLOCK_C": block_c, "BLOCK_P": block_p, layout: 1}  # Triton specialises the unit stride
    data = {"x_ptr": TRITON_TYPES[dtype], "y_ptr": TRITON_TYPES[dtype], "dy_ptr": TRITON_TYPES[dtype],
            "saved_ptr": TRITON_TYPES[dtype], "dx_ptr": TRITON_TYPES[dtype]}
    kernels = [
        (norm_kernels._forward_stats_kernel, tiles),
        (norm_kernels._forward_normalize_kernel, {**tiles, "ACTIVATION": 2, "MAX_CHUNKS_P2": max_chunks}),
    ]
    for saved_is_output in (True, False):
        grads = {**tiles, "ACTIVATION": 2 if saved_is_output else 1, "SAVED_IS_OUTPUT": saved_is_output,
                 "dy_" + layout: 1}
        kernels += [(norm_kernels._backward_sums_kernel, grads),
                    (norm_kernels._backward_dx_kernel, {**grads, "MAX_CHUNKS_P2": max_chunks})]
    for fn, constexprs in kernels:
        registers, spills = register_report(compile_kernel(fn, data, constexprs))
        assert spills == 0, f"{fn.__name__} {constexprs}: {spills} bytes of spill stores ({registers} registers)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("id_dtype", [torch.int32, torch.int64])
def test_instance_mean_kernels_compile_without_spills(dtype, id_dtype):
    import triton.language as tl

    data = {"feat_ptr": TRITON_TYPES[dtype], "out_ptr": TRITON_TYPES[dtype], "keys_ptr": TRITON_TYPES[id_dtype],
            "sums_ptr": "fp64", "counts_ptr": "i32", "means_ptr": "fp64" if dtype == torch.float64 else "fp32"}
    scan = tl.float64 if dtype == torch.float64 else tl.float32
    for fn, constexprs in (
        (mean_kernels._segment_sums_kernel, {"BLOCK": mean_kernels.BLOCK, "SCAN_DTYPE": scan, "stride_fp": 1}),
        (mean_kernels._broadcast_means_kernel, {"BLOCK": mean_kernels.BLOCK, "stride_op": 1}),
    ):
        registers, spills = register_report(compile_kernel(fn, data, {**constexprs, "stride_kp": 1}))
        assert spills == 0, f"{fn.__name__}: {spills} bytes of spill stores ({registers} registers)"

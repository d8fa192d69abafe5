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
TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
                torch.int32: "i32", torch.int64: "i64"}
FLOAT_ARGS = {"eps", "slope"}  # float64 (annotated in the kernels)
# (N, C, H, W) of pix2pixHD layers at 1024x512 and 2048x1024 (the benchmark shapes), and batch-1 deep layers.
SHAPES = [(1, 64, 1024, 512), (1, 64, 2048, 1024), (4, 256, 256, 128), (8, 1024, 64, 32), (1, 1024, 32, 64), (1, 512, 64, 128)]


def triton_ptxas(arch: int) -> str | None:
    """The ptxas Triton itself runs for ``arch`` (its choice differs between Triton releases)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except Exception:  # no NVIDIA backend, or no ptxas binary
        return None


PTXAS = triton_ptxas(H100.arch)
if PTXAS is None or not os.path.isfile(PTXAS):
    pytest.skip("Triton's NVIDIA backend (ptxas) is not installed", allow_module_level=True)


def compile_kernel(fn, pointer_types: dict, constexprs: dict, num_warps: int = 4):
    """Compile ``fn`` for sm_90 with ``num_warps`` warps: pointers typed by ``pointer_types`` (default fp32),
    eps and slope fp64, other ints i32."""
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_types.get(name, "fp32")
        elif name in FLOAT_ARGS:
            signature[name] = "fp64"
        else:
            signature[name] = "i32"
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=H100,
                          options={"num_warps": num_warps})


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("config", norm_tilings(), ids=str)
def test_instance_norm_act_kernels_compile_without_spills(config, dtype):
    import triton.language as tl

    layout, block_c, block_p, max_chunks = config
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    tiles = {"BLOCK_C": block_c, "BLOCK_P": block_p, "ACC_DTYPE": acc, layout: 1}  # Triton specialises unit strides
    stats = "fp64" if dtype == torch.float64 else "fp32"
    data = {"x_ptr": TRITON_TYPES[dtype], "y_ptr": TRITON_TYPES[dtype], "dy_ptr": TRITON_TYPES[dtype],
            "dx_ptr": TRITON_TYPES[dtype], "mean_ptr": "fp64", "rstd_ptr": stats,
            "partial_mean_ptr": stats, "partial_m2_ptr": stats, "partial_g_ptr": stats, "partial_gx_ptr": stats}
    kernels = [
        (norm_kernels._forward_fused_kernel, {**tiles, "ACTIVATION": 2}),
        (norm_kernels._forward_stats_kernel, tiles),
        (norm_kernels._forward_normalize_kernel, {**tiles, "ACTIVATION": 2, "MAX_CHUNKS_P2": max_chunks}),
    ]
    for activation in (1, 2):
        grads = {**tiles, "ACTIVATION": activation, "dy_" + layout: 1}
        kernels += [(norm_kernels._backward_fused_kernel, grads),
                    (norm_kernels._backward_sums_kernel, grads),
                    (norm_kernels._backward_dx_kernel, {**grads, "MAX_CHUNKS_P2": max_chunks})]
    for fn, constexprs in kernels:
        warps = norm_kernels._warps(block_c, block_p, dtype)
        registers, spills = register_report(compile_kernel(fn, data, constexprs, num_warps=warps))
        assert spills == 0, f"{fn.__name__} {constexprs}: {spills} bytes of spill stores ({registers} registers)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_instance_mean_kernels_compile_without_spills(dtype):
    data = {"feat_ptr": TRITON_TYPES[dtype], "out_ptr": TRITON_TYPES[dtype], "segment_ptr": "i64",
            "sums_ptr": "fp64", "counts_ptr": "i32"}
    for fn, constexprs in (
        (mean_kernels._segment_sums_kernel, {"BLOCK": mean_kernels.BLOCK, "stride_fp": 1}),
        (mean_kernels._broadcast_means_kernel, {"BLOCK": mean_kernels.BLOCK, "stride_op": 1}),
    ):
        registers, spills = register_report(compile_kernel(fn, data, constexprs))
        assert spills == 0, f"{fn.__name__}: {spills} bytes of spill stores ({registers} registers)"

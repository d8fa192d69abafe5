"""The CUDA sources compile with nvcc (compile only: this machine may have no GPU)."""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA_SOURCES = sorted(glob.glob(str(ROOT / "csrc" / "*.cu")))


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", CUDA_SOURCES, ids=os.path.basename)
def test_cuda_source_compiles(source, tmp_path):
    from torch.utils import cpp_extension

    includes = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
    # CPU builds of torch ship the c10/cuda headers but not the one CMake generates for them.
    generated = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any((Path(d) / generated).is_file() for d in includes):
        stub = tmp_path / "stub" / generated
        stub.parent.mkdir(parents=True)
        stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(tmp_path / "stub"))
    command = [
        "nvcc", "-c", source, "-o", str(tmp_path / "kernel.o"), "-std=c++20", "-O3", "-arch=sm_90",
        "-Xcompiler", "-fPIC", *cpp_extension.COMMON_NVCC_FLAGS, *[f"-I{d}" for d in includes],
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "kernel.o").stat().st_size > 0


def test_a_checkout_on_pythonpath_imports_its_own_triton_kernels(tmp_path):
    """Without an install's package_dir mapping, fastp2phd.kernels is still the kernels/ beside the
    package imported (not another install's, and not missing)."""
    pytest.importorskip("triton")
    for name in ("fastp2phd", "kernels"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    shutil.copy(ROOT / "setup.py", tmp_path / "setup.py")
    probe = ("import fastp2phd, fastp2phd.kernels.instance_norm_act as k; "
             "print(fastp2phd.__file__); print(k.__file__)")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "FASTP2PHD_NO_EXT": "1"}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT.parent, env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == [str(tmp_path / "fastp2phd" / "__init__.py"), str(tmp_path / "kernels" / "instance_norm_act.py")]

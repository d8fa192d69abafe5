"""Build fastp2phd and its optional C++/CUDA extension fastp2phd._C.

The extension is a CppExtension by default and a CUDAExtension (adding the .cu
sources) when torch is a CUDA build and nvcc is found. Environment switches:

  FORCE_CUDA=1         build the CUDA kernels even when torch or nvcc look unfit
  FASTP2PHD_NO_EXT=1   skip the extension; every op then runs its PyTorch reference

Install with `pip install --no-build-isolation -e .` so the extension is built
against the torch that is already installed.
"""
import glob
import os
import re
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# kernels/ installs as fastp2phd.kernels; editing/static holds the editor's page (data, no Python).
PACKAGES = find_packages(include=["fastp2phd", "fastp2phd.*"]) + ["fastp2phd.kernels", "fastp2phd.editing.static"]
PACKAGE_DIR = {"fastp2phd": "fastp2phd", "fastp2phd.kernels": "kernels"}


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def extension_modules():
    if _flag("FASTP2PHD_NO_EXT"):
        print("fastp2phd: FASTP2PHD_NO_EXT is set, skipping the C++/CUDA extension")
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    with_cuda = _flag("FORCE_CUDA") or (torch.version.cuda is not None and CUDA_HOME is not None)
    # at::parallel_for is an inline template over `#pragma omp parallel` in OpenMP builds of
    # torch: without -fopenmp the kernels silently run on one thread.
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    # -fno-trapping-math: the kernels never read floating-point exception flags, and without it GCC keeps
    # selects such as `x > 0 ? dy : 0` as branches instead of vectorising them.
    cxx_flags = ["-O3", "-fno-trapping-math", *openmp]
    if with_cuda:
        _default_cuda_archs(torch)
        ext = CUDAExtension(
            "fastp2phd._C",
            cpp_sources + cuda_sources,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]},
            extra_link_args=openmp,
            py_limited_api=False,
        )
    else:
        ext = CppExtension("fastp2phd._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=openmp)
    print(f"fastp2phd: building the extension with{'' if with_cuda else 'out'} CUDA kernels")
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


def _default_cuda_archs(torch):
    """On a machine without a GPU (a container build), torch's build finds no GPU architecture to compile for and
    fails with an IndexError: build for the ones torch itself was built for, unless TORCH_CUDA_ARCH_LIST says."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.is_available():
        return
    flags = getattr(torch._C, "_cuda_getArchFlags", lambda: "")()
    archs = [f"{m[1]}.{m[2]}" for m in re.finditer(r"\bsm_(\d+)(\d)\b", flags)]
    if archs:
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(archs) + "+PTX"
        print("fastp2phd: no GPU is visible, so the CUDA kernels are built for the architectures torch was built "
              f"for: TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (set it to build for fewer)")


ext_modules, cmdclass = extension_modules()

setup(
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    package_data={"fastp2phd.editing.static": ["*.html"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

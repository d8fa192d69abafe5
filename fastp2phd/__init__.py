"""fastp2phd: pix2pixHD as a fast, faithful PyTorch library.

    import fastp2phd
    model = fastp2phd.load_run("checkpoints/label2city_512p")    # a trained run, ready to generate
    image = model.inference(label, inst)
    fastp2phd.optimize_for_inference(model)                      # the same images, faster on the CPU
"""
import importlib.abc
import importlib.util
import sys
from pathlib import Path


class _CheckoutKernels(importlib.abc.MetaPathFinder):
    """Resolves ``fastp2phd.kernels`` to the source checkout's top-level ``kernels/``.

    The Triton kernels live in ``kernels/`` beside the package (the project's layout); an install maps
    that folder in as ``fastp2phd.kernels`` (setup.py's ``package_dir``). A checkout used through
    ``PYTHONPATH`` or from its root has no such mapping, so without this finder it silently lost the
    Triton path, or imported the kernels of another install of fastp2phd. The kernels imported are
    always the ones beside the package imported.
    """

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, name, path=None, target=None):
        if name != f"{__name__}.kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)])


def _map_checkout_kernels() -> None:
    package = Path(__file__).resolve().parent
    checkout_kernels = package.parent / "kernels"
    if (package / "kernels").is_dir() or not (package.parent / "setup.py").is_file() \
            or not (checkout_kernels / "__init__.py").is_file():
        return  # an installed wheel (kernels inside the package), or not a checkout
    sys.meta_path.insert(0, _CheckoutKernels(checkout_kernels))


_map_checkout_kernels()

from . import ops  # noqa: E402  (after the mapping: ops imports the kernels)
from .diagnostics import info  # noqa: E402
from ._version import __version__  # noqa: E402
from .errors import Pix2PixHDError  # noqa: E402
from .nn import InstanceMeanPool, InstanceNormAct2d, fuse_modules  # noqa: E402
from .optimize import optimize_for_inference  # noqa: E402
from .specs import DataSpec, ModelSpec, TrainSpec  # noqa: E402


__all__ = ["DataSpec", "InstanceMeanPool", "InstanceNormAct2d", "ModelSpec", "Pix2PixHDError", "TrainSpec",
           "__version__", "fuse_modules", "info", "load_run", "ops", "optimize_for_inference"]


def __getattr__(name: str):
    if name == "load_run":  # imported on first use: it brings in the networks and the data pipeline
        from .inference import load_run

        return load_run
    raise AttributeError(f"module 'fastp2phd' has no attribute {name!r}")

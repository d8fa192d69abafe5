"""fastp2phd: pix2pixHD as a fast, faithful PyTorch library.

    import fastp2phd
    model = fastp2phd.load_run("checkpoints/label2city_512p")    # a trained run, ready to generate
    image = model.inference(label, inst)
"""
from . import ops
from .diagnostics import info
from .errors import Pix2PixHDError
from .nn import InstanceMeanPool, InstanceNormAct2d, fuse_modules
from .specs import DataSpec, ModelSpec, TrainSpec

__version__ = "0.1.0"

__all__ = ["DataSpec", "InstanceMeanPool", "InstanceNormAct2d", "ModelSpec", "Pix2PixHDError", "TrainSpec",
           "__version__", "fuse_modules", "info", "load_run", "ops"]


def __getattr__(name: str):
    if name == "load_run":  # imported on first use: it brings in the networks and the data pipeline
        from .inference import load_run

        return load_run
    raise AttributeError(f"module 'fastp2phd' has no attribute {name!r}")

"""fastp2phd: pix2pixHD as a fast, faithful PyTorch library."""
from . import ops
from .diagnostics import info
from .nn import InstanceMeanPool, InstanceNormAct2d, fuse_modules

__version__ = "0.1.0"

__all__ = ["InstanceMeanPool", "InstanceNormAct2d", "__version__", "fuse_modules", "info", "ops"]

"""Drop-in modules built on fastp2phd.ops."""
from .fuse import fuse_modules
from .instance_pool import InstanceMeanPool
from .norm_act import InstanceNormAct2d

__all__ = ["InstanceMeanPool", "InstanceNormAct2d", "fuse_modules"]

"""The public functional ops of fastp2phd.

Each op lives in its own module with its contract, its pure-PyTorch reference
(``<op>_reference``), its fast paths and their torch.library registration.
"""
from ._dispatch import IMPL_ENV, default_impl
from .boundary_map import boundary_map, boundary_map_reference
from .instance_mean import instance_mean, instance_mean_reference
from .instance_norm_act import ACTIVATIONS, instance_norm_act, instance_norm_act_reference
from .sparse_input_conv2d import sparse_input_conv2d, sparse_input_conv2d_reference


def fast_paths() -> dict:
    """{op name: its FastPath entries}, for reports such as ``fastp2phd.info()``."""
    import importlib

    return {op: importlib.import_module(f"{__name__}.{op}").FAST_PATHS
            for op in ("boundary_map", "instance_mean", "instance_norm_act", "sparse_input_conv2d")}

__all__ = [
    "ACTIVATIONS",
    "IMPL_ENV",
    "boundary_map",
    "boundary_map_reference",
    "default_impl",
    "fast_paths",
    "instance_mean",
    "instance_mean_reference",
    "instance_norm_act",
    "instance_norm_act_reference",
    "sparse_input_conv2d",
    "sparse_input_conv2d_reference",
]

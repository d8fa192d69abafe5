"""Imports the Triton kernels of an op (``fastp2phd.kernels.<op>``) and says why when it cannot."""
from __future__ import annotations

import importlib
from types import ModuleType


def load_kernels(op: str) -> tuple[ModuleType | None, str | None]:
    """(kernel module, None), or (None, one sentence saying why it is unavailable)."""
    try:
        return importlib.import_module(f"fastp2phd.kernels.{op}"), None
    except ImportError as exc:
        return None, f"the Triton kernels could not be imported ({exc}); install Triton with `pip install triton`"


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 before import), i.e. on CPU tensors."""
    try:
        from . import kernels
    except ImportError:
        return False
    return kernels.INTERPRETED

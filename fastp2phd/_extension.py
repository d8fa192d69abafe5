"""Loads the optional C++/CUDA extension ``fastp2phd._C`` and says what it provides.

Importing ``_C`` runs its ``TORCH_LIBRARY_IMPL`` registrations: the CPU and CUDA
kernels of ``torch.ops.fastp2phd.*``, whose schemas ``fastp2phd.ops._library``
defines (and which loads the extension right after). When the extension is
missing or fails to load, the package still works through the PyTorch reference
implementations; ``load_error`` says why.
"""
from __future__ import annotations

load_error: str | None = None
_loaded = False


def load() -> None:
    """Import ``_C`` once; afterwards ``load_error`` is None or says why it could not be loaded."""
    global load_error, _loaded
    if _loaded:
        return
    _loaded = True
    try:
        from fastp2phd import _C  # noqa: F401  (imported for its kernel registrations)
    except ImportError as exc:  # not built, or built against another torch
        load_error = (
            f"the C++ extension fastp2phd._C could not be loaded ({exc}); "
            "build it with `pip install --no-build-isolation -e .` in the repository"
        )


def is_loaded() -> bool:
    load()
    return load_error is None

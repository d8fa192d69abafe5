"""The Triton kernels, run on CPU tensors by Triton's interpreter.

Run with ``TRITON_INTERPRET=1 python -m pytest tests/interpreter`` (``make test``
does): the variable must be set before Triton is imported, so these tests run in
their own process, apart from the torch.compile tests of the main suite.
"""
import pytest


@pytest.fixture(autouse=True, scope="session")
def _kernels_are_interpreted():
    from fastp2phd import kernels

    if not kernels.INTERPRETED:
        pytest.fail("run this folder with TRITON_INTERPRET=1 set before Python starts", pytrace=False)
    _interpreter_runs_loops()


def _interpreter_runs_loops():
    """A loop bounded by a kernel argument, as the kernels have. Triton 3.6's interpreter cannot run one with
    numpy 2.4 or later (it converts a 1-element array to an int, which numpy refuses): every test would fail with
    the same TypeError, so say it once."""
    import numpy
    import torch
    import triton
    import triton.language as tl

    @triton.jit
    def count_to(out_ptr, n):
        total = 0
        for _ in range(n):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count_to[(1,)](out, 3)
    except Exception as error:  # the interpreter wraps the TypeError in its own error type
        if "0-dimensional" not in str(error):
            raise
        pytest.fail(f"Triton {triton.__version__}'s interpreter cannot run these kernels with numpy "
                    f"{numpy.__version__}; install numpy<2.4 or a newer Triton", pytrace=False)
    assert out.item() == 3

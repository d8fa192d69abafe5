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

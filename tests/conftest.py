"""Which half of the suite runs in this process, and shared fixtures (helpers live in support.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The interpreter tests need TRITON_INTERPRET=1 before Triton is imported, and torch.compile
# fails under the interpreter: each half of the suite runs in a process of its own.
if os.environ.get("TRITON_INTERPRET") == "1":
    collect_ignore = [path.name for path in Path(__file__).parent.glob("test_*.py")]
else:
    collect_ignore = ["interpreter"]


@pytest.fixture
def poisoned_empty():
    """Make torch/ATen fill newly allocated tensors with NaN / max int, so a kernel
    that leaves an output element unwritten is caught."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous)

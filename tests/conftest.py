"""Which half of the suite runs in this process, and shared fixtures (helpers live in support.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The interpreter tests need TRITON_INTERPRET=1 before Triton is imported, and torch.compile
# fails under the interpreter: each half of the suite runs in a process of its own.
if os.environ.get("TRITON_INTERPRET") == "1":
    collect_ignore = [path.name for path in Path(__file__).parent.glob("test_*.py")] + ["ops"]
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


def pytest_terminal_summary(terminalreporter):
    """Skipped tests grouped by reason, one line each: "461 needs a CUDA device", so a run says what it
    could not check here (pytest's own -rs lists every skip marker's line)."""
    reasons: dict[str, int] = {}
    for report in terminalreporter.stats.get("skipped", []):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        reason = reason.removeprefix("Skipped: ")
        reasons[reason] = reasons.get(reason, 0) + 1
    if reasons:
        terminalreporter.section("skipped, by reason")
        for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
            terminalreporter.write_line(f"{count:5d}  {reason}")

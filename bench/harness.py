"""What every benchmark suite shares: the run settings, inputs, timing and memory measurement.

A measurement is one pytest-benchmark test: ``measure(benchmark, settings, suite=..., case=...,
provider=..., fn=...)`` warms ``fn`` up, records its peak memory, and times it; the suite,
case, provider, bytes moved and images per call travel in ``benchmark.extra_info`` and end
up in ``bench/results/<device>-<date>.json`` (see conftest.py) and in REPORT.md.
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

try:
    import resource  # POSIX only
except ImportError:
    resource = None

import numpy as np
import torch

from fastp2phd.cpu_allocator import heap_bytes_in_use
from fastp2phd.data import cityscapes_like_instances


@dataclass(frozen=True)
class Settings:
    device: torch.device
    smoke: bool  # tiny shapes and one round: checks the suites run (part of the test suite)
    dataroot: str | None  # a folder of real Cityscapes *_instanceIds.png to use instead of synthetic maps

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def rounds(self, slow: bool = False) -> int:
        if self.smoke:
            return 1
        if self.cuda:
            return 3 if slow else 10
        return 3 if slow else 5

    def map_sizes(self) -> list[tuple[int, int, int]]:
        """(batch, height, width) of the boundary-map and instance-mean workloads."""
        if self.smoke:
            return [(1, 32, 64), (2, 32, 64)]
        return [(1, 512, 1024), (1, 1024, 2048), (4, 1024, 2048)]


def instance_maps(settings: Settings, batch: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(batch, 1, H, W) int32 instance ids: synthetic Cityscapes-like maps, or real ones from --bench-dataroot."""
    if settings.dataroot:
        from PIL import Image

        files = sorted(Path(settings.dataroot).rglob("*instanceIds.png"))
        if not files:
            raise FileNotFoundError(f"--bench-dataroot {settings.dataroot} holds no *instanceIds.png files")
        maps = []
        for i in range(batch):
            image = Image.open(files[(seed + i) % len(files)])
            if image.size != (width, height):
                image = image.resize((width, height), Image.NEAREST)
            maps.append(torch.from_numpy(np.array(image).astype(np.int32)))
        return torch.stack(maps)[:, None].to(settings.device)
    return cityscapes_like_instances(batch, height, width, seed=seed).to(settings.device)


class _PeakMemory:
    """Peak memory of this process above its level at start, sampled every millisecond: the bytes malloc has
    handed out where glibc says (the session keeps freed memory, so resident memory would not grow on a call
    that reuses it), else resident memory."""

    def __init__(self, base: int | None = None):
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.peak = 0
        self.running = False
        self.heap = heap_bytes_in_use() is not None
        self.given_base = base

    def _bytes(self) -> int:
        if self.heap:
            return heap_bytes_in_use()
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.base = self.peak = self._bytes()
        if self.given_base is not None:
            self.base = self.given_base
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._bytes())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._bytes())

    @property
    def megabytes(self) -> float:
        return (self.peak - self.base) / 2**20


def bytes_in_use(settings: Settings) -> int:
    """The level ``peak_memory_mb`` counts from: CUDA's allocated bytes, or the CPU's (malloc's, else resident)."""
    return torch.cuda.memory_allocated() if settings.cuda else _PeakMemory()._bytes()


def peak_memory_mb(fn: Callable[[], object], settings: Settings, base: int | None = None) -> float | None:
    """Peak memory one call allocates: CUDA max_memory_allocated; on the CPU, the peak growth of malloc's bytes in
    use (glibc), else of resident memory. ``base`` (``bytes_in_use`` taken earlier) counts from there instead of
    from the call's start: what a provider holds between calls (an optimiser's gradients, say) then counts too."""
    if settings.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - (start if base is None else base)) / 2**20
    if heap_bytes_in_use() is None and not os.path.exists("/proc/self/statm"):
        return None
    with _PeakMemory(base) as rss:
        result = fn()  # held until the last sample: a call shorter than the sampling period still counts its output
    del result
    return rss.megabytes


def _minor_page_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt if resource else 0


# Warm when this many calls in a row page-fault less than STEADY_FAULTS (4 KiB pages: 1 MiB), or after
# MAX_WARM_UP_CALLS calls or MAX_WARM_UP_SECONDS seconds (the slow model rows get 1-2 calls).
STEADY_FAULTS, QUIET_CALLS, MAX_WARM_UP_CALLS, MAX_WARM_UP_SECONDS = 256, 5, 40, 5.0


def warm_up_to_steady_state(target: Callable[[], object]) -> int:
    """Call ``target`` until calls stop page-faulting, each result held until the next call returns, as
    pytest-benchmark holds a round's result. Returns the number of calls.

    With freed memory kept (conftest), malloc still carves small allocations out of a freed large block,
    so a large output lands on fresh pages again for the first ~10 calls: a 32 MiB output took 10 ms
    page-faulting and 2 ms after, and whether the op and its floor were past that point at the timed
    rounds decided a 5x ratio. Timed rounds are then all in the steady state a loop reaches."""
    quiet, start = 0, time.perf_counter()
    for calls in range(1, MAX_WARM_UP_CALLS + 1):
        before = _minor_page_faults()
        held = target()  # noqa: F841 (held on purpose)
        quiet = quiet + 1 if _minor_page_faults() - before < STEADY_FAULTS else 0
        if quiet == QUIET_CALLS or time.perf_counter() - start > MAX_WARM_UP_SECONDS:
            break
    return calls


def measure(benchmark, settings: Settings, *, suite: str, case: str, provider: str, fn: Callable[[], object],
            bytes_moved: int | None = None, images: int | None = None, slow: bool = False,
            rounds: int | None = None, memory_base: int | None = None) -> None:
    """Warm up, record peak memory (from ``memory_base``, see ``peak_memory_mb``), warm up to the allocator's
    steady state (CPU), and time ``fn``
    (synchronising the GPU after each call) over ``rounds`` rounds (default: the settings' number). The
    page faults per timed round are recorded beside the time: a row that page-faults ran off the steady state."""
    if settings.cuda:
        def target():
            fn()
            torch.cuda.synchronize()
    else:
        target = fn
    target()  # compilation, caches
    benchmark.group = f"{suite} | {case}"
    benchmark.extra_info.update(suite=suite, case=case, provider=provider, bytes=bytes_moved, images=images,
                                peak_mb=peak_memory_mb(target, settings, memory_base))
    if settings.cuda:
        target()
    elif not settings.smoke:
        benchmark.extra_info["warm_up_calls"] = warm_up_to_steady_state(target)
    rounds = rounds or settings.rounds(slow)
    before = _minor_page_faults()
    benchmark.pedantic(target, rounds=rounds, iterations=1, warmup_rounds=0)
    if not settings.cuda:
        benchmark.extra_info["page_faults_per_round"] = (_minor_page_faults() - before) // rounds


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def compiled_or_skip(fn: Callable, *args):
    """torch.compile(fn), skipping the benchmark when it cannot compile here."""
    import pytest

    try:
        compiled = torch.compile(fn, dynamic=False)
        compiled(*args)
        return compiled
    except Exception as exc:  # an op Inductor cannot take (e.g. data-dependent shapes)
        pytest.skip(f"torch.compile does not apply: {type(exc).__name__}: {str(exc)[:120]}")


def check_agrees(settings: Settings, got, expected, *, what: str, atol: float = 1e-5, rtol: float = 1e-5,
                 layout: bool = True) -> None:
    """In the smoke run, a provider's result against the reference's: the same dtype, shape, memory layout and
    values (within atol/rtol), so every provider of a case computes the same thing. ``got`` and ``expected``
    are tensors, arrays, or tuples/lists/dicts of them. ``layout=False`` for gradients, whose layout autograd
    picks (a permute's backward gives a channels-last gradient). Full runs skip it (one more call at the big sizes)."""
    if not settings.smoke:
        return
    if isinstance(expected, dict):
        assert isinstance(got, dict) and got.keys() == expected.keys(), f"{what}: keys {list(got)}, not {list(expected)}"
        for key in expected:
            check_agrees(settings, got[key], expected[key], what=f"{what} [{key}]", atol=atol, rtol=rtol, layout=layout)
        return
    if isinstance(expected, (tuple, list)):
        assert isinstance(got, (tuple, list)) and len(got) == len(expected), f"{what}: {len(got)} results, not {len(expected)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            check_agrees(settings, g, e, what=f"{what} [{i}]", atol=atol, rtol=rtol, layout=layout)
        return
    got = torch.as_tensor(got) if isinstance(got, np.ndarray) else got
    expected = torch.as_tensor(expected) if isinstance(expected, np.ndarray) else expected
    assert isinstance(got, torch.Tensor), f"{what}: returned {type(got).__name__}, not a tensor"
    assert got.dtype == expected.dtype, f"{what}: dtype {got.dtype}, the reference's {expected.dtype}"
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)}, the reference's {tuple(expected.shape)}"
    assert not layout or got.is_contiguous() == expected.is_contiguous(), (
        f"{what}: strides {got.stride()}, the reference's {expected.stride()} (another memory layout)")
    torch.testing.assert_close(got.detach().cpu(), expected.detach().cpu(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")

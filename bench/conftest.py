"""pytest-benchmark configuration of fastp2phd's benchmark suites.

    make bench                                   # the CPU suites, then REPORT.md
    python -m pytest bench --bench-device cuda   # the GPU suites (bench/gpu_check.sh does this)

Every measurement (with device, versions and commit) goes to
``bench/results/<device>-<cpu or gpu model>-<date and time>.json`` (``--bench-out`` to change
the folder) as it is made, so a run cut short keeps its rows (``"complete": false``); at the end of a
run ``bench/report.py`` regenerates REPORT.md and its plots: for each device and
suite it takes the newest run that measured that suite, so every ratio compares numbers
from one run on one device.
"""
from __future__ import annotations

import datetime
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from harness import Settings  # noqa: E402

from fastp2phd.cpu_allocator import keep_freed_memory  # noqa: E402
from fastp2phd.files import write_text  # noqa: E402


def pytest_configure(config):
    # Every torch row runs as the fastp2phd commands run it: with freed CPU memory kept for reuse
    # (fastp2phd.cpu_allocator), not paying page faults on each large allocation.
    keep_freed_memory()


def pytest_addoption(parser):
    group = parser.getgroup("fastp2phd benchmarks")
    group.addoption("--bench-device", default="cpu", choices=["cpu", "cuda"], help="device to benchmark")
    group.addoption("--bench-dataroot", default=None, help="folder of real Cityscapes *_instanceIds.png maps")
    group.addoption("--bench-out", default=str(BENCH / "results"), help="folder for the results JSON")
    group.addoption("--bench-smoke", action="store_true", help="tiny shapes, one round, no results file")


@pytest.fixture(scope="session")
def settings(request) -> Settings:
    device = torch.device(request.config.getoption("--bench-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.exit("--bench-device cuda: no CUDA device is available", returncode=2)
    return Settings(device, request.config.getoption("--bench-smoke"), request.config.getoption("--bench-dataroot"))


def device_name(device: str) -> str:
    """The GPU's name, or the CPU's with the vector ISA PyTorch uses on it (the same model name is lent with and
    without AVX-512)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({torch.backends.cpu.get_cpu_capability()})"


def run_metadata(device: str) -> dict:
    import triton

    try:
        # "-dirty" when the working tree differs from the commit: the numbers are of uncommitted code
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=BENCH, capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    return {
        "device": device, "device_name": device_name(device), "cpu_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton.__version__,
        "python": platform.python_version(), "commit": commit,
    }


def _save_results(config, complete: bool) -> Path | None:
    """Write every measurement so far to this run's results file (named when the run's first row is saved), as a
    whole new file each time: a run killed midway (a GPU call's time limit) keeps the rows it measured, marked
    ``"complete": false``. None when there is nothing to write."""
    bench_session = getattr(config, "_benchmarksession", None)
    if bench_session is None or not bench_session.benchmarks or config.getoption("--bench-smoke"):
        return None
    device = config.getoption("--bench-device")
    rows = []
    for bench in bench_session.benchmarks:
        stats = bench.stats
        rows.append({
            **bench.extra_info,
            "median_s": stats.median, "iqr_s": stats.iqr, "min_s": stats.min, "max_s": stats.max,
            "rounds": stats.rounds,
        })
    if not hasattr(config, "_fastp2phd_run"):
        meta = run_metadata(device)
        slug = re.sub(r"[^a-z0-9]+", "-", meta["device_name"].lower()).strip("-")
        out = Path(config.getoption("--bench-out"))
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"{device}-{slug}-{meta['date'].replace(':', '')}.json"
        if path.exists():  # never overwrite an earlier run
            raise RuntimeError(f"{path} exists; run again in a second")
        config._fastp2phd_run = (path, meta)
    path, meta = config._fastp2phd_run
    write_text(path, json.dumps({**meta, "complete": complete, "results": rows}, indent=1) + "\n")  # (atomic)
    return path


@pytest.hookimpl(trylast=True)  # (after the benchmark fixture's teardown has added the test's row)
def pytest_runtest_teardown(item, nextitem):
    _save_results(item.config, complete=False)


def pytest_sessionfinish(session, exitstatus):
    path = _save_results(session.config, complete=True)
    if path is None:
        return
    print(f"\nbenchmark results: {path}")
    from report import write_report

    print(f"report: {write_report(Path(session.config.getoption('--bench-out')), BENCH / 'REPORT.md')}")

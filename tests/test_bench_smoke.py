"""The benchmark suites run end to end at tiny sizes (one round each), so neither `make bench`
nor a lent GPU's minutes are lost to a broken suite; the report renders from a results file."""
from __future__ import annotations

import json
import mmap
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_suites_smoke():
    pytest.importorskip("pytest_benchmark")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "bench", "--bench-smoke", "-q", "-p", "no:cacheprovider",
         "--benchmark-disable-gc"], capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary and "passed" in summary, summary


def test_report_renders_targets_and_tables(tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "bench"))
    from report import write_report

    rows = []
    for provider, seconds in (("floor", 0.010), ("fastp2phd", 0.011), ("reference", 0.05), ("official", 0.04),
                              ("scikit-image", 0.5)):
        rows.append({"suite": "boundary_map", "case": "4x1x1024x2048 int32 -> float32", "provider": provider,
                     "bytes": 64 * 2**20, "images": 4, "peak_mb": 40.0, "median_s": seconds, "iqr_s": seconds / 20,
                     "min_s": seconds, "max_s": seconds, "rounds": 5, "page_faults_per_round": 0})
    rows[2]["page_faults_per_round"] = 8192  # the reference's timed rounds page-faulted 32 MiB each
    run = {"device": "cpu", "device_name": "Test CPU", "cpu_threads": 2, "date": "2026-11-27T10:00Z",
           "torch": "x", "cuda": None, "triton": "y", "python": "3.11", "commit": "abc", "results": rows}
    results = tmp_path / "results"
    results.mkdir()
    (results / "cpu-test-cpu-2026-11-27T1000Z.json").write_text(json.dumps(run))
    report = write_report(results, tmp_path / "REPORT.md").read_text()
    assert "| boundary_map 4x1x1024x2048: within 1.25× of its floor (time / floor time) | 1.10× | yes |" in report
    assert "≥ 20× faster than scikit-image | 45.45× | yes |" in report
    assert "≥ 2× faster than the original 4-pass formulation | 3.64× | yes |" in report
    assert "instance_mean fwd 1x3x1024x2048: within 2× of its floor | not measured | — |" in report
    assert (tmp_path / "results" / "plots" / "cpu-test-cpu-boundary-map.png").is_file()
    assert "| 4x1x1024x2048 int32 -> float32 | reference | 50 † |" in report  # marked: off the steady state
    assert "| 4x1x1024x2048 int32 -> float32 | floor | 10 |" in report
    # A target measured with a row that page-faulted is shown, marked, and not judged.
    rows[1]["page_faults_per_round"] = 8192
    (results / "cpu-test-cpu-2026-11-27T1000Z.json").write_text(json.dumps(run))
    report = write_report(results, tmp_path / "REPORT.md").read_text()
    assert "| boundary_map 4x1x1024x2048: within 1.25× of its floor (time / floor time) | 1.10× † | — |" in report


def test_warm_up_stops_once_calls_stop_page_faulting_and_is_capped_when_they_never_do():
    sys.path.insert(0, str(ROOT / "bench"))
    import harness

    assert harness.warm_up_to_steady_state(lambda: None) == harness.QUIET_CALLS

    def fresh_pages():  # every call maps and touches 8 MiB of new pages
        pages = mmap.mmap(-1, 8 << 20)
        pages[::4096] = b"x" * (len(pages) // 4096)
        return pages

    if harness._minor_page_faults() == 0:
        pytest.skip("no page-fault counter on this platform")
    assert harness.warm_up_to_steady_state(fresh_pages) == harness.MAX_WARM_UP_CALLS


def test_report_judges_bf16_speed_and_psnr(tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "bench"))
    from report import write_report

    def row(case, provider, seconds, psnr, images=1):
        return {"suite": "inference precision", "case": case, "provider": provider, "bytes": None, "images": images,
                "peak_mb": 100.0, "median_s": seconds, "iqr_s": 0.01, "min_s": seconds, "max_s": seconds,
                "rounds": 3, "psnr_db": psnr}

    case = "1024p generator at 512x1024"
    rows = [row(case, "fp32", 2.0, float("inf")), row(case, "bf16", 1.25, 41.0), row(case, "onnxruntime", 2.5, 90.0),
            row("demo model, 8 held-out scenes of 128x256", "bf16", 0.4, 29.5, images=8)]
    run = {"device": "cpu", "device_name": "Test CPU", "cpu_threads": 2, "date": "2026-11-29T10:00Z",
           "torch": "x", "cuda": None, "triton": "y", "python": "3.11", "commit": "abc", "results": rows}
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "cpu-test-cpu-2026-11-29T1000Z.json").write_text(json.dumps(run))
    report = write_report(tmp_path / "results", tmp_path / "REPORT.md").read_text()
    assert "1024p generator at 512x1024: at least 1.5× fp32 eager (fp32 time / bf16 time) | 1.60× | yes |" in report
    assert "PSNR against fp32 at least 30 dB (lowest scene) | 29.50 dB | **no** |" in report
    assert "onnxruntime (CPU) vs fp32 eager, 1024p generator at 512x1024" in report and "| 0.80× | — |" in report
    assert f"| {case} | bf16 | 1250 | 10 | 0.8 | 100 | 1.60× | 41.0 |" in report
    assert f"| {case} | fp32 | 2000 | 10 | 0.5 | 100 | 1.00× | exact |" in report


def test_report_takes_the_copy_bandwidth_only_from_the_same_run(tmp_path):
    """'% of copy' and the bandwidth target divide by the copy bandwidth of the run that measured the op, never
    by another run's (a newer copy-only run, or an older one on a differently loaded machine)."""
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(ROOT / "bench"))
    from report import write_report

    case = "G first layer, 2048x1024 1x64x2048x1024 float32"
    op = {"suite": "instance_norm_act fwd", "case": case, "provider": "fastp2phd", "bytes": 3 * 2**29, "images": None,
          "peak_mb": 512.0, "median_s": 0.001, "iqr_s": 0.0001, "min_s": 0.001, "max_s": 0.001, "rounds": 10}
    copy = {"suite": "memory copy", "case": "1024 MiB float32", "provider": "copy", "bytes": 2**31, "images": None,
            "peak_mb": 0.0, "median_s": 0.001, "iqr_s": 0.0001, "min_s": 0.001, "max_s": 0.001, "rounds": 10}
    meta = {"device": "cuda", "device_name": "Test GPU", "cpu_threads": 2, "torch": "x", "cuda": "12", "triton": "y",
            "python": "3.11", "commit": "abc"}
    results = tmp_path / "results"
    results.mkdir()
    (results / "a.json").write_text(json.dumps({**meta, "date": "2026-12-01T10:00Z", "results": [op]}))
    (results / "b.json").write_text(json.dumps({**meta, "date": "2026-12-02T10:00Z", "results": [copy]}))
    report = write_report(results, tmp_path / "REPORT.md").read_text()
    op_line = next(line for line in report.splitlines() if line.startswith(f"| {case} | fastp2phd |"))
    assert "of copy" not in op_line, op_line
    assert f"| instance_norm_act fwd {case}: ≥ 80% of the bandwidth bound | not measured | — |" in report
    (results / "b.json").unlink()
    (results / "a.json").write_text(json.dumps({**meta, "date": "2026-12-01T10:00Z", "results": [op, copy]}))
    report = write_report(results, tmp_path / "REPORT.md").read_text()
    assert "(75% of copy)" in report
    assert f"| instance_norm_act fwd {case}: ≥ 80% of the bandwidth bound | 75.00% | **no** |" in report

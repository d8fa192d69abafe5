"""The GPU benchmark script runs end to end (tiny shapes on the CPU), so a lent GPU's minutes
are not lost to a typo."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_kernel_benchmark_script_smoke(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "kernels_gpu.py"), "--out", str(tmp_path), "--smoke", "--device", "cpu"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "kernels_gpu.json").read_text())
    assert report["device"] == "cpu" and report["copy_gbps"] > 0
    errors = [row for row in report["results"] if "error" in row]
    assert not errors, errors
    providers = {(row["op"], row["provider"]) for row in report["results"]}
    for expected in [("boundary_map", "fastp2phd"), ("boundary_map", "official 4-pass"),
                     ("instance_mean fwd+bwd", "official loop"), ("instance_norm_act bwd", "eager")]:
        assert expected in providers
    assert "speedup of fastp2phd over:" in result.stdout

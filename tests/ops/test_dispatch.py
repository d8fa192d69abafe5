"""impl selection, the FASTP2PHD_IMPL switch, and the package without its extension."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from support import requires_extension

import fastp2phd.diagnostics
from fastp2phd import ops
from fastp2phd.ops._dispatch import FastPath, select

CPU = torch.device("cpu")
BOUNDARY_PATHS = ops.fast_paths()["boundary_map"]


@requires_extension
def test_auto_picks_the_fast_path_and_env_can_force_reference(monkeypatch):
    paths = BOUNDARY_PATHS
    monkeypatch.delenv(ops.IMPL_ENV, raising=False)
    assert select("boundary_map", "auto", CPU, paths).name == "cpu"
    assert select("boundary_map", "reference", CPU, paths) is None
    monkeypatch.setenv(ops.IMPL_ENV, "reference")
    assert select("boundary_map", "auto", CPU, paths) is None
    assert select("boundary_map", "cpu", CPU, paths).name == "cpu"  # named paths ignore the default
    monkeypatch.setenv(ops.IMPL_ENV, "fastest")
    with pytest.raises(ValueError, match="FASTP2PHD_IMPL='fastest' is not understood"):
        select("boundary_map", "auto", CPU, paths)


def test_auto_falls_back_to_reference_when_no_path_serves_the_device():
    assert select("instance_norm_act", "auto", torch.device("meta"), ops.fast_paths()["instance_norm_act"]) is None
    assert select("boundary_map", "auto", torch.device("meta"), BOUNDARY_PATHS) is None


def test_fast_path_that_cannot_run_raises_instead_of_falling_back():
    cuda = BOUNDARY_PATHS[1]
    assert cuda.name == "cuda"
    if cuda.unavailable is None:
        pytest.skip("the CUDA kernel is available here")
    with pytest.raises(RuntimeError, match="impl='cuda' is not available"):
        select("boundary_map", "cuda", torch.device("cuda"), BOUNDARY_PATHS)


def test_auto_says_once_when_the_devices_fast_path_cannot_run_here(monkeypatch):
    # (A build without the extension, or Triton missing, is otherwise only slower.)
    monkeypatch.delenv(ops.IMPL_ENV, raising=False)
    broken = (FastPath("cpu", "C++", "the C++ extension could not be loaded (no such file)", run=None),)
    on_purpose = (FastPath("cpu", "C++", "the interpreter process runs Triton", run=None, off_on_purpose=True),)
    with pytest.warns(UserWarning, match=r"test_op: the C\+\+ fast path for cpu tensors cannot run here, so "
                      r"impl='auto' runs the slower PyTorch reference: the C\+\+ extension could not be loaded"):
        assert select("test_op", "auto", CPU, broken) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select("test_op", "auto", CPU, broken) is None  # (said once)
        assert select("test_op_2", "auto", CPU, on_purpose) is None
        monkeypatch.setenv(ops.IMPL_ENV, "reference")
        assert select("test_op_3", "auto", CPU, broken) is None  # (the reference asked for)


@pytest.fixture
def deterministic_mode():
    def switch(warn_only=False):
        torch.use_deterministic_algorithms(True, warn_only=warn_only)
    yield switch
    torch.use_deterministic_algorithms(False)


def test_a_path_with_float_atomics_is_never_a_silent_substitute_in_deterministic_mode(deterministic_mode, monkeypatch):
    monkeypatch.delenv(ops.IMPL_ENV, raising=False)
    monkeypatch.setattr("fastp2phd.ops._dispatch._warned", set())
    atomics = FastPath("cpu", "Atomics", None, run=None, deterministic=False)
    assert select("op", "auto", CPU, [atomics]) is atomics  # deterministic mode off: taken silently
    deterministic_mode()
    with pytest.warns(UserWarning, match=r"op: its cpu path \(Atomics\) adds with float atomics.*impl='auto' runs the deterministic reference"):
        assert select("op", "auto", CPU, [atomics]) is None
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert select("op", "auto", CPU, [atomics]) is None
    assert again == []  # once per op and path
    with pytest.raises(RuntimeError, match="impl='cpu' adds with float atomics.* use impl='auto'"):
        select("op", "cpu", CPU, [atomics])
    deterministic_mode(warn_only=True)  # as PyTorch's own ops: run, and say so
    monkeypatch.setattr("fastp2phd.ops._dispatch._warned", set())
    with pytest.warns(UserWarning, match="runs anyway"):
        assert select("op", "cpu", CPU, [atomics]) is atomics
    assert "float atomics" in fastp2phd.diagnostics.format_report(fastp2phd.diagnostics.collect())


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300)


def test_package_works_without_the_extension():
    result = run_python(
        """
        import sys
        sys.modules["fastp2phd._C"] = None  # makes `import fastp2phd._C` fail, as when it is not built
        import torch, fastp2phd
        from fastp2phd import ops
        from fastp2phd.models import Encoder
        inst = torch.tensor([[[[1, 1, 2], [1, 1, 2]]]])
        assert ops.boundary_map(inst).tolist() == [[[[0, 1, 1], [0, 1, 1]]]]
        feat = torch.arange(6.0).view(1, 1, 2, 3)
        assert ops.instance_mean(feat, inst).tolist() == [[[[2.0, 2.0, 3.5], [2.0, 2.0, 3.5]]]]
        out = Encoder(3, 3, ngf=4, n_downsampling=1)(torch.randn(1, 3, 8, 8), torch.zeros(1, 1, 8, 8))
        assert out.shape == (1, 3, 8, 8)
        try:
            ops.boundary_map(inst, impl="cpp")
        except RuntimeError as e:
            print("ERROR:", e)
        fastp2phd.info()
        """
    )
    assert result.returncode == 0, result.stderr
    assert "ERROR: boundary_map: impl='cpp' is not available: the C++ extension fastp2phd._C could not be loaded" in result.stdout
    assert "pip install --no-build-isolation -e ." in result.stdout
    assert "cpu (C++)        unavailable" in result.stdout


def test_info_command_reports_every_op():
    result = subprocess.run([sys.executable, "-m", "fastp2phd", "info"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for op in ("boundary_map", "instance_mean", "instance_norm_act"):
        assert f"  {op}\n    reference        available" in result.stdout
    assert f"torch {torch.__version__}" in result.stdout
    if torch.version.cuda is None:  # this CPU build of torch: the GPU paths are there, but cannot run
        assert "cuda (Triton)    unavailable: installed, but torch is a CPU build" in result.stdout
    elif not torch.cuda.is_available():
        assert "installed, but this machine has no CUDA device" in result.stdout


@pytest.mark.skipif(not Path("/proc/cpuinfo").is_file(), reason="reads the CPU flags Linux reports")
def test_info_says_whether_the_cpu_has_native_bf16():
    flags = set(Path("/proc/cpuinfo").read_text().split())
    native = bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
    report = fastp2phd.diagnostics.format_report(fastp2phd.diagnostics.collect())
    assert ("CPU bfloat16: native (" in report) == native
    assert ("CPU bfloat16: emulated" in report) == (not native)


@pytest.mark.parametrize("op", ["boundary_map", "instance_mean", "instance_norm_act"])
def test_every_op_takes_the_device_names_and_the_earlier_names(op):
    # One impl for a whole network (issue 18): "cpu" and "cuda" name every op's fast kernels.
    paths = ops.fast_paths()[op]
    assert [p.name for p in paths] == ["cpu", "cuda"]
    earlier = {"boundary_map": {"cpp": "cpu"}, "instance_mean": {"cpp": "cpu", "triton": "cuda"},
               "instance_norm_act": {"triton": "cuda"}}[op]
    for old, new in earlier.items():
        assert next(p for p in paths if old in p.aliases).name == new
    if paths[0].unavailable is None:
        assert select(op, "cpu", CPU, paths) is paths[0]
        for old, new in earlier.items():
            if new == "cpu":
                assert select(op, old, CPU, paths) is paths[0]


@requires_extension
def test_one_impl_selects_the_cpu_kernels_of_a_whole_encoder(monkeypatch):
    from fastp2phd.models import Encoder

    chosen = []

    def recording_select(op, impl, device, paths):
        path = select(op, impl, device, paths)
        chosen.append((op, impl, path.name))
        return path

    for module in ("instance_mean", "instance_norm_act"):  # (the package exports the functions under these names)
        monkeypatch.setattr(sys.modules[f"fastp2phd.ops.{module}"], "select", recording_select)
    encoder = Encoder(3, 3, ngf=4, n_downsampling=1, impl="cpu")
    assert encoder(torch.randn(1, 3, 8, 8), torch.zeros(1, 1, 8, 8, dtype=torch.int64)).shape == (1, 3, 8, 8)
    assert {op for op, _, _ in chosen} == {"instance_norm_act", "instance_mean"}
    assert all(impl == "cpu" and name == "cpu" for _, impl, name in chosen)

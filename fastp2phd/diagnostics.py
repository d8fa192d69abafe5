"""What this installation of fastp2phd can do: versions, devices, and which fast paths run.

``fastp2phd info`` (or ``python -m fastp2phd info``) prints the report;
``fastp2phd.info()`` prints it and returns the same facts as a dict.
"""
from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_bf16() -> str | None:
    """The CPU's native bfloat16 instructions (AMX, AVX512-BF16), or None: without them bf16 runs emulated,
    often slower than fp32."""
    import torch

    found = []
    for name, probe in (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported")):
        try:
            if getattr(torch.cpu, probe)():
                found.append(name)
        except (AttributeError, RuntimeError):  # private probes: a torch without them says nothing
            pass
    return ", ".join(found) or None


def collect() -> dict[str, Any]:
    import torch

    from . import _extension
    from ._version import __version__
    from .ops import IMPL_ENV, fast_paths

    devices = [f"cpu ({torch.get_num_threads()} threads)"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i} {torch.cuda.get_device_name(i)}" for i in range(torch.cuda.device_count())]
    if torch.version.cuda is None:
        no_cuda = "torch is a CPU build, so there are no CUDA tensors for it (install a CUDA build of torch)"
    elif not torch.cuda.is_available():
        no_cuda = "this machine has no CUDA device (or the driver is missing), so there are no CUDA tensors for it"
    else:
        no_cuda = None
    ops, atomics = {}, []
    for op, paths in fast_paths().items():
        atomics += [f"{op} {path.name} ({path.kernel})" for path in paths if not path.deterministic]
        ops[op] = {"reference": None}
        for path in paths:
            # Built and importable, but useless without CUDA: say so rather than "available".
            ops[op][f"{path.name} ({path.kernel})"] = path.unavailable or (f"installed, but {no_cuda}" if path.device_type == "cuda"
                                                      and no_cuda else None)
    return {
        "fastp2phd": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "devices": devices,
        "cpu_bf16": cpu_bf16(),
        "extension": "loaded" if _extension.is_loaded() else _extension.load_error,
        "impl_default": os.environ.get(IMPL_ENV, "auto"),
        "deterministic_mode": torch.are_deterministic_algorithms_enabled(),
        "float_atomics": atomics,
        "ops": ops,
    }


def format_report(facts: dict[str, Any]) -> str:
    lines = [
        f"fastp2phd {facts['fastp2phd']}  (python {facts['python']}, {facts['platform']})",
        f"torch {facts['torch']} (CUDA {facts['torch_cuda'] or 'none'}), triton {facts['triton'] or 'not installed'}, "
        f"numpy {facts['numpy']}",
        "devices: " + ", ".join(facts["devices"]),
        "CPU bfloat16: " + (f"native ({facts['cpu_bf16']}): --precision bf16 is fast here" if facts["cpu_bf16"]
                            else "emulated (no AVX512-BF16 or AMX): --precision bf16 saves memory, not time"),
        f"extension fastp2phd._C: {facts['extension']}",
        f"default impl (FASTP2PHD_IMPL): {facts['impl_default']}",
        f"deterministic mode (torch.use_deterministic_algorithms): {'on' if facts['deterministic_mode'] else 'off'}; "
        + (f"in it, auto runs the reference instead of {', '.join(facts['float_atomics'])} (float atomics)"
           if facts["float_atomics"] else "every fast path here is deterministic"),
        "ops (impl: status):",
    ]
    for op, paths in facts["ops"].items():
        lines.append(f"  {op}")
        for name, reason in paths.items():
            lines.append(f"    {name:<16} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def info() -> dict[str, Any]:
    """Print versions, devices and the availability of every fast path; return them as a dict."""
    facts = collect()
    print(format_report(facts))
    return facts

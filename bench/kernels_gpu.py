"""GPU benchmarks of the fast ops next to what users would run otherwise, in one run on one device.

    python bench/kernels_gpu.py --out DIR [--quick] [--no-compile]
    python bench/kernels_gpu.py --out DIR --smoke --device cpu     # tiny shapes: checks the script runs

Writes DIR/kernels_gpu.json (device, versions, commit, every measurement) and prints a
table last. Times are medians of triton.testing.do_bench (CUDA events, L2 flushed
between runs). Bandwidth figures count the bytes each op must move and compare
them with this device's copy bandwidth measured in the same run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

from official import official_edges, official_instance_pool  # noqa: E402
from support import cityscapes_like  # noqa: E402

from fastp2phd import ops  # noqa: E402

NORM_SHAPES = [(1, 64, 1024, 512), (1, 64, 2048, 1024), (4, 256, 256, 128), (8, 1024, 64, 32)]
MAP_SIZE = (1024, 2048)
DEVICE = "cuda"


def bench_ms(fn, reps: int = 50) -> float:
    if DEVICE == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, rep=reps, return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def peak_mb(fn) -> float | None:
    if DEVICE != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def copy_bandwidth() -> float:
    """GB/s of a device-to-device copy of 1 GiB (read + write)."""
    src = torch.empty(2**28 if DEVICE == "cuda" else 2**22, device=DEVICE, dtype=torch.float32)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


class Recorder:
    def __init__(self, copy_gbps: float):
        self.copy_gbps = copy_gbps
        self.rows: list[dict] = []

    def add(self, op, shape, dtype, provider, fn, bytes_moved=None, reps=50, memory=True):
        try:
            ms = bench_ms(fn, reps)
            row = dict(op=op, shape=list(shape), dtype=str(dtype).replace("torch.", ""), provider=provider, ms=ms)
            if bytes_moved:
                row["gbps"] = bytes_moved / ms / 1e6
                row["fraction_of_copy_bw"] = row["gbps"] / self.copy_gbps
            if memory and DEVICE == "cuda":
                row["peak_mb"] = peak_mb(fn)
        except Exception as exc:  # a provider that fails is reported, not fatal
            row = dict(op=op, shape=list(shape), dtype=str(dtype), provider=provider, error=repr(exc)[:300])
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return row


def norm_benchmarks(rec: Recorder, shapes, use_compile: bool):
    dtypes = [torch.float32, torch.bfloat16]
    for shape in shapes:
        for dtype in dtypes:
            x = torch.randn(shape, device=DEVICE, dtype=dtype)
            size = x.numel() * x.element_size()

            def eager(t):
                return F.relu(F.instance_norm(t))

            rec.add("instance_norm_act fwd", shape, dtype, "fastp2phd",
                    lambda: ops.instance_norm_act(x, "relu"), 3 * size)
            rec.add("instance_norm_act fwd", shape, dtype, "eager", lambda: eager(x), 3 * size)
            if use_compile:
                torch._dynamo.reset()
                compiled = torch.compile(eager, dynamic=False)
                compiled(x)
                rec.add("instance_norm_act fwd", shape, dtype, "compile", lambda: compiled(x), 3 * size)
            dy = torch.randn_like(x)
            for provider, forward in (("fastp2phd", lambda t: ops.instance_norm_act(t, "relu")),
                                      ("eager", eager)):
                xr = x.detach().clone().requires_grad_(True)
                y = forward(xr)
                rec.add("instance_norm_act bwd", shape, dtype, provider,
                        lambda: torch.autograd.grad(y, xr, dy, retain_graph=True), 5 * size)
            del x, dy
            if DEVICE == "cuda":
                torch.cuda.empty_cache()


def mean_benchmarks(rec: Recorder):
    inst = cityscapes_like(1, *MAP_SIZE, seed=0).to(DEVICE)
    feat = torch.randn(1, 3, *MAP_SIZE, device=DEVICE)
    shape = tuple(feat.shape)
    floor_bytes = inst.numel() * inst.element_size() + 2 * feat.numel() * 4
    rec.add("instance_mean fwd", shape, torch.float32, "floor: read ids + copy feat",
            lambda: (inst.sum(), feat.clone()), floor_bytes)
    for provider, fn in (("fastp2phd", lambda f: ops.instance_mean(f, inst)),
                         ("reference (unique+scatter_add+gather)", lambda f: ops.instance_mean(f, inst, impl="reference")),
                         ("official loop", lambda f: official_instance_pool(f, inst))):
        reps = 20 if provider == "official loop" else 50
        rec.add("instance_mean fwd", shape, torch.float32, provider, lambda: fn(feat), floor_bytes, reps=reps)
        fr = feat.detach().clone().requires_grad_(True)
        dy = torch.randn_like(feat)

        def fwd_bwd(fn=fn, fr=fr, dy=dy):
            torch.autograd.grad(fn(fr), fr, dy)

        rec.add("instance_mean fwd+bwd", shape, torch.float32, provider, fwd_bwd, 2 * floor_bytes, reps=reps)


def boundary_benchmarks(rec: Recorder, use_compile: bool):
    inst = cityscapes_like(4, *MAP_SIZE, seed=1).to(DEVICE)
    shape = tuple(inst.shape)
    size = inst.numel() * 4
    rec.add("boundary_map", shape, torch.int32, "floor: int32 -> float32 copy", lambda: inst.to(torch.float32), 2 * size)
    rec.add("boundary_map", shape, torch.int32, "fastp2phd", lambda: ops.boundary_map(inst), 2 * size)
    rec.add("boundary_map", shape, torch.int32, "reference", lambda: ops.boundary_map(inst, impl="reference"), 2 * size)
    rec.add("boundary_map", shape, torch.int32, "official 4-pass", lambda: official_edges(inst), 2 * size)
    if use_compile:
        torch._dynamo.reset()
        compiled = torch.compile(lambda t: ops.boundary_map_reference(t), dynamic=False)
        compiled(inst)
        rec.add("boundary_map", shape, torch.int32, "compile", lambda: compiled(inst), 2 * size)


def speedups(rows: list[dict]) -> list[dict]:
    """fastp2phd's speedup over every other provider of the same op, shape and dtype."""
    out = []
    for row in rows:
        if row.get("provider") != "fastp2phd" or "ms" not in row:
            continue
        for other in rows:
            same = all(other.get(k) == row[k] for k in ("op", "shape", "dtype"))
            if same and other is not row and "ms" in other:
                out.append(dict(op=row["op"], shape=row["shape"], dtype=row["dtype"], versus=other["provider"],
                                speedup=other["ms"] / row["ms"]))
    return out


def table(rows: list[dict], ratios: list[dict], copy_gbps: float) -> str:
    lines = [f"copy bandwidth: {copy_gbps:.0f} GB/s",
             f"{'op':<24}{'shape':<22}{'dtype':<9}{'provider':<40}{'ms':>9}{'GB/s':>8}{'bw%':>6}{'MB':>8}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['op']:<24}{str(tuple(r['shape'])):<22}{r['dtype']:<9}{r['provider']:<40} ERROR {r['error'][:60]}")
            continue
        gbps = f"{r['gbps']:.0f}" if "gbps" in r else ""
        frac = f"{100 * r['fraction_of_copy_bw']:.0f}" if "fraction_of_copy_bw" in r else ""
        mb = f"{r['peak_mb']:.0f}" if "peak_mb" in r else ""
        lines.append(f"{r['op']:<24}{str(tuple(r['shape'])):<22}{r['dtype']:<9}{r['provider']:<40}"
                     f"{r['ms']:>9.3f}{gbps:>8}{frac:>6}{mb:>8}")
    lines.append("speedup of fastp2phd over:")
    for s in ratios:
        lines.append(f"  {s['op']:<24}{str(tuple(s['shape'])):<22}{s['dtype']:<9}{s['versus']:<40}{s['speedup']:>7.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for kernels_gpu.json")
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, no compile: only checks the script runs")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu only makes sense with --smoke")
    args = parser.parse_args(argv)
    global DEVICE, MAP_SIZE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("kernels_gpu.py needs a CUDA device (or --smoke --device cpu)", file=sys.stderr)
        return 2
    shapes = NORM_SHAPES[:2] if args.quick else NORM_SHAPES
    use_compile = not args.no_compile
    if args.smoke:
        MAP_SIZE, shapes, use_compile = (32, 64), [(1, 4, 16, 16), (2, 8, 4, 4)], False
    started = time.time()
    copy_gbps = copy_bandwidth()
    rec = Recorder(copy_gbps)
    boundary_benchmarks(rec, use_compile)
    mean_benchmarks(rec)
    norm_benchmarks(rec, shapes, use_compile)
    ratios = speedups(rec.rows)
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = ""
    result = dict(
        device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", date=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        torch=torch.__version__, cuda=torch.version.cuda, triton=triton.__version__, commit=commit,
        copy_gbps=copy_gbps, seconds=time.time() - started, results=rec.rows, speedups=ratios,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels_gpu.json").write_text(json.dumps(result, indent=1))
    print(table(rec.rows, ratios, copy_gbps))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Regenerate bench/REPORT.md and its plots from the result files in bench/results/.

    python bench/report.py [--results bench/results] [--out bench/REPORT.md]

For each device and suite the newest run that measured that suite is used, so every
ratio in the report compares numbers taken in one run on one device.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SUITE_ORDER = ["memory copy", "boundary_map", "instance_mean fwd", "instance_mean fwd+bwd", "instance_norm_act fwd",
               "instance_norm_act bwd", "instance_norm_act fwd+bwd", "host overhead", "generator forward",
               "encoder forward", "training step", "training memory", "checkpointing cost", "features + k-means",
               "inference precision"]
MEMORY_LAYOUTS = ("original", "fastp2phd", "fastp2phd + checkpointing")
GiB = 1024**3


def load_runs(results: Path) -> list[dict]:
    runs = []
    for path in sorted(results.glob("*.json")):
        try:  # one damaged file (a run killed while writing it, before writes were atomic) stopped every report
            run = json.loads(path.read_text())
            if not isinstance(run, dict) or any(k not in run for k in ("date", "device", "device_name", "results")):
                raise ValueError("not a run's date, device and results")
        except ValueError as exc:
            print(f"report: {path} is not a bench results file ({type(exc).__name__}: {str(exc)[:80]}), so the report "
                  "leaves it out; restore it from a copy or remove it", file=sys.stderr)
            continue
        run["file"] = path.name
        runs.append(run)
    return sorted(runs, key=lambda r: r["date"])


def latest_by_suite(runs: list[dict]) -> dict[str, dict[str, tuple[dict, list[dict]]]]:
    """{device: {suite: (run, rows)}} from the newest run of each suite on each device."""
    chosen: dict[str, dict[str, tuple[dict, list[dict]]]] = defaultdict(dict)
    for run in runs:  # oldest first: newer runs overwrite
        key = f"{run['device']}: {run['device_name']}"
        suites = defaultdict(list)
        for row in run["results"]:
            suites[row["suite"]].append(row)
        for suite, rows in suites.items():
            chosen[key][suite] = (run, rows)
    return chosen


FAULTED = "†"
FAULTED_PAGES = 256  # per timed round: 1 MiB of 4 KiB pages (the harness's STEADY_FAULTS)


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _median(row: dict) -> str:
    """The median in ms, marked when the timed rounds page-faulted (off the allocator's steady state)."""
    return _ms(row["median_s"]) + (f" {FAULTED}" if _faulted(row) else "")


def _by_case(rows: list[dict]) -> dict[str, dict[str, dict]]:
    cases: dict[str, dict[str, dict]] = defaultdict(dict)
    for row in rows:
        cases[row["case"]][row["provider"]] = row
    return cases


def copy_gbps(suites: dict, suite: str) -> float | None:
    """The copy bandwidth measured in the same run as ``suite`` (None if that run did not measure it): a
    fraction of a bandwidth from another run compares numbers from two runs."""
    if "memory copy" not in suites or suite not in suites:
        return None
    copy_run, rows = suites["memory copy"]
    if copy_run is not suites[suite][0]:  # (one dict per results file)
        return None
    row = rows[0]
    return row["bytes"] / row["median_s"] / 1e9


def suite_table(rows: list[dict], bandwidth: float | None) -> list[str]:
    lines = ["| case | provider | median ms | IQR ms | images/s | GB/s | × floor | peak MB | fastp2phd speedup |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for case, providers in _by_case(rows).items():
        fast = providers.get("fastp2phd")
        floor = providers.get("floor")
        for provider, row in providers.items():
            images = f"{row['images'] / row['median_s']:.3g}" if row.get("images") else ""
            gbps = ""
            if row.get("bytes"):
                gbps = f"{row['bytes'] / row['median_s'] / 1e9:.3g}"
                if bandwidth:
                    gbps += f" ({100 * row['bytes'] / row['median_s'] / 1e9 / bandwidth:.0f}% of copy)"
            times_floor = f"{row['median_s'] / floor['median_s']:.2f}" if floor and provider != "floor" else ""
            peak = f"{row['peak_mb']:.0f}" if row.get("peak_mb") is not None else ""
            speedup = f"{row['median_s'] / fast['median_s']:.2f}×" if fast and provider not in ("fastp2phd",) else ""
            lines.append(f"| {case} | {provider} | {_median(row)} | {_ms(row['iqr_s'])} | {images} | {gbps} | "
                         f"{times_floor} | {peak} | {speedup} |")
    return lines


def precision_table(rows: list[dict]) -> list[str]:
    """The inference suite: each provider's speed over fp32 eager's and its PSNR against fp32's output."""
    lines = ["| case | provider | median ms | IQR ms | images/s | peak MB | speed vs fp32 | PSNR vs fp32 (dB) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for case, providers in _by_case(rows).items():
        fp32 = providers.get("fp32")
        for provider, row in providers.items():
            speed = f"{fp32['median_s'] / row['median_s']:.2f}×" if fp32 else ""
            psnr = row.get("psnr_db")
            psnr = "" if psnr is None else ("exact" if psnr == float("inf") else f"{psnr:.1f}")
            peak = f"{row['peak_mb']:.0f}" if row.get("peak_mb") is not None else ""
            lines.append(f"| {case} | {provider} | {_median(row)} | {_ms(row['iqr_s'])} | "
                         f"{row['images'] / row['median_s']:.3g} | {peak} | {speed} | {psnr} |")
    return lines


def plot_suite(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = _by_case(rows)
    providers = sorted({r["provider"] for r in rows}, key=lambda p: (p != "fastp2phd", p))
    height = 0.8 / max(1, len(providers))
    fig, ax = plt.subplots(figsize=(9, 0.5 + 0.45 * len(cases) * max(1, len(providers)) ** 0.5 + 0.6))
    for i, provider in enumerate(providers):
        ys = [j + i * height for j in range(len(cases))]
        ms = [cases[c][provider]["median_s"] * 1e3 if provider in cases[c] else 0 for c in cases]
        ax.barh(ys, ms, height=height, label=provider)
    ax.set_yticks([j + 0.4 - height / 2 for j in range(len(cases))])
    ax.set_yticklabels([c if len(c) < 48 else c[:45] + "..." for c in cases], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("median time per call (ms, log scale; shorter is faster)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_scaling(rows: list[dict], title: str, path: Path) -> bool:
    """Time against image size of the 1024p generator, one line per provider (log-log); False without 2 sizes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        match = re.fullmatch(r"1024p generator at (\d+)x(\d+)", row["case"])
        if match:
            pixels = int(match.group(1)) * int(match.group(2)) / 1e6
            lines.setdefault(row["provider"], []).append((pixels, row["median_s"] * 1e3))
    if not any(len(points) > 1 for points in lines.values()):
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for provider, points in sorted(lines.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=provider)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("image size (megapixels: 256x512, 512x1024, 1024x2048)")
    ax.set_ylabel("median time per image (ms)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- targets


def _row(suites, suite, case_pattern, provider):
    if suite not in suites:
        return None
    for row in suites[suite][1]:
        if re.search(case_pattern, row["case"]) and row["provider"] == provider:
            return row
    return None


def memory_table(rows: list[dict]) -> list[str]:
    """Estimated peak (and measured CUDA peak) per configuration and layout, with the smallest GPU that fits."""
    lines = ["| configuration | " + " | ".join(MEMORY_LAYOUTS) + " |", "|---|" + "---:|" * len(MEMORY_LAYOUTS)]
    for case, providers in _by_case(rows).items():
        cells = []
        for layout in MEMORY_LAYOUTS:
            row = providers.get(layout)
            if row is None:
                cells.append("")
                continue
            cell = f"{row['estimated_bytes'] / GiB:.1f} GiB"
            if row.get("fits_gpu_gb"):
                cell += f" ({row['fits_gpu_gb']} GB GPU)"
            if row.get("measured_bytes") is not None:
                cell += f", measured {row['measured_bytes'] / GiB:.1f} GiB"
            cells.append(cell)
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return lines


def _memory(suites, case_pattern, layout):
    row = _row(suites, "training memory", case_pattern, layout)
    return row["estimated_bytes"] / GiB if row else None


def memory_targets(check, suites) -> None:
    """The training-memory targets: estimates (the same on every machine) and the time checkpointing costs."""
    case = r"1024p.*2048x1024"
    check("1024p training step at 2048x1024, bf16 autocast, checkpointing: ≤ 6 GiB (estimated)",
          _memory(suites, case + r", bf16", "fastp2phd + checkpointing"), lambda v: v <= 6, unit=" GiB")
    check("1024p step, fp32, checkpointing: ≤ 8 GiB (estimated)",
          _memory(suites, case + r", fp32", "fastp2phd + checkpointing"), lambda v: v <= 8, unit=" GiB")
    original, ours = _memory(suites, case + r", fp32", "original"), _memory(suites, case + r", fp32", "fastp2phd")
    check("1024p step, fp32, no checkpointing: ≥ 15% below the original layout (saving, estimated)",
          100 * (1 - ours / original) if original and ours else None, lambda v: v >= 15, unit="%")
    check("checkpointing: a training step at most 1.35× the time without it",
          _ratio(suites, "checkpointing cost", ".", "fastp2phd + checkpointing", "fastp2phd"), lambda v: v <= 1.35)


def editor_targets(check, suites) -> None:
    def ms(suite, case):
        row = _row(suites, suite, case, "fastp2phd")
        return row["median_s"] * 1e3 if row else None

    for op in ("paint stroke", "change label"):
        check(f"editor page, {op} on a 256x512 scene with the demo model: median from the edit to the new image "
              "loaded at most 50 ms (half the 99 ms first measured, AVX-512 EPYC)", ms("editor page", rf"^{op}, 256x512"),
              lambda v: v <= 50, unit=" ms")
    check("style previews, 6 styles of a car on a 256x512 scene: under 500 ms",
          ms("style previews", r"256x512"), lambda v: v < 500, unit=" ms")


def precision_targets(check, suites) -> None:
    suite = "inference precision"
    check("bf16 inference, 1024p generator at 512x1024: at least 1.5× fp32 eager (fp32 time / bf16 time)",
          _ratio(suites, suite, r"^1024p generator at 512x1024$", "fp32", "bf16"), lambda v: v >= 1.5)
    demo = _row(suites, suite, r"^demo model", "bf16")
    check("bf16 inference on the trained demo model's held-out scenes: PSNR against fp32 at least 30 dB (lowest "
          "scene)", demo["psnr_db"] if demo else None, lambda v: v >= 30, unit=" dB")
    for case in ("1024p generator at 512x1024", "1024p generator at 1024x2048", "512p generator at 512x1024"):
        check(f"onnxruntime (CPU) vs fp32 eager, {case} (fp32 time / onnxruntime time; no target, where it stands)",
              _ratio(suites, suite, rf"^{case}$", "fp32", "onnxruntime"), lambda v: None)
    for case in ("1024p generator at 512x1024", "1024p generator at 1024x2048"):
        for optimized in ("optimized", "optimized + compile"):
            check(f"{optimized} fp32 vs onnxruntime (CPU), {case}: at least 1.2× (onnxruntime time / its time)",
                  _ratio(suites, suite, rf"^{case}$", "onnxruntime", f"{optimized} fp32"), lambda v: v >= 1.2)
            check(f"{optimized} bf16 vs onnxruntime fp32 (CPU), {case}: at least 2×",
                  _ratio(suites, suite, rf"^{case}$", "onnxruntime", f"{optimized} bf16"), lambda v: v >= 2)


class Ratio(float):
    """A ratio of two medians that knows whether either came from page-faulting rounds (not judged)."""
    faulted = False


def _faulted(row: dict) -> bool:
    return (row.get("page_faults_per_round") or 0) > FAULTED_PAGES


def _ratio(suites, suite, case, slow, fast):
    a, b = _row(suites, suite, case, slow), _row(suites, suite, case, fast)
    if not (a and b):
        return None
    ratio = Ratio(a["median_s"] / b["median_s"])
    ratio.faulted = _faulted(a) or _faulted(b)
    return ratio


def targets(device: str, suites: dict) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for this device's targets; met None when not measured."""
    out = []

    def check(text, value, ok, unit="×"):
        if value is None:
            out.append((text, "not measured", None))
        elif getattr(value, "faulted", False):  # one side page-faulted: shown, not judged
            out.append((text, f"{value:.2f}{unit} {FAULTED}", None))
        else:
            out.append((text, f"{value:.2f}{unit}", ok(value)))

    if "training memory" in suites or "checkpointing cost" in suites:
        memory_targets(check, suites)
    if "editor page" in suites or "style previews" in suites:
        editor_targets(check, suites)
    if "inference precision" in suites:
        precision_targets(check, suites)
    if device.startswith("cpu"):
        case = r"^4x1x1024x2048"
        check("boundary_map 4x1x1024x2048: within 1.25× of its floor (time / floor time)",
              _ratio(suites, "boundary_map", case, "fastp2phd", "floor"), lambda v: v <= 1.25)
        check("boundary_map: ≥ 2× faster than the original 4-pass formulation",
              _ratio(suites, "boundary_map", case, "official", "fastp2phd"), lambda v: v >= 2)
        check("boundary_map: ≥ 20× faster than scikit-image",
              _ratio(suites, "boundary_map", case, "scikit-image", "fastp2phd"), lambda v: v >= 20)
        for suite in ("instance_mean fwd", "instance_mean fwd+bwd"):
            case = r"^1x3x1024x2048"
            check(f"{suite} 1x3x1024x2048: within 2× of its floor",
                  _ratio(suites, suite, case, "fastp2phd", "floor"), lambda v: v <= 2)
            check(f"{suite}: ≥ 10× faster than the original Python-loop pooling",
                  _ratio(suites, suite, case, "official", "fastp2phd"), lambda v: v >= 10)
            check(f"{suite}: ≥ 2× faster than unique + index_add + gather",
                  _ratio(suites, suite, case, "index_add", "fastp2phd"), lambda v: v >= 2)
        check("encoder forward 1x3x512x1024 with pooling: faster than the original formulation",
              _ratio(suites, "encoder forward", r"512x1024", "official", "fastp2phd"), lambda v: v > 1)
        for suite in ("instance_norm_act fwd", "instance_norm_act bwd"):
            for case in sorted({r["case"] for r in suites[suite][1]}) if suite in suites else []:
                if suite.endswith("fwd"):
                    check(f"{suite} {case}: ≥ 1.3× faster than nn.InstanceNorm2d + activation",
                          _ratio(suites, suite, re.escape(case), "official", "fastp2phd"), lambda v: v >= 1.3)
                    row = _row(suites, suite, re.escape(case), "fastp2phd")
                    output_mb = row["bytes"] / 3 / 2**20 if row and row.get("bytes") else None  # (x read twice, y written)
                    check(f"{suite} {case}: peak memory the output alone (peak / output)",
                          row["peak_mb"] / output_mb if output_mb and row.get("peak_mb") is not None else None,
                          lambda v: v <= 1.01)
                check(f"{suite} {case}: not slower than torch.compile",
                      _ratio(suites, suite, re.escape(case), "compile", "fastp2phd"), lambda v: v >= 1)
        for suite in ("generator forward", "training step"):
            if suite in suites:
                for case in sorted({r["case"] for r in suites[suite][1]}):
                    check(f"{suite} ({case}): no slower than the reference path (reference time / fastp2phd time,"
                          " ≥ 0.95 allows 5% noise)", _ratio(suites, suite, re.escape(case), "reference", "fastp2phd"),
                          lambda v: v >= 0.95)
    else:
        for suite, eager_factor in (("instance_norm_act fwd", 1.5), ("instance_norm_act bwd", 1.5),
                                    ("instance_norm_act fwd+bwd", 1.0)):
            if suite not in suites:
                check(f"{suite}", None, None)
                continue
            for case in sorted({r["case"] for r in suites[suite][1]}):
                check(f"{suite} {case}: ≥ {eager_factor}× faster than eager InstanceNorm2d + activation",
                      _ratio(suites, suite, re.escape(case), "official", "fastp2phd"), lambda v: v >= eager_factor)
                if not suite.endswith("bwd") or suite.endswith("fwd+bwd"):
                    check(f"{suite} {case}: not slower than torch.compile",
                          _ratio(suites, suite, re.escape(case), "compile", "fastp2phd"), lambda v: v >= 1)
                if suite.endswith("fwd") and re.search(r"first layer, 2048x1024", case):
                    row, bandwidth = _row(suites, suite, re.escape(case), "fastp2phd"), copy_gbps(suites, suite)
                    fraction = (row["bytes"] / row["median_s"] / 1e9 / bandwidth) if row and bandwidth else None
                    check(f"{suite} {case}: ≥ 80% of the bandwidth bound", None if fraction is None else 100 * fraction,
                          lambda v: v >= 80, unit="%")
        check("instance_mean fwd+bwd 1x3x1024x2048: ≥ 20× faster than the original loop",
              _ratio(suites, "instance_mean fwd+bwd", r"^1x3x1024x2048", "official", "fastp2phd"), lambda v: v >= 20)
        check("instance_mean fwd+bwd 1x3x1024x2048: ≥ 3× faster than unique + index_add + gather",
              _ratio(suites, "instance_mean fwd+bwd", r"^1x3x1024x2048", "index_add", "fastp2phd"), lambda v: v >= 3)
        for case, label in ((r"512p.*at 512x1024$", "512p at 512x1024"), (r"512p.*at 512x1024 \+ E$", "512p + E")):
            for provider in ("fastp2phd", "compile"):
                check(f"training step, {label}: {provider} ≥ 1.5× faster than the original formulation",
                      _ratio(suites, "training step", case, "official", provider), lambda v: v >= 1.5)
        case_1024 = r"label2city_1024p.*bf16 at 1024x2048$"
        check("training step, label2city_1024p bf16 at 2048x1024: compile ≥ 2× faster than the original in bf16",
              _ratio(suites, "training step", case_1024, "official", "compile"), lambda v: v >= 2)
        row = _row(suites, "training step", case_1024, "compile")
        check("training step, label2city_1024p bf16 at 2048x1024: under 100 ms with --compile",
              row["median_s"] * 1e3 if row else None, lambda v: v < 100, unit=" ms")
        check("generator forward, 1024p at 1024x2048: ≥ 2.5× faster than the original formulation",
              _ratio(suites, "generator forward", r"1024p", "official", "fastp2phd"), lambda v: v >= 2.5)
        fast, ref = (_row(suites, "training step", r"512x1024$", p) for p in ("fastp2phd", "reference"))
        check("training step, 512x1024: peak memory ≤ the reference path's (fastp2phd / reference)",
              fast["peak_mb"] / ref["peak_mb"] if fast and ref else None, lambda v: v <= 1.0)
    return out


def write_report(results: Path = BENCH / "results", out: Path = BENCH / "REPORT.md") -> Path:
    runs = load_runs(results)
    chosen = latest_by_suite(runs)
    lines = [
        "# fastp2phd benchmarks",
        "",
        "Generated by `bench/report.py` from `bench/results/*.json` (`make bench` runs the CPU suites and",
        "regenerates this page; `python -m pytest bench --bench-device cuda` the GPU ones). For every device",
        "and suite the newest run is shown, so each ratio compares numbers from one run on one device.",
        "Times are medians over the rounds (IQR beside them); GB/s counts the bytes an op must move;",
        "`× floor` is the time over a plain copy of the same data measured in the same run; the speedup",
        "column is the provider's time over fastp2phd's. Providers: `fastp2phd` (the fast path `impl=\"auto\"`",
        "picks), `reference` (fastp2phd's pure-PyTorch path), `official` (the original pix2pixHD formulation:",
        "Python-loop pooling, 4-pass edges, unfused modules), `index_add` (unique + index_add + gather),",
        "`compile` (torch.compile of the reference), `scikit-image`, `floor`.",
        "",
        "On the CPU the bench keeps freed memory for reuse, as the `fastp2phd` commands do, and warms each",
        "row up until its calls stop page-faulting (the steady state of a loop: a new 32 MiB output takes 10 ms",
        "on fresh pages and 2 ms on reused ones). Runs since 2026-12-06 record the page faults of the timed",
        f"rounds; a median marked {FAULTED} comes from rounds that still page-faulted (over 1 MiB a round), so",
        "compare it only with rows marked the same, and a target measured with it is shown but not judged.",
        "Older CPU runs warmed up twice, and their rows could be in either state.",
        "",
    ]
    plots = out.parent / "results" / "plots"
    for device, suites in chosen.items():
        lines += [f"## {device}", ""]
        if device.startswith("cpu:") and not device.endswith(")"):  # (device_name names the ISA since 2026-12-06)
            lines += ["Runs from before the bench named the CPU's vector instruction set (the same model name is lent "
                      "with AVX2 and with AVX-512); where a section of the same CPU names it, that section holds the "
                      "newer runs.", ""]
        run_files = sorted({run["file"] for run, _ in suites.values()})
        for name in run_files:
            run = next(r for r in runs if r["file"] == name)
            lines.append(f"- run `{name}`: {run['date']}, torch {run['torch']}, triton {run['triton']}, "
                         f"{run['cpu_threads']} CPU threads, commit {run['commit'] or '?'}"
                         + ("; cut short: the rows it measured before it stopped" if run.get("complete") is False
                            else ""))
        lines += ["", "### Targets", "", "| target | measured | met |", "|---|---:|:---:|"]
        for text, measured, met in targets(device, suites):
            lines.append(f"| {text} | {measured} | {'—' if met is None else ('yes' if met else '**no**')} |")
        lines.append("")
        for suite in sorted(suites, key=lambda s: SUITE_ORDER.index(s) if s in SUITE_ORDER else 99):
            run, rows = suites[suite]
            if suite == "training memory":
                lines += [f"### {suite}", "", "Estimated peak of live tensors in one training step (`fastp2phd memory`:"
                          " fake tensors, modelling a CUDA run), the smallest common GPU it fits with the CUDA context"
                          " and allocator slack, and on a GPU the measured `torch.cuda.max_memory_allocated`.", ""]
                lines += memory_table(rows) + [""]
                continue
            slug = re.sub(r"[^a-z0-9]+", "-", f"{device} {suite}".lower()).strip("-")
            plot_suite(rows, f"{suite} — {run['device_name']}", plots / f"{slug}.png")
            lines += [f"### {suite}", "", f"![{suite}](results/plots/{slug}.png)", ""]
            if suite == "inference precision" and plot_scaling(rows, f"1024p generator by image size — "
                                                                     f"{run['device_name']}", plots / f"{slug}-scaling.png"):
                lines += [f"![time by image size](results/plots/{slug}-scaling.png)", ""]
            lines += (precision_table(rows) if suite == "inference precision"
                      else suite_table(rows, copy_gbps(suites, suite) if run["device"] == "cuda" else None))
            lines.append("")
    from fastp2phd.files import write_text

    write_text(out, "\n".join(lines) + "\n")  # (a kill midway leaves the last report, not half of one)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(BENCH / "results"))
    parser.add_argument("--out", default=str(BENCH / "REPORT.md"))
    args = parser.parse_args()
    print(write_report(Path(args.results), Path(args.out)))

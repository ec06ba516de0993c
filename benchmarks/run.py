#!/usr/bin/env python
"""Benchmark regoptim's optimizer steps against torch.optim's, and write a markdown table.

For each family (SGD with momentum and weight decay; AdamW) x size x dtype, every implementation
(torch for-loop / foreach / fused; regoptim default with L1, default with regularizers off,
fused=True) steps on the same parameters, interleaved round by round (see
``benchmarks/_common.py``), and the table gives the median ms per step, the ratio to torch's fused
step measured in the same run, and the effective bandwidth (bytes an ideal one-pass step moves /
time; the model is in ``benchmarks/_common.py``).

    python benchmarks/run.py                          # CPU: 16M float32 params in 4, 64, 1024 tensors
    python benchmarks/run.py --device cuda            # 1M..1B params in 100 and 500 tensors, % of HBM peak
    python benchmarks/run.py --sizes 1M --tensors 8 --repeat 5 --out -   # quick look, writes nothing
    python benchmarks/run.py --smoke --out /tmp/r.md  # CI smoke: tiny sizes, one round

The table replaces this device's section of ``--out`` (default ``benchmarks/RESULTS.md``; other
devices' sections are kept). Runs from any working directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run as a script from anywhere: make `benchmarks` importable
    sys.path.append(str(HERE.parent))  # appended: a regoptim on PYTHONPATH still wins

import torch  # noqa: E402

from benchmarks._common import (  # noqa: E402
    BASELINE,
    FAMILIES,
    FAMILY_TITLES,
    IMPL_KEYS,
    Result,
    bytes_per_step,
    copy_bandwidth,
    default_hbm_peak,
    do_bench_available,
    dtype_name,
    format_count,
    machine_info,
    parse_count,
    parse_dtype,
    parse_list,
    run_case,
)

DEFAULT_OUT = HERE / "RESULTS.md"
DEFAULTS = {
    "cpu": {"sizes": "16M", "tensors": "4,64,1024", "repeat": 15},
    "cuda": {"sizes": "1M,10M,100M,1B", "tensors": "100,500", "repeat": 30},
}
SMOKE = {"sizes": "16K", "tensors": "1,4", "repeat": 1, "warmup": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", help="total parameter counts, e.g. 16M,1B (default by device)")
    ap.add_argument("--tensors", help="tensor counts each size is split into (default by device)")
    ap.add_argument("--dtype", default="float32", help="float32,bfloat16,float16")
    ap.add_argument("--families", default=",".join(FAMILIES), help="sgd,adamw")
    ap.add_argument("--impls", default=",".join(IMPL_KEYS), help=", ".join(IMPL_KEYS))
    ap.add_argument("--repeat", type=int, help="timed steps per implementation (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1: state)")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: all cores)")
    ap.add_argument(
        "--timer",
        default="auto",
        choices=["auto", "perf", "cpu", "events", "do_bench"],
        help="auto: perf (wall clock) on CPU, events (CUDA events, interleaved) on CUDA; "
        "cpu: process CPU time, for a busy machine (with --threads 1); "
        "do_bench: triton.testing.do_bench per implementation (CUDA)",
    )
    ap.add_argument("--hbm-peak-gbs", type=float, help="GPU memory peak for the %% column")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one round (CI)")
    ap.add_argument(
        "--out", help=f"markdown file to update ('-': none; default {DEFAULT_OUT}, not in --smoke)"
    )
    args = ap.parse_args(argv)
    defaults = DEFAULTS[args.device]
    if args.smoke:
        for name, value in SMOKE.items():
            if getattr(args, name) is None or name == "warmup":
                setattr(args, name, value)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = "-" if args.smoke else str(DEFAULT_OUT)
    return args


def render(
    results: list[Result],
    info: dict[str, str],
    *,
    device: torch.device,
    peak_gbs: float | None,
    peak_label: str,
    command: str,
) -> str:
    lines = [f"### {device.type.upper()}", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    families = sorted({r.family for r in results})
    lines.append("- families: " + "; ".join(f"{f} = {FAMILY_TITLES[f]}" for f in families))
    if peak_gbs:
        lines.append(f"- {peak_label}: {peak_gbs:.0f} GB/s")
    lines += [f"- command: `{command}`", ""]
    pct = "% of peak" if peak_gbs else None
    header = ["family", "impl", "dtype", "params", "tensors", "ms/step (median)", "IQR ms"]
    header += ["x torch fused", "GB/s"] + ([pct] if pct else []) + ["note"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    base = {
        (r.family, r.numel, r.tensors, r.dtype): r.median
        for r in results
        if r.impl == BASELINE and r.median
    }
    for r in results:
        med = r.median
        q = r.quartiles()
        ref = base.get((r.family, r.numel, r.tensors, r.dtype))
        gbs = bytes_per_step(r.family, r.numel, r.dtype) / med / 1e9 if med else None
        row = [
            r.family,
            r.impl,
            dtype_name(r.dtype),
            format_count(r.numel),
            str(r.tensors),
            f"{med * 1e3:.2f}" if med else "-",
            f"{q[0] * 1e3:.2f}-{q[1] * 1e3:.2f}" if q else "-",
            f"{med / ref:.2f}" if med and ref else "-",
            f"{gbs:.1f}" if gbs else "-",
        ]
        if pct:
            row.append(f"{100 * gbs / peak_gbs:.0f}%" if gbs else "-")
        row.append(r.note)
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return "\n".join(lines)


def update_results_file(path: Path, device_type: str, section: str) -> None:
    """Replace this device's section of ``path`` (between markers), keeping everything else."""
    start = f"<!-- benchmarks/run.py {device_type} start -->"
    end = f"<!-- benchmarks/run.py {device_type} end -->"
    block = f"{start}\n{section}\n{end}"
    if path.exists():
        text = path.read_text()
        i, j = text.find(start), text.find(end)
        if i >= 0 and j > i:
            text = text[:i] + block + text[j + len(end) :]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = (
            "# Benchmark results\n\n"
            "Written by `benchmarks/run.py` (one section per device; see `benchmarks/_common.py`"
            " for the bytes-moved model behind GB/s).\n\n" + block + "\n"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = parse_list(args.sizes, parse_count)
    tensor_counts = parse_list(args.tensors, int)
    dtypes = parse_list(args.dtype, parse_dtype)
    families = parse_list(args.families)
    impls = parse_list(args.impls)
    for f in families:
        if f not in FAMILIES:
            raise SystemExit(f"unknown family {f!r} (choose from {', '.join(FAMILIES)})")
    for k in impls:
        if k not in IMPL_KEYS:
            raise SystemExit(f"unknown impl {k!r} (choose from {', '.join(IMPL_KEYS)})")
    timer = args.timer
    if timer == "auto":
        timer = "events" if device.type == "cuda" else "perf"
    if timer == "do_bench" and (device.type != "cuda" or not do_bench_available()):
        raise SystemExit("--timer do_bench needs --device cuda and triton")
    if timer in ("perf", "cpu") and device.type == "cuda":
        raise SystemExit(f"--timer {timer} is for --device cpu (use events or do_bench)")
    if timer == "events" and device.type != "cuda":
        raise SystemExit("--timer events needs --device cuda")

    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget = int(free * 0.8)
        peak = args.hbm_peak_gbs or default_hbm_peak(device)
        peak_label = "HBM peak" + (
            " (--hbm-peak-gbs)" if args.hbm_peak_gbs else " (by device name)"
        )
    else:
        budget = None
        peak = args.hbm_peak_gbs
        peak_label = "memory peak (--hbm-peak-gbs)"
        if peak is None and not args.smoke:
            peak = copy_bandwidth(device)
            peak_label = "copy bandwidth measured at start (64M float32 copy_, read+write)"
    info = machine_info(device)
    info["timer"] = {
        "perf": "time.perf_counter around step(), gradients regenerated untimed before each step",
        "cpu": "process CPU time (time.process_time) of step(), gradients regenerated untimed",
        "events": "CUDA events around step() after a synchronize, gradients regenerated untimed",
        "do_bench": "triton.testing.do_bench median (gradients fixed, L2 flushed between calls)",
    }[timer]
    info["rounds"] = (
        f"{args.warmup} warmup + {args.repeat} timed steps per implementation, "
        "interleaved round-robin (order rotated each round)"
    )

    results: list[Result] = []
    for dtype in dtypes:
        for family in families:
            for numel in sizes:
                for tensors in tensor_counts:
                    if tensors > numel:
                        continue
                    tag = f"{family} {format_count(numel)} x{tensors} {dtype_name(dtype)}"
                    print(f"[{tag}]", file=sys.stderr, flush=True)
                    case = run_case(
                        family,
                        impls,
                        numel,
                        tensors,
                        dtype,
                        device,
                        repeat=args.repeat,
                        warmup=args.warmup,
                        timer=timer,
                        memory_budget=budget,
                    )
                    for r in case:
                        med = f"{r.median * 1e3:9.2f} ms" if r.median else "        -   "
                        print(f"  {r.impl:24s} {med} {r.note}", file=sys.stderr, flush=True)
                    results += case

    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    section = render(
        results,
        info,
        device=device,
        peak_gbs=peak,
        peak_label=peak_label,
        command=command.strip(),
    )
    print(section)
    if args.out != "-":
        out = Path(args.out)
        update_results_file(out, device.type, section)
        print(f"wrote {out.resolve()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")  # benchmark real kernels, never the interpreter
    sys.exit(main())

#!/usr/bin/env python
"""Benchmark regoptim's optimizer steps against torch.optim's, and write a markdown table.

For each family (SGD with momentum and weight decay; AdamW) x case (total params / tensors) x
dtype, these implementations step on the same parameters, interleaved round by round (see
``benchmarks/_runner.py``):

* ``torch-fused``: torch's ``fused=True`` step, same momentum and weight decay, no L1: the baseline;
* ``regoptim-default``: regoptim's default path (no ``fused`` argument), L1 and weight decay on;
* ``regoptim-default-noreg``: the same with ``l1=0`` (weight decay as torch);
* ``regoptim-fused``: regoptim ``fused=True``, L1 and weight decay on;
* torch's own default: the for-loop (``torch-loop``) on CPU, ``torch-foreach`` on CUDA.

The table gives the median us per step, the ratio of that time to ``torch-fused``'s measured in
the same run, and the effective bandwidth (bytes an ideal one-pass step moves / time; the model
is in ``benchmarks/_common.py``) with its percentage of a ceiling: on CPU a STREAM-like triad
measured at start (``benchmarks/_machine.py``), on CUDA the HBM peak by device name. Small cases
(which stay in cache) time k steps per sample; the ``k`` column says how many.

The full CPU table (run it on a quiet machine; the first writes the section ``cpu-AVX512`` on an
AVX-512 machine, the second the ``cpu-AVX2`` section beside it):

    python benchmarks/run.py
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/run.py

Other runs:

    python benchmarks/run.py --preset cpu-small       # only the small models (4x5000, 100x100, 400x1000)
    python benchmarks/run.py --device cuda            # 1M..1B params in 100 and 500 tensors
    python benchmarks/run.py --cases 1M/8 --repeat 5 --out -   # quick look, writes nothing
    python benchmarks/run.py --threads 1 --timer cpu  # busy machine: process CPU time, less noise
    python benchmarks/run.py --smoke --out /tmp/r.md  # CI smoke: tiny sizes, one round

The table replaces its section of ``--out`` (default ``benchmarks/RESULTS.md``): one section per
device and, on CPU, per torch CPU capability; other sections are kept. Runs from any directory.
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
    DEFAULT_IMPLS,
    FAMILIES,
    FAMILY_TITLES,
    IMPL_KEYS,
    PRESETS,
    bytes_per_step,
    dtype_name,
    format_count,
    parse_case,
    parse_count,
    parse_dtype,
    parse_list,
)
from benchmarks._machine import (  # noqa: E402
    TRIAD_NUMEL,
    TRIAD_REPEAT,
    default_hbm_peak,
    machine_info,
    section_key,
    triad_bandwidth,
)
from benchmarks._runner import Result, do_bench_available, run_case  # noqa: E402

DEFAULT_OUT = HERE / "RESULTS.md"
DEFAULTS = {
    "cpu": {"preset": "cpu", "repeat": 15, "min_sample_ms": 2.0},
    "cuda": {"preset": "cuda", "repeat": 30, "min_sample_ms": 0.0},
}
SMOKE = {"preset": "smoke", "repeat": 1, "warmup": 1, "min_sample_ms": 1.0, "triad_numel": "1M"}
# A case whose step moves less than this is assumed to stay in cache: no "% of peak" for it.
CACHE_RESIDENT_BYTES = 128 * 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--preset", choices=sorted(PRESETS), help="cases (default: the device's)")
    ap.add_argument("--cases", help="TOTAL/TENSORS list, e.g. 16M/64,20000/4 (replaces --preset)")
    ap.add_argument("--sizes", help="total parameter counts, e.g. 16M,1B (with --tensors: cases)")
    ap.add_argument("--tensors", help="tensor counts each size is split into, e.g. 4,64")
    ap.add_argument("--dtype", default="float32", help="float32,bfloat16,float16")
    ap.add_argument("--families", default=",".join(FAMILIES), help="sgd,adamw")
    ap.add_argument("--impls", help=f"default: the device's rows; any of {', '.join(IMPL_KEYS)}")
    ap.add_argument("--repeat", type=int, help="samples per implementation (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (>= 1: state)")
    ap.add_argument(
        "--min-sample-ms",
        type=float,
        help="time k steps per sample so that a sample lasts this long (small cases; "
        "default 2 on CPU, 0 = one step per sample on CUDA)",
    )
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: all cores)")
    ap.add_argument(
        "--timer",
        default="auto",
        choices=["auto", "perf", "cpu", "events", "do_bench"],
        help="auto: perf (wall clock) on CPU, events (CUDA events, interleaved) on CUDA; "
        "cpu: process CPU time, for a busy machine (with --threads 1); "
        "do_bench: triton.testing.do_bench per implementation (CUDA)",
    )
    ap.add_argument("--triad-numel", help=f"elements per triad buffer (default {TRIAD_NUMEL})")
    ap.add_argument(
        "--peak-gbs",
        "--hbm-peak-gbs",
        type=float,
        help="ceiling of the %% column, GB/s (default: CPU the triad, CUDA the HBM peak by name)",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, one round (CI)")
    ap.add_argument(
        "--out", help=f"markdown file to update ('-': none; default {DEFAULT_OUT}, not in --smoke)"
    )
    args = ap.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            if getattr(args, name) is None or name == "warmup":
                setattr(args, name, value)
    for name, value in DEFAULTS[args.device].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.out is None:
        args.out = "-" if args.smoke else str(DEFAULT_OUT)
    return args


def cases_of(args: argparse.Namespace) -> list[tuple[int, int]]:
    if args.cases:
        return parse_list(args.cases, parse_case)
    if args.sizes or args.tensors:
        sizes = parse_list(args.sizes or "16M", parse_count)
        tensor_counts = parse_list(args.tensors or "4,64,1024", int)
        return [(n, t) for n in sizes for t in tensor_counts if t <= n]
    return parse_list(PRESETS[args.preset], parse_case)


def _us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.0f}" if us >= 1000 else f"{us:.1f}" if us >= 10 else f"{us:.2f}"


def render(
    results: list[Result],
    info: dict[str, str],
    *,
    title: str,
    peak_gbs: float | None,
    peak_line: str,
    command: str,
) -> str:
    lines = [f"### {title}", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    families = sorted({r.family for r in results})
    lines.append("- families: " + "; ".join(f"{f} = {FAMILY_TITLES[f]}" for f in families))
    for family in families:
        labels = dict.fromkeys(f"{r.impl} = {r.label}" for r in results if r.family == family)
        lines.append(f"- rows ({family}): " + "; ".join(labels))
    lines.append(
        "- x torch-fused: median time per step / torch-fused's in the same run (< 1: faster); "
        "k: steps timed together per sample (same gradients), time per step = sample / k"
    )
    if peak_gbs:
        lines.append(f"- {peak_line}")
        lines.append(
            f"- % of peak: GB/s / {peak_gbs:.1f}; blank where a step moves under "
            f"{CACHE_RESIDENT_BYTES // 2**20} MiB (the case stays in cache)"
        )
    lines += [f"- command: `{command}`", ""]
    header = ["family", "impl", "dtype", "params", "tensors", "us/step (median)", "IQR us", "k"]
    header += ["x torch-fused", "GB/s"] + (["% of peak"] if peak_gbs else []) + ["note"]
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
        nbytes = bytes_per_step(r.family, r.numel, r.dtype)
        gbs = nbytes / med / 1e9 if med else None
        row = [
            r.family,
            r.impl,
            dtype_name(r.dtype),
            format_count(r.numel),
            str(r.tensors),
            _us(med) if med else "-",
            f"{_us(q[0])}-{_us(q[1])}" if q else "-",
            str(r.steps_per_sample) if med else "-",
            f"{med / ref:.2f}" if med and ref else "-",
            f"{gbs:.1f}" if gbs else "-",
        ]
        if peak_gbs:
            in_memory = gbs and nbytes >= CACHE_RESIDENT_BYTES
            row.append(f"{100 * gbs / peak_gbs:.0f}%" if in_memory else "")
        row.append(r.note)
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    return "\n".join(lines)


def update_results_file(path: Path, key: str, section: str) -> None:
    """Replace the section ``key`` of ``path`` (between markers), keeping everything else. A CPU
    section from before sections were keyed by capability (key ``cpu``) is replaced by the first
    ``cpu-*`` section written, in place."""
    start, end = (f"<!-- benchmarks/run.py {key} {edge} -->" for edge in ("start", "end"))
    block = f"{start}\n{section}\n{end}"
    if path.exists():
        text = path.read_text()
        if key.startswith("cpu-"):
            old_start, old_end = (f"<!-- benchmarks/run.py cpu {e} -->" for e in ("start", "end"))
            i, j = text.find(old_start), text.find(old_end)
            if i >= 0 and j > i:
                stub = "" if start in text else f"{start}\n{end}"
                text = text[:i] + stub + text[j + len(old_end) :]
        i, j = text.find(start), text.find(end)
        if i >= 0 and j > i:
            text = text[:i] + block + text[j + len(end) :]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
    else:
        text = (
            "# Benchmark results\n\n"
            "Written by `benchmarks/run.py` (one section per device and CPU capability; see"
            " `benchmarks/_common.py` for the bytes-moved model behind GB/s and"
            " `benchmarks/_machine.py` for the triad ceiling).\n\n" + block + "\n"
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
    cases = cases_of(args)
    dtypes = parse_list(args.dtype, parse_dtype)
    families = parse_list(args.families)
    impls = parse_list(args.impls) if args.impls else list(DEFAULT_IMPLS[device.type])
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

    info = machine_info(device)
    triad_numel = parse_count(args.triad_numel) if args.triad_numel else TRIAD_NUMEL
    print(f"[triad, 3 x {format_count(triad_numel)} float32]", file=sys.stderr, flush=True)
    triad = triad_bandwidth(device, triad_numel, inplace=True)
    info["STREAM triad a = b + s*c (informational: pays write-allocate, not counted)"] = (
        f"{triad_bandwidth(device, triad_numel):.1f} GB/s"
    )
    triad_line = (
        f"in-place triad bandwidth measured at start: {triad:.1f} GB/s (b += s*c, 2 x "
        f"{format_count(triad_numel)} float32, best of {TRIAD_REPEAT}, {torch.get_num_threads()} "
        "threads; 2 reads + 1 write counted: an in-place streaming update, as an optimizer step)"
    )
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        budget: int | None = int(free * 0.8)
        peak = args.peak_gbs or default_hbm_peak(device)
        src = "--peak-gbs" if args.peak_gbs else "by device name"
        peak_line = (
            f"HBM peak ({src}): {peak:.0f} GB/s, the ceiling of % of peak; {triad_line}"
            if peak
            else triad_line
        )
    else:
        budget = None
        peak = args.peak_gbs or triad
        peak_line = triad_line + (
            f"; ceiling of % of peak: {peak:.1f} GB/s (--peak-gbs)"
            if args.peak_gbs
            else "; the ceiling of % of peak"
        )
    info["timer"] = {
        "perf": "time.perf_counter around k steps, gradients regenerated untimed before each sample",
        "cpu": "process CPU time (time.process_time) of k steps, gradients regenerated untimed",
        "events": "CUDA events around k steps after a synchronize, gradients regenerated untimed",
        "do_bench": "triton.testing.do_bench median (gradients fixed, L2 flushed between calls)",
    }[timer]
    info["rounds"] = (
        f"{args.warmup} warmup step(s) + {args.repeat} timed samples per implementation, "
        "interleaved round-robin (order rotated each round); k calibrated per case so that a "
        f"sample lasts >= {args.min_sample_ms:g} ms"
    )

    results: list[Result] = []
    for dtype in dtypes:
        for family in families:
            for numel, tensors in cases:
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
                    min_sample_seconds=args.min_sample_ms / 1e3,
                    memory_budget=budget,
                )
                for r in case:
                    med = f"{_us(r.median):>9s} us (k={r.steps_per_sample})" if r.median else "-"
                    print(f"  {r.impl:24s} {med} {r.note}", file=sys.stderr, flush=True)
                results += case

    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if os.environ.get("ATEN_CPU_CAPABILITY"):
        command = f"ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']} {command}"
    key = section_key(device)
    title = f"CPU ({key.removeprefix('cpu-')})" if device.type == "cpu" else device.type.upper()
    section = render(
        results,
        info,
        title=title,
        peak_gbs=peak,
        peak_line=peak_line,
        command=command.strip(),
    )
    print(section)
    if args.out != "-":
        out = Path(args.out)
        update_results_file(out, key, section)
        print(f"wrote {out.resolve()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")  # benchmark real kernels, never the interpreter
    sys.exit(main())

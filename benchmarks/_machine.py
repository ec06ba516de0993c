"""What the benchmarks run on: the machine description and the memory-bandwidth ceiling.

Bandwidth ceiling (CPU): a STREAM-like triad
--------------------------------------------
``triad_bandwidth`` times ``a = b + s * c`` (``torch.add(b, c, alpha=s, out=a)``, which runs on
torch's intra-op threads) over three float32 buffers of ``numel`` elements each (default 64M
elements: 768 MiB in all, far larger than any last-level cache), and returns the best of
``repeat`` runs in GB/s. Bytes are counted as STREAM counts them: 3 streams, 2 reads (``b``,
``c``) + 1 write (``a``) = 12 bytes per element. The write-allocate traffic is **not** counted:
with ordinary stores (ATen's vectorized loops use no non-temporal stores) each line of ``a`` is
read from memory before it is written, so the memory actually moves up to 4/3 of the counted
bytes. An optimizer step updates ``p``, ``b``, ``m``, ``v`` in place, so the lines it writes were
just read and it pays no write-allocate; its effective bandwidth (the bytes-moved model in
``benchmarks/_common.py``) can therefore exceed the triad figure by up to a third.
``triad_bandwidth(..., inplace=True)`` times ``b += s * c`` instead: the same 2 reads + 1 write,
in place, no write-allocate, like the optimizers. ``run.py`` takes that in-place figure as the
CPU ceiling of its "% of peak" column (a step at 100% moves memory as fast as a plain in-place
streaming kernel on that machine) and reports the classic triad beside it.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

import regoptim

REPO_ROOT = Path(__file__).resolve().parent.parent

TRIAD_NUMEL = 64 * 2**20  # elements per buffer: 3 x 256 MiB
TRIAD_REPEAT = 10


def triad_bandwidth(
    device: torch.device,
    numel: int = TRIAD_NUMEL,
    repeat: int = TRIAD_REPEAT,
    *,
    inplace: bool = False,
) -> float:
    """GB/s of the triad ``a = b + s * c`` on float32 buffers, best of ``repeat`` (see the module
    docstring: 12 bytes per element, write-allocate not counted). With ``inplace``, the variant
    ``b += s * c`` (``b.add_(c, alpha=s)``): the same 12 bytes counted, and no write-allocate,
    like an optimizer's in-place update; an informational second figure."""
    b = torch.rand(numel, device=device)
    c = torch.rand(numel, device=device)
    a = torch.empty_like(b)
    s = 3.0 if not inplace else 1e-30  # in place: b stays finite over the repeats

    def triad() -> None:
        if inplace:
            b.add_(c, alpha=s)
        else:
            torch.add(b, c, alpha=s, out=a)

    triad()  # first touch of a: page faults stay out of the timing
    best = float("inf")
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            triad()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            triad()
            seconds = time.perf_counter() - t0
        best = min(best, seconds)
    return 3 * numel * a.element_size() / best / 1e9


HBM_PEAK_GBS = (  # (substring of torch.cuda.get_device_name(), GB/s); the first match wins
    ("H200", 4800.0),
    ("H100 PCIe", 2000.0),
    ("H100 NVL", 3900.0),
    ("H100", 3350.0),  # SXM (HBM3)
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),
)


def default_hbm_peak(device: torch.device) -> float | None:
    """The GPU memory's specified peak, by device name (None if unknown or not CUDA)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for needle, peak in HBM_PEAK_GBS:
        if needle in name:
            return peak
    return None


def cpu_model() -> str:
    """``model name`` of /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_capability() -> str:
    """The vector ISA torch's CPU kernels dispatch to (``AVX512``, ``AVX2``, ``DEFAULT``, ...);
    ``ATEN_CPU_CAPABILITY=avx2`` lowers it, and regoptim's C++ kernel follows it."""
    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except Exception:  # very old torch
        return "unknown"


def section_key(device: torch.device) -> str:
    """Key of this run's section of RESULTS.md: ``cpu-AVX512``, ``cpu-AVX2``, ..., or ``cuda``; a
    run under ``ATEN_CPU_CAPABILITY=avx2`` writes its own section beside the AVX-512 one."""
    return f"cpu-{cpu_capability()}" if device.type == "cpu" else device.type


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info(device: torch.device) -> dict[str, str]:
    info = {
        "date (UTC)": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "CPU": f"{cpu_model()}, {os.cpu_count()} logical cores",
        "torch CPU capability": cpu_capability()
        + (
            f" (ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']})"
            if os.environ.get("ATEN_CPU_CAPABILITY")
            else ""
        ),
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "regoptim": f"{regoptim.__version__} (git {git_commit()})",
        "python": platform.python_version(),
    }
    if hasattr(os, "getloadavg"):
        info["load average at start (1/5/15 min)"] = "/".join(f"{x:.2f}" for x in os.getloadavg())
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        info["TRITON_INTERPRET"] = "1 (fused=True on CPU runs the Triton interpreter!)"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["GPU"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
        info["CUDA (torch build)"] = str(torch.version.cuda)
    return info

#!/usr/bin/env python
"""Benchmark the group-lasso step on CPU against torch's fused step without regularizers.

Each case is ``TOTAL`` float32 parameters in rows of ``R`` elements: one weight ``(TOTAL/R, R)``
and its bias ``(TOTAL/R,)``, one group per row (the row and its bias entry, ``group_axes`` 0).
For each family these step on the same parameters and gradients, interleaved round by round
(the order rotated each round, gradients regenerated untimed before each sample):

* ``torch-fused``: ``torch.optim.SGD(momentum=0.9, fused=True)`` / ``torch.optim.Adam(fused=True)``,
  no regularizer: the baseline;
* ``regoptim-fused-noreg``: ``ProxSGD`` / ``ProxAdam`` with ``fused=True``, no regularizer;
* ``regoptim-group-cpp``: the group-lasso C++ kernel (``regoptim.backends.cpu.group``) called directly;
* ``regoptim-group-optimizer``: ``ProxSGD`` / ``ProxAdam(group_l1=...)`` on the default path (no
  ``fused`` or ``foreach`` argument), as a user runs it: the optimizer's dispatch
  (``regoptim.backends.group_step``) calling the kernel above.

``group_l1`` is small (1e-2, lr 1e-3): every group stays alive, Adam's Newton iteration runs on
every group (its costly case). The table gives the median ms per step, the ratio to
``torch-fused``'s in the same run, and GB/s of the family's one-pass traffic (``bytes_per_step``
in ``benchmarks/_common.py``: 5 tensors per parameter for SGD with momentum, 7 for Adam) with its
percentage of the in-place triad measured at start (``benchmarks/_machine.py``).

    python benchmarks/group_lasso.py                      # 16M in rows of 256, 1024, 4096
    python benchmarks/group_lasso.py --rows 1024 --repeat 5 --out -
    python benchmarks/group_lasso.py --impls torch-fused,regoptim-group-cpp
    python benchmarks/group_lasso.py --total 64K --rows 256 --repeat 2 --triad-numel 1M --out -  # smoke
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.append(str(HERE.parent))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import regoptim  # noqa: E402
from benchmarks._common import bytes_per_step, format_count, parse_count, parse_list  # noqa: E402
from benchmarks._machine import (  # noqa: E402
    TRIAD_NUMEL,
    machine_info,
    section_key,
    triad_bandwidth,
)
from regoptim.hyper import AdamHyper, GroupLasso, SgdHyper  # noqa: E402

LR = 1e-3
MOMENTUM = 0.9
GROUP_L1 = 1e-2
IMPLS = ("torch-fused", "regoptim-fused-noreg", "regoptim-group-cpp", "regoptim-group-optimizer")
DEFAULT_OUT = HERE / "RESULTS.md"


class _GroupKernel:
    """A minimal optimizer over the kernel of ``regoptim.backends.cpu.group``: its own state, one call
    per step."""

    def __init__(self, params: list[Tensor], family: str) -> None:
        from regoptim.backends.cpu import group as _cpu_group

        self.params = params
        self.lasso = GroupLasso(group_l1=GROUP_L1, axes=(0,) * len(params))
        self.family = family
        self.cg = _cpu_group
        self.first = True
        if family == "sgd":
            self.bufs = [torch.empty_like(p) for p in params]
            self.hyper = SgdHyper(LR, 0.0, MOMENTUM, 0.0, False, False, False, 0.0)
        else:
            self.m = [torch.zeros_like(p) for p in params]
            self.v = [torch.zeros_like(p) for p in params]
            self.steps = [torch.tensor(0.0) for _ in params]
            self.hyper_a = AdamHyper(LR, 0.9, 0.999, 1e-8, 0.0, False, False, False, 0.0)

    def step(self) -> None:
        grads = [p.grad for p in self.params]
        with torch.no_grad():
            if self.family == "sgd":
                self.cg.fused_group_sgd_(
                    self.params, grads, self.bufs, self.hyper, self.lasso,
                    is_first_step=self.first, grad_scale=None, found_inf=None,
                )  # fmt: skip
            else:
                self.cg.fused_group_adam_(
                    self.params, grads, self.m, self.v, None, self.steps, self.hyper_a,
                    self.lasso, grad_scale=None, found_inf=None,
                )  # fmt: skip
        self.first = False


def make(family: str, impl: str, params: list[Tensor]) -> Callable[[], None]:
    if impl == "regoptim-group-cpp":
        return _GroupKernel(params, family).step
    if family == "sgd":
        if impl == "torch-fused":
            return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, fused=True).step
        kw = {"group_l1": GROUP_L1} if impl == "regoptim-group-optimizer" else {"fused": True}
        return regoptim.ProxSGD(params, lr=LR, momentum=MOMENTUM, **kw).step
    if impl == "torch-fused":
        return torch.optim.Adam(params, lr=LR, fused=True).step
    kw = {"group_l1": GROUP_L1} if impl == "regoptim-group-optimizer" else {"fused": True}
    return regoptim.ProxAdam(params, lr=LR, **kw).step


def make_params(total: int, rows: int, gen: torch.Generator) -> list[Tensor]:
    n = total // rows
    params = [torch.empty(n, rows), torch.empty(n)]
    for p in params:
        p.uniform_(-1.0, 1.0, generator=gen)
        p.requires_grad_(True)
        p.grad = torch.empty_like(p)
    return params


def regen(params: list[Tensor], gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in params:
            p.grad.uniform_(-1.0, 1.0, generator=gen)  # type: ignore[union-attr]


def run_case(
    family: str, total: int, rows: int, impls: list[str], repeat: int
) -> dict[str, list[float]]:
    gen = torch.Generator().manual_seed(0)
    params = make_params(total, rows, gen)
    steps = {}
    for impl in impls:
        steps[impl] = make(family, impl, params)
        for _ in range(2):  # state, warm
            regen(params, gen)
            steps[impl]()
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    gc.collect()
    gc.disable()
    try:
        for r in range(repeat):
            order = impls[r % len(impls) :] + impls[: r % len(impls)]
            for impl in order:
                regen(params, gen)
                t0 = time.perf_counter()
                steps[impl]()
                times[impl].append(time.perf_counter() - t0)
    finally:
        gc.enable()
    return times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--total", default="16M", help="parameters per case (default 16M)")
    ap.add_argument("--rows", default="256,1024,4096", help="elements per row (one group each)")
    ap.add_argument("--families", default="sgd,adam")
    ap.add_argument("--impls", default=",".join(IMPLS))
    ap.add_argument("--repeat", type=int, default=15, help="samples per implementation")
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="markdown file to update ('-': none)")
    ap.add_argument("--triad-numel", help=f"elements per triad buffer (default {TRIAD_NUMEL})")
    args = ap.parse_args(argv)
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    total = parse_count(args.total)
    impls = parse_list(args.impls)
    info = machine_info(device)
    triad_numel = parse_count(args.triad_numel) if args.triad_numel else TRIAD_NUMEL
    triad = triad_bandwidth(device, triad_numel, inplace=True)
    lines = ["### Group lasso, CPU (" + section_key(device).removeprefix("cpu-") + ")", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [
        f"- cases: {format_count(total)} float32 parameters as a weight (N, R) and its bias (N,), "
        f"one group per row (R + 1 elements); lr {LR:g}, group_l1 {GROUP_L1:g} (every group "
        "alive); SGD momentum 0.9; Adam betas (0.9, 0.999)",
        "- rows: " + "; ".join(IMPLS),
        f"- {args.repeat} samples per implementation, one step each, interleaved round-robin "
        "(order rotated each round), gradients regenerated untimed before each sample; "
        "time.perf_counter",
        f"- in-place triad measured at start: {triad:.1f} GB/s, the ceiling of % of peak",
        f"- command: `{' '.join(['python benchmarks/group_lasso.py', *argv_list])}`",
        "",
        "| family | impl | rows of | ms/step (median) | IQR ms | x torch-fused | GB/s | % of peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for family in parse_list(args.families):
        for rows in parse_list(args.rows, int):
            print(f"[{family} rows of {rows}]", file=sys.stderr, flush=True)
            times = run_case(family, total, rows, impls, args.repeat)
            base = statistics.median(times["torch-fused"]) if "torch-fused" in times else None
            nbytes = bytes_per_step("sgd" if family == "sgd" else "adamw", total, torch.float32)
            for impl in impls:
                med = statistics.median(times[impl])
                q = statistics.quantiles(times[impl], n=4)
                gbs = nbytes / med / 1e9
                ratio = f"{med / base:.2f}" if base else "-"
                lines.append(
                    f"| {family} | {impl} | {rows} | {med * 1e3:.2f} | {q[0] * 1e3:.2f}-"
                    f"{q[2] * 1e3:.2f} | {ratio} | {gbs:.1f} | {100 * gbs / triad:.0f}% |"
                )
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    table = next(i for i, line in enumerate(lines) if line.startswith("| family"))
    lines.insert(table - 1, f"- load average at end (1/5/15 min): {load}")
    section = "\n".join(lines) + "\n"
    print(section)
    if args.out != "-":
        _update(Path(args.out), f"group-lasso-{section_key(device)}", section)
    return 0


def _update(path: Path, key: str, section: str) -> None:
    start, end = (f"<!-- benchmarks/group_lasso.py {key} {e} -->" for e in ("start", "end"))
    block = f"{start}\n{section}{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    i, j = text.find(start), text.find(end)
    if i >= 0 and j > i:
        text = text[:i] + block + text[j + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


if __name__ == "__main__":
    sys.exit(main())

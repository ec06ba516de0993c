"""Shared by the pytest-benchmark suite and ``benchmarks/run.py``: the parameter lists, the table of
implementations, the bytes-moved model, the timers and the machine description.

Bytes-moved model
-----------------
The effective bandwidth of an optimizer step is ``bytes_per_step / time``, where ``bytes_per_step``
is the traffic of an ideal *one-pass* update of the family, the same number for every
implementation in a family (so an implementation that makes extra passes over memory shows up as a
lower effective GB/s, never as more bytes):

* SGD with momentum: reads ``p, g, b`` and writes ``p, b``: 5 tensors of the parameter's dtype per
  parameter (3 without momentum: reads ``p, g``, writes ``p``).
* Adam/AdamW: reads ``p, g, m, v`` and writes ``p, m, v``: 7 tensors per parameter (9 with
  amsgrad: also reads and writes ``max_v``).

Decoupled weight decay and the L1 prox add no traffic to a one-pass update (they are arithmetic on
values already loaded), so the model is the same with or without regularizers. Step counters,
learning rates and other scalars are ignored. State tensors have the parameter's dtype, as in
torch.optim.
"""

from __future__ import annotations

import gc
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

import regoptim

REPO_ROOT = Path(__file__).resolve().parent.parent

# --- hyperparameters of the two families (issue 4) ---------------------------------------------

LR = 1e-3
SGD_MOMENTUM = 0.9
SGD_WEIGHT_DECAY = 1e-4
ADAMW_WEIGHT_DECAY = 1e-2  # torch.optim.AdamW's default
L1 = 1e-5

FAMILIES = ("sgd", "adamw")
FAMILY_TITLES = {
    "sgd": f"SGD momentum {SGD_MOMENTUM}, weight_decay {SGD_WEIGHT_DECAY:g}",
    "adamw": f"AdamW weight_decay {ADAMW_WEIGHT_DECAY:g}",
}
BASELINE = "torch-fused"


def _sgd(params: list[Tensor], **kw: Any) -> Optimizer:
    return torch.optim.SGD(
        params, lr=LR, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY, **kw
    )


def _prox_sgd(params: list[Tensor], l1: float, **kw: Any) -> Optimizer:
    return regoptim.ProxSGD(
        params, lr=LR, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY, l1=l1, **kw
    )


def _adamw(params: list[Tensor], **kw: Any) -> Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=ADAMW_WEIGHT_DECAY, **kw)


def _prox_adamw(params: list[Tensor], l1: float, **kw: Any) -> Optimizer:
    return regoptim.ProxAdamW(params, lr=LR, weight_decay=ADAMW_WEIGHT_DECAY, l1=l1, **kw)


def _regoptim_fused_unavailable(device: torch.device) -> str | None:
    from regoptim._fused import fused_unavailable_reason

    return fused_unavailable_reason(device.type)


@dataclass(frozen=True)
class Impl:
    """One implementation of one family's step."""

    key: str  # e.g. "torch-fused"
    label: str  # short description for tables
    make: Callable[[list[Tensor]], Optimizer]
    unavailable: Callable[[torch.device], str | None] = lambda device: None


IMPL_KEYS = (
    "torch-loop",
    "torch-foreach",
    "torch-fused",
    "regoptim-default",
    "regoptim-default-noreg",
    "regoptim-fused",
)

IMPLS: dict[str, dict[str, Impl]] = {
    "sgd": {
        "torch-loop": Impl(
            "torch-loop",
            "torch.optim.SGD(foreach=False) (CPU default)",
            lambda ps: _sgd(ps, foreach=False),
        ),
        "torch-foreach": Impl(
            "torch-foreach", "torch.optim.SGD(foreach=True)", lambda ps: _sgd(ps, foreach=True)
        ),
        "torch-fused": Impl(
            "torch-fused", "torch.optim.SGD(fused=True)", lambda ps: _sgd(ps, fused=True)
        ),
        "regoptim-default": Impl(
            "regoptim-default", f"ProxSGD(l1={L1:g}) default path", lambda ps: _prox_sgd(ps, L1)
        ),
        "regoptim-default-noreg": Impl(
            "regoptim-default-noreg",
            "ProxSGD(l1=0) default path",
            lambda ps: _prox_sgd(ps, 0.0),
        ),
        "regoptim-fused": Impl(
            "regoptim-fused",
            f"ProxSGD(l1={L1:g}, fused=True)",
            lambda ps: _prox_sgd(ps, L1, fused=True),
            _regoptim_fused_unavailable,
        ),
    },
    "adamw": {
        "torch-loop": Impl(
            "torch-loop",
            "torch.optim.AdamW(foreach=False) (CPU default)",
            lambda ps: _adamw(ps, foreach=False),
        ),
        "torch-foreach": Impl(
            "torch-foreach",
            "torch.optim.AdamW(foreach=True)",
            lambda ps: _adamw(ps, foreach=True),
        ),
        "torch-fused": Impl(
            "torch-fused", "torch.optim.AdamW(fused=True)", lambda ps: _adamw(ps, fused=True)
        ),
        "regoptim-default": Impl(
            "regoptim-default",
            f"ProxAdamW(l1={L1:g}) default path",
            lambda ps: _prox_adamw(ps, L1),
        ),
        "regoptim-default-noreg": Impl(
            "regoptim-default-noreg",
            "ProxAdamW(l1=0) default path",
            lambda ps: _prox_adamw(ps, 0.0),
        ),
        "regoptim-fused": Impl(
            "regoptim-fused",
            f"ProxAdamW(l1={L1:g}, fused=True)",
            lambda ps: _prox_adamw(ps, L1, fused=True),
            _regoptim_fused_unavailable,
        ),
    },
}


# --- sizes ---------------------------------------------------------------------------------------

_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "B": 2**30}


def parse_count(text: str) -> int:
    """``"16M"`` -> 16 * 2**20, ``"1B"``/``"1G"`` -> 2**30, ``"4096"`` -> 4096 (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGB]?)\s*", text.upper())
    if not m:
        raise ValueError(f"not a count: {text!r} (use e.g. 4096, 64K, 16M, 1B)")
    return int(float(m.group(1)) * _SUFFIX[m.group(2)])


def parse_list(text: str | Iterable[str], parse: Callable[[str], Any] = str) -> list[Any]:
    items = text.split(",") if isinstance(text, str) else [t for s in text for t in s.split(",")]
    return [parse(t.strip()) for t in items if t.strip()]


def format_count(n: int) -> str:
    for suffix, unit in (("B", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    for suffix, unit in (("B", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= unit:
            return f"{n / unit:.1f}{suffix}"
    return str(n)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- parameters and gradients ----------------------------------------------------------------


def split_sizes(numel: int, tensors: int) -> list[int]:
    """``numel`` elements in ``tensors`` 1-D tensors of (nearly) equal size."""
    if not 1 <= tensors <= numel:
        raise ValueError(f"cannot split {numel} elements into {tensors} tensors")
    base, rest = divmod(numel, tensors)
    return [base + (i < rest) for i in range(tensors)]


def make_params(
    numel: int, tensors: int, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> list[Tensor]:
    """Leaf parameters (``numel`` elements in ``tensors`` tensors) with ``.grad`` allocated."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for n in split_sizes(numel, tensors):
        p = torch.empty(n, dtype=dtype, device=device)
        p.uniform_(-1.0, 1.0, generator=gen)
        p.requires_grad_(True)
        p.grad = torch.empty_like(p)
        params.append(p)
    regen_grads(params, gen)
    return params


def regen_grads(params: list[Tensor], gen: torch.Generator | None = None) -> None:
    """Fresh gradient values (outside the timed region): the step reads gradients that were just
    written, as after a backward pass."""
    with torch.no_grad():
        for p in params:
            p.grad.uniform_(-1.0, 1.0, generator=gen)  # type: ignore[union-attr]


def state_tensors_per_param(family: str) -> int:
    return {"sgd": 1, "adamw": 2}[family]


def bytes_per_step(family: str, numel: int, dtype: torch.dtype) -> int:
    """Traffic of an ideal one-pass step (see the module docstring)."""
    per_param = {"sgd": 5, "adamw": 7}[family]
    return per_param * numel * torch.empty((), dtype=dtype).element_size()


def case_bytes(family: str, numel: int, dtype: torch.dtype, n_impls: int) -> int:
    """Memory a case holds: params + grads, plus one state per live implementation."""
    size = torch.empty((), dtype=dtype).element_size()
    return numel * size * (2 + state_tensors_per_param(family) * n_impls)


# --- timing ---------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """Times one call. CPU: ``time.perf_counter`` (wall), or with ``cpu_time`` the process's CPU
    time (``time.process_time``: all threads, so use it with one thread, where it is the work of
    the step without the time the process spent descheduled on a busy machine); CUDA: CUDA events
    after a synchronize."""

    def __init__(self, device: torch.device, cpu_time: bool = False) -> None:
        self.device = device
        self.clock = time.process_time if cpu_time else time.perf_counter
        if device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Seconds taken by ``fn()``."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start.record()
            fn()
            self._end.record()
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1e3
        t0 = self.clock()
        fn()
        return self.clock() - t0


def do_bench_available() -> bool:
    try:
        import triton.testing  # noqa: F401
    except Exception:
        return False
    return True


def do_bench_seconds(fn: Callable[[], Any], rep_ms: int = 200) -> float:
    """Median seconds of ``fn`` by ``triton.testing.do_bench`` (flushes L2 between calls)."""
    from triton.testing import do_bench

    try:
        ms = do_bench(fn, warmup=25, rep=rep_ms, return_mode="median")
    except TypeError:  # older triton without return_mode
        ms = do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5])
    return float(ms) / 1e3


@dataclass
class Result:
    family: str
    impl: str
    label: str
    dtype: torch.dtype
    numel: int
    tensors: int
    times: list[float] = field(default_factory=list)  # seconds per step
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    def quartiles(self) -> tuple[float, float] | None:
        if len(self.times) < 4:
            return None
        q = statistics.quantiles(self.times, n=4)
        return q[0], q[2]


def run_case(
    family: str,
    impl_keys: list[str],
    numel: int,
    tensors: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    repeat: int,
    warmup: int,
    timer: str = "perf",  # "perf", "cpu", "events" or "do_bench"
    memory_budget: int | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> list[Result]:
    """Time each implementation's step on one parameter list (shared by all of them).

    The implementations share the parameters and gradients and each has its own optimizer state.
    When all the states fit in ``memory_budget`` (bytes), the implementations are interleaved: each
    round times one step of every implementation, in an order rotated from round to round, with
    the gradients regenerated (untimed) before every step, so that load on the machine hits all of
    them alike. Otherwise they run one after the other, each state freed before the next. With
    ``timer="do_bench"`` (CUDA) each implementation is timed by ``triton.testing.do_bench``
    instead, without gradient regeneration (do_bench flushes the L2 cache between calls).
    """
    results: dict[str, Result] = {}
    live: list[str] = []
    for key in impl_keys:
        impl = IMPLS[family][key]
        res = Result(family, key, impl.label, dtype, numel, tensors)
        results[key] = res
        reason = impl.unavailable(device)
        if reason is not None:
            res.note = "unavailable: " + reason.splitlines()[0][:120]
        else:
            live.append(key)
    params = make_params(numel, tensors, dtype, device)
    gen = torch.Generator(device=device).manual_seed(1)
    time_one = Timer(device, cpu_time=timer == "cpu")

    def prepare(key: str) -> Optimizer | None:
        try:
            opt = IMPLS[family][key].make(params)
            for _ in range(max(warmup, 1)):  # the first step creates the state
                regen_grads(params, gen)
                opt.step()
            sync(device)
            return opt
        except Exception as exc:  # report, don't abort the whole matrix
            results[key].note = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            return None

    interleave = timer != "do_bench" and (
        memory_budget is None or case_bytes(family, numel, dtype, len(live)) <= memory_budget
    )
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if interleave:
            opts = {k: o for k in live if (o := prepare(k)) is not None}
            order = list(opts)
            for r in range(repeat):
                shift = r % len(order) if order else 0
                for key in order[shift:] + order[:shift]:
                    regen_grads(params, gen)
                    sync(device)
                    results[key].times.append(time_one(opts[key].step))
                log(f"  round {r + 1}/{repeat}")
            del opts
        else:
            for key in live:
                opt = prepare(key)
                if opt is None:
                    continue
                if timer == "do_bench":
                    results[key].times.append(do_bench_seconds(opt.step))
                else:
                    for _ in range(repeat):
                        regen_grads(params, gen)
                        sync(device)
                        results[key].times.append(time_one(opt.step))
                del opt
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        if gc_was_enabled:
            gc.enable()
    return [results[k] for k in impl_keys]


def copy_bandwidth(device: torch.device, numel: int = 64 * 2**20, repeat: int = 5) -> float:
    """GB/s of ``dst.copy_(src)`` on float32 buffers (reads + writes), a ceiling for one pass."""
    src = torch.ones(numel, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device)
    dst.copy_(src)
    times = [timer(lambda: dst.copy_(src)) for _ in range(repeat)]
    return 2 * numel * 4 / statistics.median(times) / 1e9


# --- machine description --------------------------------------------------------------------

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
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for needle, peak in HBM_PEAK_GBS:
        if needle in name:
            return peak
    return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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

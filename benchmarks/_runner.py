"""Timers and the interleaved runner of the benchmarks (``run.py`` and the pytest-benchmark suite).

``run_case`` times every implementation of one family on one parameter list, interleaved round by
round; for small cases it times ``k`` steps per sample (see its docstring).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim import Optimizer

from benchmarks._common import IMPLS, case_bytes, make_params, regen_grads


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
    times: list[float] = field(default_factory=list)  # seconds per step, one per sample
    steps_per_sample: int = 1
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.times) if self.times else None

    def quartiles(self) -> tuple[float, float] | None:
        if len(self.times) < 4:
            return None
        q = statistics.quantiles(self.times, n=4)
        return q[0], q[2]


MAX_STEPS_PER_SAMPLE = 10_000


def steps_per_sample(step_seconds: float, min_sample_seconds: float) -> int:
    """Steps to time together so that one sample lasts ``min_sample_seconds`` at least."""
    if step_seconds <= 0:
        return MAX_STEPS_PER_SAMPLE
    return max(1, min(MAX_STEPS_PER_SAMPLE, math.ceil(min_sample_seconds / step_seconds)))


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
    min_sample_seconds: float = 0.0,
    memory_budget: int | None = None,
) -> list[Result]:
    """Time each implementation's step on one parameter list (shared by all of them).

    The implementations share the parameters and gradients and each has its own optimizer state.
    When all the states fit in ``memory_budget`` (bytes), the implementations are interleaved: each
    round takes one sample of every implementation, in an order rotated from round to round, so
    that load on the machine hits all of them alike. Otherwise they run one after the other, each
    state freed before the next.

    A sample is ``k`` consecutive steps timed together, divided by ``k``. The gradients are
    regenerated (untimed) before each sample, and the ``k`` steps of a sample reuse them. ``k`` is
    calibrated once per case, after the warmup, from the fastest implementation's step, so that a
    sample lasts ``min_sample_seconds`` at least: 1 for the large cases whose step lasts that long
    already, tens to hundreds for the small models and the timer's resolution and overhead vanish;
    when interleaved, all implementations of a case use the same ``k``. With ``timer="do_bench"`` (CUDA) each
    implementation is timed by ``triton.testing.do_bench`` instead, without gradient regeneration
    (do_bench flushes the L2 cache between calls).
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

    def sample(key: str, opt: Optimizer, k: int) -> None:
        regen_grads(params, gen)
        sync(device)

        def steps() -> None:
            for _ in range(k):
                opt.step()

        results[key].times.append(time_one(steps) / k)
        results[key].steps_per_sample = k

    def calibrate(opts: dict[str, Optimizer]) -> int:
        if not min_sample_seconds or not opts:
            return 1
        fastest = float("inf")
        for opt in opts.values():
            for _ in range(3):
                regen_grads(params, gen)
                sync(device)
                fastest = min(fastest, time_one(opt.step))
        return steps_per_sample(fastest, min_sample_seconds)

    interleave = timer != "do_bench" and (
        memory_budget is None or case_bytes(family, numel, dtype, len(live)) <= memory_budget
    )
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if interleave:
            opts = {k: o for k in live if (o := prepare(k)) is not None}
            k = calibrate(opts)
            order = list(opts)
            for r in range(repeat):
                shift = r % len(order) if order else 0
                for key in order[shift:] + order[:shift]:
                    sample(key, opts[key], k)
            del opts
        else:
            for key in live:
                opt = prepare(key)
                if opt is None:
                    continue
                if timer == "do_bench":
                    results[key].times.append(do_bench_seconds(opt.step))
                else:
                    k = calibrate({key: opt})
                    for _ in range(repeat):
                        sample(key, opt, k)
                del opt
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        if gc_was_enabled:
            gc.enable()
    return [results[k] for k in impl_keys]

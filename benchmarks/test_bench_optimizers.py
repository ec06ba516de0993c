"""pytest-benchmark suite: one family x implementation x case per test.

    pytest benchmarks --benchmark-only                          # the CPU preset (as run.py's)
    pytest benchmarks --benchmark-only --bench-cases 20000/4,10000/100,400000/400
    pytest benchmarks --benchmark-only --bench-numel 1M --bench-tensors 8,64
    REGOPTIM_BENCH_CASES=64K/4 REGOPTIM_BENCH_ROUNDS=1 pytest benchmarks --benchmark-only

The rows are the issue's, as in ``benchmarks/run.py``: torch's ``fused=True`` step without
regularizers (the baseline), regoptim's default path with L1 and weight decay, the same with
``l1=0``, regoptim ``fused=True``, and torch's default (the for-loop on CPU).

Each test builds its parameters, runs untimed warmup steps (the first creates the optimizer
state), then times ``rounds`` rounds with ``benchmark.pedantic``; the gradients are regenerated in
the (untimed) setup before every round. A round is ``k`` steps on those gradients: ``k`` is 1 for
large cases and, for small ones, calibrated by the first test of a group (family, case, dtype) so
that a round lasts ``--bench-min-round-ms`` at least; every test of the group uses that ``k``, so
pytest-benchmark's table compares the implementations directly, per round of ``k`` steps (the
group name gives ``k``; ``extra_info`` gives us/step, the bytes-moved model and the effective
GB/s). The thread count is fixed for the session. Unlike ``benchmarks/run.py``, which interleaves
the implementations round by round on one parameter list, each test here runs alone: on a busy
machine, prefer the script's ratios.
"""

from __future__ import annotations

import time

import pytest
import torch

from benchmarks._common import (
    DEFAULT_IMPLS,
    FAMILIES,
    IMPLS,
    bytes_per_step,
    dtype_name,
    format_count,
    make_params,
    parse_case,
    parse_count,
    parse_dtype,
    parse_list,
    regen_grads,
)
from benchmarks._runner import steps_per_sample, sync
from benchmarks.conftest import bench_option

WARMUP_STEPS = 2
_STEPS_PER_ROUND: dict[tuple, int] = {}  # (family, numel, tensors, dtype, device) -> k


def _cases(config: pytest.Config) -> list[tuple[int, int]]:
    numel, tensors = bench_option(config, "numel"), bench_option(config, "tensors")
    if numel or tensors:
        sizes = parse_list(numel or "16M", parse_count)
        return [(n, t) for n in sizes for t in parse_list(tensors or "4,64,1024", int) if t <= n]
    return parse_list(bench_option(config, "cases"), parse_case)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    dtypes = parse_list(bench_option(config, "dtype"), parse_dtype)
    device_type = torch.device(bench_option(config, "device")).type
    impls = parse_list(bench_option(config, "impls")) or list(DEFAULT_IMPLS[device_type])
    cases, ids = [], []
    for dtype in dtypes:
        for family in FAMILIES:
            for numel, tensors in _cases(config):
                for impl in impls:
                    cases.append((family, impl, numel, tensors, dtype))
                    ids.append(
                        f"{family}-{impl}-{format_count(numel)}x{tensors}-{dtype_name(dtype)}"
                    )
    metafunc.parametrize("case", cases, ids=ids)


def _calibrate(step, params, gen, device, min_round_seconds: float) -> int:
    fastest = float("inf")
    for _ in range(3):
        regen_grads(params, gen)
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        fastest = min(fastest, time.perf_counter() - t0)
    return steps_per_sample(fastest, min_round_seconds)


def test_step(benchmark, case, pytestconfig):
    family, impl_key, numel, tensors, dtype = case
    device = torch.device(bench_option(pytestconfig, "device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    impl = IMPLS[family][impl_key]
    reason = impl.unavailable(device)
    if reason is not None:
        pytest.skip(reason)
    rounds = int(bench_option(pytestconfig, "rounds"))
    min_round_seconds = float(bench_option(pytestconfig, "min-round-ms")) / 1e3

    params = make_params(numel, tensors, dtype, device)
    gen = torch.Generator(device=device).manual_seed(1)
    opt = impl.make(params)
    for _ in range(WARMUP_STEPS):
        regen_grads(params, gen)
        opt.step()
    sync(device)
    group_key = (family, numel, tensors, dtype, device.type)
    if group_key not in _STEPS_PER_ROUND:
        _STEPS_PER_ROUND[group_key] = _calibrate(opt.step, params, gen, device, min_round_seconds)
    k = _STEPS_PER_ROUND[group_key]

    def setup():
        regen_grads(params, gen)
        sync(device)

    def steps():
        for _ in range(k):
            opt.step()
        sync(device)

    benchmark.group = (
        f"{family} {format_count(numel)} x{tensors} {dtype_name(dtype)}, {k} step(s) per round"
    )
    nbytes = bytes_per_step(family, numel, dtype)
    benchmark.extra_info.update(
        impl=impl.label, threads=torch.get_num_threads(), bytes_per_step=nbytes, steps_per_round=k
    )
    benchmark.pedantic(steps, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        per_step = stats.stats.median / k
        benchmark.extra_info["us/step (median)"] = round(per_step * 1e6, 2)
        benchmark.extra_info["GB/s (median)"] = round(nbytes / per_step / 1e9, 2)
    assert all(bool(torch.isfinite(p).all()) for p in params)

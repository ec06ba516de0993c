"""pytest-benchmark suite: one optimizer step per round, family x implementation x size.

    pytest benchmarks --benchmark-only                                  # 16M params, 4/64/1024 tensors
    pytest benchmarks --benchmark-only --bench-numel 1M --bench-tensors 8,64
    REGOPTIM_BENCH_NUMEL=64K REGOPTIM_BENCH_ROUNDS=1 pytest benchmarks --benchmark-only

Each test builds its parameters, runs untimed warmup steps (the first creates the optimizer
state), then times ``rounds`` steps with ``benchmark.pedantic``; the gradients are regenerated in
the (untimed) setup before every step. The thread count is fixed for the session. Tests of one
family, size and dtype share a benchmark group, so pytest-benchmark's table compares the
implementations directly; ``extra_info`` carries the bytes-moved model and the effective GB/s.
Unlike ``benchmarks/run.py``, which interleaves the implementations round by round on one
parameter list, each test here runs alone: on a busy machine, prefer the script's ratios.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks._common import (
    FAMILIES,
    IMPL_KEYS,
    IMPLS,
    bytes_per_step,
    dtype_name,
    format_count,
    make_params,
    parse_count,
    parse_dtype,
    parse_list,
    regen_grads,
    sync,
)
from benchmarks.conftest import bench_option

WARMUP_STEPS = 2


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    sizes = parse_list(bench_option(config, "numel"), parse_count)
    tensor_counts = parse_list(bench_option(config, "tensors"), int)
    dtypes = parse_list(bench_option(config, "dtype"), parse_dtype)
    impls = parse_list(bench_option(config, "impls")) or list(IMPL_KEYS)
    cases, ids = [], []
    for dtype in dtypes:
        for family in FAMILIES:
            for numel in sizes:
                for tensors in tensor_counts:
                    if tensors > numel:
                        continue
                    for impl in impls:
                        cases.append((family, impl, numel, tensors, dtype))
                        ids.append(
                            f"{family}-{impl}-{format_count(numel)}x{tensors}-{dtype_name(dtype)}"
                        )
    metafunc.parametrize("case", cases, ids=ids)


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

    params = make_params(numel, tensors, dtype, device)
    gen = torch.Generator(device=device).manual_seed(1)
    opt = impl.make(params)
    for _ in range(WARMUP_STEPS):
        regen_grads(params, gen)
        opt.step()
    sync(device)

    def setup():
        regen_grads(params, gen)
        sync(device)

    def step():
        opt.step()
        sync(device)

    benchmark.group = f"{family} {format_count(numel)} x{tensors} {dtype_name(dtype)}"
    nbytes = bytes_per_step(family, numel, dtype)
    benchmark.extra_info.update(
        impl=impl.label, threads=torch.get_num_threads(), bytes_per_step=nbytes
    )
    benchmark.pedantic(step, setup=setup, rounds=rounds, iterations=1, warmup_rounds=0)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.median > 0:
        benchmark.extra_info["GB/s (median)"] = round(nbytes / stats.stats.median / 1e9, 2)
    assert all(bool(torch.isfinite(p).all()) for p in params)

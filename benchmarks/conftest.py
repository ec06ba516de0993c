"""Options of the pytest-benchmark suite (``pytest benchmarks --benchmark-only``).

Every option also reads an environment variable, so that a CI job or a smoke test can shrink the
matrix without a command-line flag:

=====================  =============================  ===========================================
option                 environment                    default
=====================  =============================  ===========================================
--bench-cases          REGOPTIM_BENCH_CASES           the CPU preset: 16M/4,16M/64,16M/1024,
                                                      20000/4,10000/100,400000/400 (TOTAL/TENSORS)
--bench-numel          REGOPTIM_BENCH_NUMEL           none; with --bench-tensors, replaces cases
--bench-tensors        REGOPTIM_BENCH_TENSORS         none (by itself: 16M split so)
--bench-dtype          REGOPTIM_BENCH_DTYPE           float32
--bench-impls          REGOPTIM_BENCH_IMPLS           the device's rows (_common.DEFAULT_IMPLS)
--bench-rounds         REGOPTIM_BENCH_ROUNDS          10 timed rounds per test
--bench-min-round-ms   REGOPTIM_BENCH_MIN_ROUND_MS    2 (small cases: k steps per round)
--bench-threads        REGOPTIM_BENCH_THREADS         all cores (torch.set_num_threads)
--bench-device         REGOPTIM_BENCH_DEVICE          cpu
=====================  =============================  ===========================================
"""

from __future__ import annotations

import os

import pytest
import torch

from benchmarks._common import PRESETS

os.environ.setdefault("TRITON_INTERPRET", "0")  # time the real kernels, never the interpreter

_OPTIONS = {
    "cases": ("REGOPTIM_BENCH_CASES", PRESETS["cpu"]),
    "numel": ("REGOPTIM_BENCH_NUMEL", ""),
    "tensors": ("REGOPTIM_BENCH_TENSORS", ""),
    "dtype": ("REGOPTIM_BENCH_DTYPE", "float32"),
    "impls": ("REGOPTIM_BENCH_IMPLS", ""),
    "rounds": ("REGOPTIM_BENCH_ROUNDS", "10"),
    "min-round-ms": ("REGOPTIM_BENCH_MIN_ROUND_MS", "2"),
    "threads": ("REGOPTIM_BENCH_THREADS", str(os.cpu_count() or 1)),
    "device": ("REGOPTIM_BENCH_DEVICE", "cpu"),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("regoptim-bench", "regoptim benchmark matrix")
    for name, (env, default) in _OPTIONS.items():
        group.addoption(
            f"--bench-{name}",
            default=os.environ.get(env, default),
            help=f"(env {env}, default {default or 'see benchmarks/conftest.py'})",
        )


def bench_option(config: pytest.Config, name: str) -> str:
    return str(config.getoption(f"--bench-{name}"))


@pytest.fixture(scope="session", autouse=True)
def _fixed_threads(pytestconfig: pytest.Config) -> None:
    torch.set_num_threads(int(bench_option(pytestconfig, "threads")))

"""Options of the pytest-benchmark suite (``pytest benchmarks --benchmark-only``).

Every option also reads an environment variable, so that a CI job or a smoke test can shrink the
matrix without a command-line flag:

===================  ===========================  ==============================================
option               environment                  default
===================  ===========================  ==============================================
--bench-numel        REGOPTIM_BENCH_NUMEL         16M (total parameters, e.g. 64K, 1M, 16M)
--bench-tensors      REGOPTIM_BENCH_TENSORS       4,64,1024
--bench-dtype        REGOPTIM_BENCH_DTYPE         float32
--bench-impls        REGOPTIM_BENCH_IMPLS         all (see benchmarks/_common.py IMPL_KEYS)
--bench-rounds       REGOPTIM_BENCH_ROUNDS        10 timed steps per test
--bench-threads      REGOPTIM_BENCH_THREADS       all cores (torch.set_num_threads)
--bench-device       REGOPTIM_BENCH_DEVICE        cpu
===================  ===========================  ==============================================
"""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TRITON_INTERPRET", "0")  # time the real kernels, never the interpreter

_OPTIONS = {
    "numel": ("REGOPTIM_BENCH_NUMEL", "16M"),
    "tensors": ("REGOPTIM_BENCH_TENSORS", "4,64,1024"),
    "dtype": ("REGOPTIM_BENCH_DTYPE", "float32"),
    "impls": ("REGOPTIM_BENCH_IMPLS", ""),
    "rounds": ("REGOPTIM_BENCH_ROUNDS", "10"),
    "threads": ("REGOPTIM_BENCH_THREADS", str(os.cpu_count() or 1)),
    "device": ("REGOPTIM_BENCH_DEVICE", "cpu"),
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("regoptim-bench", "regoptim benchmark matrix")
    for name, (env, default) in _OPTIONS.items():
        group.addoption(
            f"--bench-{name}",
            default=os.environ.get(env, default),
            help=f"(env {env}, default {default or 'all'})",
        )


def bench_option(config: pytest.Config, name: str) -> str:
    return str(config.getoption(f"--bench-{name}"))


@pytest.fixture(scope="session", autouse=True)
def _fixed_threads(pytestconfig: pytest.Config) -> None:
    torch.set_num_threads(int(bench_option(pytestconfig, "threads")))

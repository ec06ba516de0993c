"""CI smoke run of the benchmarks (tiny sizes, one round) so that they cannot rot.

Timings are printed by the benchmarks, never asserted here: only that the script and the
pytest-benchmark suite run, and that the script writes a table with every implementation.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytest.importorskip("pytest_benchmark")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The test session sets TRITON_INTERPRET=1 (tests/conftest.py); the benchmarks time the real
    # fused CPU kernel, as a user's run would.
    env["TRITON_INTERPRET"] = "0"
    env.pop("PYTEST_ADDOPTS", None)
    return env


def test_run_script_smoke(tmp_path):
    out = tmp_path / "RESULTS.md"
    # run from an unrelated working directory: the script must not assume the repo root
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--smoke", "--out", str(out)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    text = out.read_text()
    assert "<!-- benchmarks/run.py cpu-" in text  # keyed by torch's CPU capability
    assert "triad bandwidth measured at start:" in text
    # the rows, per family, with the ratio to torch-fused
    for impl in (
        "torch-fused",
        "regoptim-default",
        "regoptim-default-noreg",
        "regoptim-fused",  # timed, or marked unavailable with the reason
        "torch-loop",
    ):
        assert f"| sgd | {impl} |" in text and f"| adamw | {impl} |" in text
    assert "| torch-foreach |" not in text
    assert "| 2000 | 10 |" in text  # a small case (k steps per sample)
    assert "error:" not in text, text
    for column in ("us/step (median)", "| k |", "x torch-fused", "GB/s", "% of peak"):
        assert column in text


def test_results_file_sections(tmp_path):
    from benchmarks.run import update_results_file

    path = tmp_path / "RESULTS.md"
    legacy = "<!-- benchmarks/run.py cpu start -->\nold cpu\n<!-- benchmarks/run.py cpu end -->"
    cuda = "<!-- benchmarks/run.py cuda start -->\ngpu\n<!-- benchmarks/run.py cuda end -->"
    path.write_text(f"# Benchmark results\n\n{legacy}\n\n{cuda}\n\n## Notes\n")
    update_results_file(path, "cpu-AVX512", "avx512 v1")
    update_results_file(path, "cpu-AVX2", "avx2")
    update_results_file(path, "cpu-AVX512", "avx512 v2")
    text = path.read_text()
    assert "old cpu" not in text and "avx512 v1" not in text  # legacy section dropped, replaced
    for kept in ("avx512 v2", "avx2", "gpu", "## Notes"):
        assert text.count(kept) == 1, text


def test_pytest_benchmark_suite_smoke(tmp_path):
    env = _env()
    env.update(
        REGOPTIM_BENCH_CASES="4K/3,2000/10",
        REGOPTIM_BENCH_ROUNDS="1",
        REGOPTIM_BENCH_MIN_ROUND_MS="1",
        REGOPTIM_BENCH_THREADS="1",
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            str(ROOT / "benchmarks"),
            "--benchmark-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(ROOT),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "passed" in proc.stdout


def test_group_lasso_script_smoke(tmp_path):
    """benchmarks/group_lasso.py runs from any directory and writes every row (timings are not
    asserted)."""
    out = tmp_path / "RESULTS.md"
    args = ["--total", "64K", "--rows", "256", "--repeat", "2", "--triad-numel", "1M"]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "group_lasso.py"), *args, "--out", str(out)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    impls = [
        "torch-fused",
        "regoptim-fused-noreg",
        "regoptim-group-cpp",
        "regoptim-group-optimizer",
    ]
    for family in ("sgd", "adam"):
        for impl in impls:
            assert f"| {family} | {impl} | 256 |" in text, (family, impl)

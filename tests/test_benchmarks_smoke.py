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
    assert "<!-- benchmarks/run.py cpu start -->" in text
    for impl in ("torch-loop", "torch-foreach", "torch-fused", "regoptim-default"):
        assert f"| {impl} |" in text
    assert "| regoptim-fused |" in text  # timed, or marked unavailable with the reason
    assert "error:" not in text, text
    assert "GB/s" in text and "x torch fused" in text


def test_pytest_benchmark_suite_smoke(tmp_path):
    env = _env()
    env.update(
        REGOPTIM_BENCH_NUMEL="4K",
        REGOPTIM_BENCH_TENSORS="3",
        REGOPTIM_BENCH_ROUNDS="1",
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

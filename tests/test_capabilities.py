"""Bitwise parity with torch's fused CPU optimizers under every CPU capability this CPU has.

torch picks its CPU kernels by capability (DEFAULT / AVX2 / AVX512 on x86-64) and honours
``ATEN_CPU_CAPABILITY``; regoptim's fused C++ kernel mirrors the rounding of the build torch
dispatches to (``regoptim.backends.cpu.capability``). The parity tests of test_cpu_fused.py run in this
process under one capability; here they run again in subprocesses under each capability the CPU
supports (a capability the CPU lacks silently falls back to a lower one, so it is detected and
reported, not run twice).
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from regoptim.backends.cpu import kernel as cf
from regoptim.backends.cpu.capability import numerics_for, torch_kernel_numerics

ROOT = Path(__file__).resolve().parent.parent
HEADERS = Path(torch.__file__).parent / "include" / "ATen"


def test_table_x86() -> None:
    avx512 = numerics_for("x86_64", "AVX512")
    assert (avx512.dispatched, avx512.vector_width, avx512.fma) == ("AVX2", 8, True)
    assert numerics_for("x86_64", "AVX2").vector_width == 8
    default = numerics_for("x86_64", "DEFAULT")
    assert (default.fma, default.verified) == (False, True)
    assert numerics_for("AMD64", "AVX2") == numerics_for("x86_64", "AVX2")


def test_table_unverified() -> None:
    neon = numerics_for("aarch64", "DEFAULT")
    assert (neon.vector_width, neon.fma, neon.verified) == (4, True, False)
    unknown = numerics_for("riscv64", "DEFAULT")
    assert (unknown.vector_width, unknown.verified) == (0, False)  # no tail mirroring


def test_follows_what_torch_reports() -> None:
    numerics = torch_kernel_numerics()
    assert numerics.capability == torch.backends.cpu.get_cpu_capability()
    assert numerics == numerics_for(platform.machine(), numerics.capability)


@pytest.mark.skipif(not HEADERS.is_dir(), reason="this torch install ships no ATen headers")
def test_derivation_matches_torchs_headers() -> None:
    """The facts the table rests on, read from the installed torch's own headers, so that a torch
    that changes them fails here instead of in a user's run."""
    stub = (HEADERS / "native" / "DispatchStub.h").read_text()
    avx512_block = stub.split("#ifdef CPU_CAPABILITY_AVX512\n#define REGISTER_DISPATCH", 1)
    assert len(avx512_block) == 2, "REGISTER_DISPATCH no longer special-cases AVX512"
    assert avx512_block[1].split("\n", 1)[0].endswith("nullptr : nullptr))")
    vec_base = (HEADERS / "cpu" / "vec" / "vec_base.h").read_text()
    assert "#define VECTOR_WIDTH 64" in vec_base  # AVX512
    assert "#define VECTOR_WIDTH 32" in vec_base  # AVX2, x86 DEFAULT (8 float32 lanes)
    assert "#define VECTOR_WIDTH 16" in vec_base  # AArch64 NEON (4 lanes)


def _reported(capability: str) -> str:
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    return out.stdout.strip()


def _x86_capabilities() -> list[str]:
    if numerics_for(platform.machine(), "AVX2").dispatched != "AVX2":
        return []
    return ["default", "avx2", "avx512"]


@pytest.mark.slow
@pytest.mark.skipif(cf.available() is not None, reason=str(cf.available()))
@pytest.mark.parametrize("capability", _x86_capabilities() or ["default"])
def test_parity_under_capability(capability: str) -> None:
    reported = _reported(capability)
    if reported.lower() != capability:
        pytest.skip(f"this CPU lacks {capability}: torch reports {reported} under it")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    cmd += ["tests/test_cpu_fused.py", "-k", "bitwise_torch_fused"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = res.stdout[-3000:] + res.stderr[-2000:]
    assert res.returncode == 0, f"parity under ATEN_CPU_CAPABILITY={capability}:\n{tail}"
    assert " passed" in res.stdout and " skipped" not in res.stdout.splitlines()[-1], tail

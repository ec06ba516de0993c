"""Install-time build of regoptim's fused CPU kernel (everything else is in pyproject.toml).

``regoptim/backends/cpu/csrc/fused_cpu.cpp`` is a plain C ABI library loaded with ctypes (no torch headers,
no Python API). It is compiled here once per instruction-set variant of the target architecture
(x86-64: AVX-512, AVX2, baseline; AArch64: baseline), with the flags in
``regoptim/backends/cpu/csrc/build_flags.json``; at run time regoptim loads the variant that matches the CPU
capability torch reports, so one install runs on any CPU of the architecture. A variant that
fails to build (no compiler, an old one) is skipped with a warning: the default CPU path then
stays eager torch, and ``fused=True`` compiles the kernel at first use instead.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
CSRC = Path("regoptim") / "backends" / "cpu" / "csrc"
SOURCE = CSRC / "fused_cpu.cpp"
# included by SOURCE (group lasso): a change rebuilds the variants
HEADERS = sorted(str(h) for h in CSRC.glob("*.h"))
FLAGS = json.loads((HERE / CSRC / "build_flags.json").read_text())
# as regoptim.backends.cpu.capability.arch (not importable here: pip builds without torch installed)
ARCH = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}.get(
    platform.machine().lower()
)
TIMEOUT = float(os.environ.get("REGOPTIM_BUILD_TIMEOUT") or 300)


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


class BuildKernels(build_ext):
    """Compile each variant with the kernel's own flags (not Python's CFLAGS), optionally."""

    def build_extension(self, ext: Extension) -> None:
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        cxx = _compiler()
        if cxx is None:
            self.warn(
                f"regoptim: no C++ compiler; skipping {ext.name} (the CPU default stays eager)"
            )
            return
        variant_flags = ext.extra_compile_args
        for extra in (FLAGS["openmp"], []):  # compilers without OpenMP (e.g. Apple clang)
            cmd = [cxx, *FLAGS["base"], *variant_flags, *extra, str(SOURCE), "-o", str(out)]
            try:
                res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
            except (OSError, subprocess.TimeoutExpired) as exc:
                self.warn(f"regoptim: building {ext.name} failed ({exc}); skipped")
                return
            if res.returncode == 0:
                return
        self.warn(f"regoptim: building {ext.name} failed; skipped:\n{res.stderr[-2000:]}")


def _variants() -> list[Extension]:
    if os.environ.get("REGOPTIM_NO_PREBUILT") == "1" or ARCH is None:
        return []
    return [
        Extension(
            f"regoptim.backends.cpu._fused_cpu_{name}",
            [str(SOURCE)],
            extra_compile_args=flags,
            depends=HEADERS,
        )
        for name, flags in FLAGS["variants"][ARCH].items()
    ]


setup(ext_modules=_variants(), cmdclass={"build_ext": BuildKernels})

"""How torch's fused CPU optimizer kernels round, for the CPU capability torch dispatches to.

regoptim's fused CPU kernel promises, with the regularizers torch also has (coupled L2, no L1),
float32 results bitwise equal to ``torch._fused_sgd_`` / ``_fused_adam_`` / ``_fused_adamw_``.
Those kernels (aten/src/ATen/native/cpu/FusedSGDKernel.cpp, FusedAdamKernel.cpp) are compiled
once per CPU capability, and their float32 rounding depends on that build in two ways:

* **FMA.** ``at::vec::fmadd`` and the compiler's contraction of ``a * b + c`` give one rounding
  in builds with FMA (x86 AVX2, AArch64) and two in builds without (x86 DEFAULT, no ``-mfma``).
* **The scalar tail.** Each tensor's last ``numel % Vectorized<float>::size()`` elements go
  through a scalar loop that the compiler contracted differently from the vector loop.
  ``Vectorized<float>::size()`` is ``VECTOR_WIDTH / 4`` (ATen/cpu/vec/vec_base.h): 64 bytes under
  AVX512, 16 on AArch64 NEON, 32 otherwise (AVX2, x86 DEFAULT's generic vector, SVE256).

And one more fact from torch's source: both stubs are registered with ``REGISTER_DISPATCH``,
which under ``CPU_CAPABILITY_AVX512`` registers ``nullptr`` (ATen/native/DispatchStub.h: "
REGISTER_DISPATCH now dispatches an AVX512 kernel to nullptr"), so on an AVX512 capability the
dispatcher falls back to the AVX2 build. torch's fused optimizers therefore round the same way
under AVX512 and AVX2: 8 float32 lanes with FMA.

:func:`torch_kernel_numerics` reads the capability torch reports at run time
(``torch.backends.cpu.get_cpu_capability()``, which honours ``ATEN_CPU_CAPABILITY``) and returns
the rounding to mirror. ``verified`` says whether the bitwise parity is tested on that capability
(x86-64 DEFAULT, AVX2, AVX512 are); on the others the kernel mirrors what torch's source says and
its tests bound the difference by one ulp instead.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

import torch

__all__ = ["KernelNumerics", "arch", "numerics_for", "torch_kernel_numerics"]


@dataclass(frozen=True)
class KernelNumerics:
    """The float32 rounding of torch's fused CPU optimizer kernels on this process's capability."""

    capability: str  # what torch reports (``get_cpu_capability()``)
    dispatched: str  # the build of torch's fused optimizer stubs that runs on it
    vector_width: int  # float32 lanes of that build's vector loop (0: unknown, no tail mirroring)
    fma: bool  # whether that build rounds a * b + c once
    verified: bool  # bitwise parity tested on this capability (else: within one ulp)


# (architecture, capability) -> (dispatched build, float32 lanes, fma, verified)
_TABLE: dict[tuple[str | None, str], tuple[str, int, bool, bool]] = {
    ("x86_64", "AVX512"): ("AVX2", 8, True, True),  # REGISTER_DISPATCH: no AVX512 kernel
    ("x86_64", "AVX2"): ("AVX2", 8, True, True),
    ("x86_64", "DEFAULT"): ("DEFAULT", 8, False, True),  # generic Vectorized, no -mfma
    ("aarch64", "DEFAULT"): ("DEFAULT", 4, True, False),  # NEON: VECTOR_WIDTH 16, vfmaq
    ("aarch64", "SVE128"): ("SVE128", 4, True, False),
    ("aarch64", "SVE256"): ("SVE256", 8, True, False),
}
_ARCH = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}


def arch(machine: str | None = None) -> str | None:
    """``"x86_64"``, ``"aarch64"`` or ``None`` (another architecture) for ``platform.machine()``
    (or ``machine``), whatever name the OS gives it (AMD64, arm64, ...)."""
    return _ARCH.get((machine if machine is not None else platform.machine()).lower())


@functools.cache
def torch_kernel_numerics() -> KernelNumerics:
    """The rounding regoptim's fused CPU kernel mirrors in this process (read once: torch fixes
    its capability at the first dispatch)."""
    try:
        cap = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # pragma: no cover - very old torch
        cap = "DEFAULT"
    return numerics_for(platform.machine(), cap)


def numerics_for(machine: str, capability: str) -> KernelNumerics:
    """The rounding of torch's fused CPU optimizers for ``capability`` on ``machine``."""
    entry = _TABLE.get((arch(machine), capability.upper()))
    if entry is None:  # an architecture or capability regoptim has no derivation for
        return KernelNumerics(capability, capability, 0, True, False)
    dispatched, width, fma, verified = entry
    return KernelNumerics(capability, dispatched, width, fma, verified)

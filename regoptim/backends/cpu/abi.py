"""The C ABI of the fused CPU kernel (``csrc/fused_cpu.cpp``'s ``extern "C"`` entry points).

:data:`ABI_VERSION` must equal the kernel's ``REGOPTIM_ABI_VERSION`` (a build reporting another is
not loaded; it is part of the build cache key); :func:`declare` gives ctypes each entry point's
signature, in the order the C++ declares them.
"""

from __future__ import annotations

import ctypes

__all__ = ["ABI_VERSION", "declare"]

ABI_VERSION = 4


def declare(lib: ctypes.CDLL) -> None:
    """Set the argument and return types of every entry point of ``lib``."""
    i64p = ctypes.c_void_p
    d = ctypes.c_double
    lib.regoptim_sgd.restype = ctypes.c_int
    lib.regoptim_sgd.argtypes = [
        ctypes.c_int, ctypes.c_int64, i64p, i64p, i64p, i64p,
        d, d, d, d, d, d, d, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
    ]  # fmt: skip
    lib.regoptim_adam.restype = ctypes.c_int
    lib.regoptim_adam.argtypes = [
        ctypes.c_int, ctypes.c_int64, i64p, i64p, i64p, i64p, i64p, i64p, i64p,
        d, d, d, d, d, d, d, d, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
    ]  # fmt: skip
    lib.regoptim_sgd_group.restype = ctypes.c_int
    lib.regoptim_sgd_group.argtypes = [
        ctypes.c_int, ctypes.c_int64, i64p, i64p, i64p, i64p, i64p, i64p, ctypes.c_int64,
        d, d, d, d, d, d, d, d, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
    ]  # fmt: skip
    lib.regoptim_adam_group.restype = ctypes.c_int
    lib.regoptim_adam_group.argtypes = [
        ctypes.c_int, ctypes.c_int64, i64p, i64p, i64p, i64p, i64p, i64p, i64p, i64p, i64p,
        ctypes.c_int64, d, d, d, d, d, d, d, d, d, ctypes.c_int, ctypes.c_int, ctypes.c_int64,
    ]  # fmt: skip

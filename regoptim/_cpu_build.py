"""Build, cache and load the fused CPU kernel (``regoptim/csrc/fused_cpu.cpp``).

Compiled at first use with the system C++ compiler, cached on disk, loaded with :mod:`ctypes`;
:mod:`regoptim._cpu_fused` calls :func:`load` and re-exports the public helpers.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

__all__ = ["available", "build_count", "build_info", "load"]

_SOURCE = Path(__file__).with_name("csrc") / "fused_cpu.cpp"
_ABI_VERSION = 2

# Without -ffast-math (it would change results); -ffp-contract=off keeps every FMA explicit in the
# source; -fno-math-errno / -fno-trapping-math change no result but let sqrt and selects vectorize.
_BASE_FLAGS = [
    "-O2",
    "-fno-unswitch-loops",  # the element loops are `omp simd` with blends; halves the build
    "-std=c++17",
    "-shared",
    "-fPIC",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
]
_NATIVE_FLAGS = ["-march=native"]
_OPENMP_FLAGS = ["-fopenmp"]

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_build_count = 0
_info: dict[str, object] = {}


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cache_dir() -> Path:
    env = os.environ.get("REGOPTIM_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "regoptim"


def _host_id() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    parts = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part"):
                    parts.append(line.strip())
                if line.strip() == "":  # first processor only
                    break
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _compile(cxx: str, flags: list[str], out_dir: Path, name: str) -> Path:
    """Compile the kernel into ``out_dir/name`` atomically (temp file + rename)."""
    global _build_count
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    try:
        cmd = [cxx, *flags, str(_SOURCE), "-o", tmp]
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True)
        _info["build_seconds"] = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(
                f"regoptim: compiling the fused CPU kernel failed:\n  {' '.join(cmd)}\n"
                f"{res.stderr.strip()}"
            )
        _build_count += 1
        target = out_dir / name
        os.replace(tmp, target)
        return target
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _try_load(path: Path) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(path))
        if lib.regoptim_abi_version() != _ABI_VERSION:
            return None
    except (OSError, AttributeError):
        return None
    return lib


def _declare(lib: ctypes.CDLL) -> None:
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


def load() -> ctypes.CDLL:
    """Return the loaded kernel library, compiling it (once, cached on disk) if needed."""
    global _lib
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        cxx = _compiler()
        if cxx is None:
            raise RuntimeError(_no_compiler_message())
        source = _SOURCE.read_bytes()
        version = _compiler_version(cxx)
        t0 = time.perf_counter()
        lib = None
        errors = []
        for flags in (
            _BASE_FLAGS + _NATIVE_FLAGS + _OPENMP_FLAGS,
            _BASE_FLAGS + _NATIVE_FLAGS,  # compilers without OpenMP (e.g. Apple clang)
            _BASE_FLAGS,
        ):
            key = hashlib.sha256(
                b"\0".join(
                    [source, " ".join(flags).encode(), version.encode(), _host_id().encode()]
                )
            ).hexdigest()[:20]
            name = f"fused_cpu_{key}.so"
            for directory in (_cache_dir(), Path(tempfile.gettempdir()) / "regoptim-cache"):
                path = directory / name
                lib = _try_load(path) if path.exists() else None
                if lib is not None:
                    _info.update(source="disk cache", path=str(path))
                    break
                try:
                    path = _compile(cxx, flags, directory, name)
                except RuntimeError as exc:
                    errors.append(str(exc))
                    break  # the flags, not the directory, failed
                except OSError as exc:  # directory not writable: try the next
                    errors.append(f"{directory}: {exc}")
                    continue
                lib = _try_load(path)
                if lib is not None:
                    _info.update(source="compiled", path=str(path))
                    break
            if lib is not None:
                _info["flags"] = flags
                break
        if lib is None:
            raise RuntimeError(
                "regoptim: could not build the fused CPU kernel (fused=True on CPU needs a C++ "
                "compiler, g++ or clang++, found via $CXX or PATH):\n" + "\n".join(errors)
            )
        _declare(lib)
        _info["load_seconds"] = time.perf_counter() - t0
        _info["openmp"] = bool(lib.regoptim_has_openmp())
        _info["compiler"] = cxx
        _lib = lib
        return lib


def _no_compiler_message() -> str:
    return (
        "fused=True on CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX) to build "
        "regoptim's fused CPU kernel at first use; none was found. Install one (e.g. "
        "`apt install g++`) or use fused=None (torch's kernels plus the regularizers' pass)."
    )


def available() -> str | None:
    """``None`` if the fused CPU kernel can run here, else a message saying what it needs.

    Cheap: checks for a loaded kernel or a C++ compiler; the build happens at the first step.
    """
    if _lib is not None:
        return None
    if _compiler() is None:
        return _no_compiler_message()
    return None


def build_count() -> int:
    """How many times this process has compiled the kernel (0 when it came from the disk cache)."""
    return _build_count


def build_info() -> dict[str, object]:
    """Where the loaded kernel came from (``source``: "compiled" or "disk cache"), its path,
    flags, and the seconds spent compiling/loading it."""
    return dict(_info)


if sys.platform == "win32":  # pragma: no cover
    _BASE_FLAGS = [f for f in _BASE_FLAGS if f != "-fPIC"]

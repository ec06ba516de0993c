"""Build, cache and load the fused CPU kernel (``regoptim/backends/cpu/csrc/fused_cpu.cpp``).

Compiled at first use with the system C++ compiler, cached on disk, loaded with :mod:`ctypes`;
:mod:`regoptim.backends.cpu.kernel` calls :func:`load` and re-exports the public helpers.

The cache is keyed by a hash of the source, the flags and the host CPU (not the compiler, so a
cached build loads on a machine without one; delete the entry to rebuild with another) and lives in ``$REGOPTIM_CACHE_DIR``, else
``$XDG_CACHE_HOME/regoptim``, else ``~/.cache/regoptim``; when that cannot be used, in
``<tempdir>/regoptim-<uid>``; when neither is safe, a fresh private temporary directory (a build
per process). A shared object runs code in this process as soon as it is loaded, so:

* a directory is used only if it is owned by this user and not writable by group or others (a
  symlink only if this user owns it too); the ones regoptim creates are made with mode 0700;
* a cached file is loaded only if it is such a file too (opened without following symlinks) and
  its size and sha256 match the ``.json`` record written beside it, so a truncated or corrupted
  entry (a crash while writing, a full disk) is rebuilt instead of crashing the process;
* a build is written to a temporary file in the same directory, fsynced and renamed into place,
  then its record likewise, so a process that has the old file mapped keeps a valid one.

The file is checked, then loaded by its path: in between, only this user could replace it.

The compiler runs under a timeout (``$REGOPTIM_BUILD_TIMEOUT`` seconds, default 300).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.machinery
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from regoptim.backends.cpu.abi import ABI_VERSION, declare
from regoptim.backends.cpu.private_files import (
    fsync,
    is_private_dir,
    make_private_dir,
    read_private,
    uid,
    write_atomic,
)

__all__ = ["available", "build_count", "build_info", "load"]

_SOURCE = Path(__file__).with_name("csrc") / "fused_cpu.cpp"
# The headers the source includes (group lasso): part of the cache key, installed beside it
_HEADERS = sorted(_SOURCE.parent.glob("*.h"))

# The kernel's flags, shared with setup.py (which builds the per-ISA variants at install time).
_FLAGS = json.loads(_SOURCE.with_name("build_flags.json").read_text())
_BASE_FLAGS: list[str] = list(_FLAGS["base"])
if sys.platform == "win32":  # pragma: no cover
    _BASE_FLAGS.remove("-fPIC")
_NATIVE_FLAGS: list[str] = list(_FLAGS["native"])
_OPENMP_FLAGS: list[str] = list(_FLAGS["openmp"])
_FLAG_SETS = [
    _BASE_FLAGS + _NATIVE_FLAGS + _OPENMP_FLAGS,
    _BASE_FLAGS + _NATIVE_FLAGS,  # compilers without OpenMP (e.g. Apple clang)
    _BASE_FLAGS,
]
_DEFAULT_TIMEOUT = 300.0

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_build_count = 0
_info: dict[str, object] = {}


class _BuildTimeout(RuntimeError):
    """The compiler ran past the timeout (not retried with other flags)."""


# ---------------------------------------------------------------------------------------------
# Where: the compiler, the cache key, safe directories


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _build_timeout() -> float:
    env = os.environ.get("REGOPTIM_BUILD_TIMEOUT")
    if not env:
        return _DEFAULT_TIMEOUT
    try:
        seconds = float(env)
    except ValueError:
        seconds = float("nan")
    if not 0.0 < seconds < float("inf"):
        raise ValueError(
            f"REGOPTIM_BUILD_TIMEOUT must be a positive number of seconds, got {env!r}"
        )
    return seconds


def _cache_dir() -> Path:
    env = os.environ.get("REGOPTIM_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "regoptim"


def _cache_dirs() -> list[Path]:
    """Where a build is looked for and written, in order: the cache, then a per-user temp dir."""
    user = uid()
    fallback = Path(tempfile.gettempdir()) / f"regoptim-{user if user is not None else 'cache'}"
    return [_cache_dir(), fallback]


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


def _entry_name(flags: list[str]) -> str:
    """File stem of the build of this source with ``flags`` on this host (any compiler)."""
    parts = [_SOURCE.read_bytes(), *(h.read_bytes() for h in _HEADERS)]
    parts += [" ".join(flags).encode(), _host_id().encode()]
    parts.append(str(ABI_VERSION).encode())
    return "fused_cpu_" + hashlib.sha256(b"\0".join(parts)).hexdigest()[:20]


def _verified(directory: Path, stem: str) -> tuple[Path, dict] | None:
    """The cached build ``directory/stem.so`` and its record, if both are safe and the file's
    size and sha256 are the recorded ones."""
    if not is_private_dir(directory):
        return None
    data = read_private(directory / f"{stem}.so")
    record = read_private(directory / f"{stem}.json")
    if data is None or record is None:
        return None
    try:
        meta = json.loads(record)
    except ValueError:
        return None
    if not isinstance(meta, dict) or meta.get("size") != len(data):
        return None
    if meta.get("sha256") != hashlib.sha256(data).hexdigest():
        return None
    return directory / f"{stem}.so", meta


def _cached_builds(flag_sets: list[list[str]]) -> Iterator[tuple[Path, dict, list[str]]]:
    """Verified cached builds (path, record, flags), in the order of ``flag_sets``."""
    for flags in flag_sets:
        stem = _entry_name(flags)
        for directory in _cache_dirs():
            hit = _verified(directory, stem)
            if hit is not None:
                yield hit[0], hit[1], flags


# ---------------------------------------------------------------------------------------------
# Build


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout kill the group (the compiler driver
    and what it started) and raise :class:`_BuildTimeout`."""
    posix = os.name == "posix"
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=posix
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            if posix:
                os.killpg(proc.pid, signal.SIGKILL)
            else:  # pragma: no cover
                proc.kill()
        proc.communicate()
        raise _BuildTimeout(
            f"regoptim: compiling the fused CPU kernel did not finish within {timeout:g} s and "
            f"was stopped (set REGOPTIM_BUILD_TIMEOUT to allow longer):\n  {' '.join(cmd)}"
        ) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _compiler_version(cxx: str) -> str:
    try:
        out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def _compile(cxx: str, flags: list[str], out_dir: Path, stem: str, timeout: float) -> Path:
    """Compile the kernel into ``out_dir/stem.so`` and record its size and sha256 in
    ``stem.json``; each written to a temp file, fsynced and renamed, then the directory fsynced."""
    global _build_count
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{stem}.", suffix=".tmp")
    os.close(fd)
    try:
        cmd = [cxx, *flags, str(_SOURCE), "-o", tmp]
        t0 = time.perf_counter()
        res = _run(cmd, timeout)
        _info["build_seconds"] = time.perf_counter() - t0
        if res.returncode != 0:
            raise RuntimeError(
                f"regoptim: compiling the fused CPU kernel failed:\n  {' '.join(cmd)}\n"
                f"{res.stderr.strip()}"
            )
        _build_count += 1
        os.chmod(tmp, 0o755)  # a linker that recreates its output follows the umask (002: 0775)
        fsync(tmp)
        data = Path(tmp).read_bytes()
        target = out_dir / f"{stem}.so"
        os.replace(tmp, target)
        meta = {
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "flags": flags,
            "compiler": cxx,
            "compiler_version": _compiler_version(cxx),
        }
        write_atomic(out_dir / f"{stem}.json", json.dumps(meta, indent=1).encode())
        fsync(out_dir, directory=True)
        return target
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build_dirs() -> Iterator[Path]:
    """Private directories to build into: the cache dirs that are (or can be made) safe, then a
    fresh private temporary directory."""
    for directory in _cache_dirs():
        if make_private_dir(directory):
            yield directory
    try:
        yield Path(tempfile.mkdtemp(prefix="regoptim-"))  # mode 0700
    except OSError:
        return


# ---------------------------------------------------------------------------------------------
# Load: the variant built at install time, else a cached or compiled build


def prebuilt_variant() -> str | None:
    """The install-time variant for this CPU: chosen from the capability torch reports (which
    never exceeds what the CPU supports, and honours ``ATEN_CPU_CAPABILITY``)."""
    from regoptim.backends.cpu.capability import arch

    machine = arch()
    if machine is None:
        return None
    if machine == "x86_64":
        import torch

        cap = torch.backends.cpu.get_cpu_capability()
        return {"AVX512": "avx512", "AVX2": "avx2"}.get(cap, "baseline")
    return "baseline"


def prebuilt_path() -> Path | None:
    """The installed build of :func:`prebuilt_variant`, if the install made one
    (``REGOPTIM_NO_PREBUILT=1``: ignore it)."""
    variant = prebuilt_variant()
    if variant is None or os.environ.get("REGOPTIM_NO_PREBUILT") == "1":
        return None
    return prebuilt_path_for(variant)


def prebuilt_path_for(variant: str) -> Path | None:
    """The installed build of ``variant`` ("avx512", "avx2", "baseline"), if there is one."""
    here = Path(__file__).parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_fused_cpu_{variant}{suffix}"
        if path.is_file():
            return path
    return None


def _load_prebuilt() -> ctypes.CDLL | None:
    path = prebuilt_path()
    lib = _try_load(path) if path is not None else None
    if lib is not None:
        _info.update(source="prebuilt", path=str(path), variant=prebuilt_variant())
    return lib


def _try_load(path: Path) -> ctypes.CDLL | None:
    try:
        lib = ctypes.CDLL(str(path))
        if lib.regoptim_abi_version() != ABI_VERSION:
            return None
    except (OSError, AttributeError):
        return None
    return lib


def _load_cached(flag_sets: list[list[str]]) -> ctypes.CDLL | None:
    for path, meta, flags in _cached_builds(flag_sets):
        lib = _try_load(path)
        if lib is not None:
            _info.update(source="disk cache", path=str(path), flags=flags)
            _info["compiler"] = meta.get("compiler")
            return lib
    return None


def _load_or_build() -> ctypes.CDLL:
    lib = _load_prebuilt()
    if lib is not None:
        return lib
    cxx = _compiler()
    if cxx is None:  # a cached build needs no compiler
        lib = _load_cached(_FLAG_SETS)
        if lib is None:
            raise RuntimeError(_no_compiler_message())
        return lib
    timeout = _build_timeout()
    errors = []
    for flags in _FLAG_SETS:
        lib = _load_cached([flags])
        if lib is not None:
            return lib
        stem = _entry_name(flags)
        for directory in _build_dirs():
            try:
                path = _compile(cxx, flags, directory, stem, timeout)
            except _BuildTimeout:
                raise
            except RuntimeError as exc:
                errors.append(str(exc))
                break  # the flags, not the directory, failed
            except OSError as exc:  # directory not writable: try the next
                errors.append(f"{directory}: {exc}")
                continue
            lib = _try_load(path)
            if lib is not None:
                _info.update(source="compiled", path=str(path), flags=flags, compiler=cxx)
                return lib
            errors.append(f"{path}: built, but could not be loaded")
            break
    raise RuntimeError(
        "regoptim: could not build the fused CPU kernel (fused=True on CPU needs a C++ "
        "compiler, g++ or clang++, found via $CXX or PATH):\n" + "\n".join(errors)
    )


def load() -> ctypes.CDLL:
    """Return the loaded kernel library: a verified cached build, else compiled (once, then
    cached on disk)."""
    global _lib
    if _lib is not None:
        return _lib
    with _lock:
        if _lib is not None:
            return _lib
        t0 = time.perf_counter()
        lib = _load_or_build()
        declare(lib)
        _info["load_seconds"] = time.perf_counter() - t0
        _info["openmp"] = bool(lib.regoptim_has_openmp())
        _lib = lib
        return lib


def _no_compiler_message() -> str:
    return (
        "fused=True on CPU needs a C++ compiler (g++ or clang++ on PATH, or $CXX) to build "
        "regoptim's fused CPU kernel at first use; none was found and no cached build matches. "
        "Install one (e.g. `apt install g++`) or use fused=None (torch's kernels plus the "
        "regularizers' pass)."
    )


def available() -> str | None:
    """``None`` if the fused CPU kernel can run here, else a message saying what it needs.

    Cheap: checks for a loaded kernel, a C++ compiler, or else a verified cached build; the
    build happens at the first step.
    """
    if _lib is not None or prebuilt_path() is not None or _compiler() is not None:
        return None
    if next(_cached_builds(_FLAG_SETS), None) is not None:
        return None
    return _no_compiler_message()


def build_count() -> int:
    """How many times this process has compiled the kernel (0 when it came from the disk cache)."""
    return _build_count


def build_info() -> dict[str, object]:
    """Where the loaded kernel came from (``source``: "compiled" or "disk cache"), its path,
    flags and compiler, and the seconds spent compiling/loading it."""
    return dict(_info)

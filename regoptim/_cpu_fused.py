"""The fused CPU kernel behind ``fused=True`` on CPU tensors.

One pass over every tensor of a (dtype) group per step, every regularizer included, written in a
small C++ file (``regoptim/csrc/fused_cpu.cpp``, no torch headers) that is compiled at first use
with the system C++ compiler and loaded with :mod:`ctypes`:

* build cost does not depend on the model: the entry points take tables of data pointers and
  numels for the whole group, and every hyperparameter (lr, weight decay, l1, betas, ...) is a
  runtime scalar, so a scheduler or a hand-edited ``param_group`` never triggers a rebuild;
* the shared object is cached on disk, keyed by a hash of the source, the compiler and its flags
  and the host CPU, in ``$REGOPTIM_CACHE_DIR`` (else ``$XDG_CACHE_HOME/regoptim``, else
  ``~/.cache/regoptim``); a second process loads it in milliseconds;
* the work of all tensors is split evenly over ``torch.get_num_threads()`` OpenMP threads, so many
  small tensors cost no more than a few large ones.

Float32, bfloat16 and float16 storage, float32 math. With the regularizers torch's fused kernels
also have (coupled L2, no L1), float32 results are bitwise those of ``torch._fused_sgd_`` /
``torch._fused_adam_`` / ``torch._fused_adamw_``. Like torch's fused kernels, a ``grad_scale``
unscales the gradients in place.
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
from collections.abc import Sequence
from operator import attrgetter
from pathlib import Path

import torch
from torch import Tensor

from regoptim._guard import RoleKey, group_key, like_params, validate, validate_steps

__all__ = [
    "available",
    "build_count",
    "build_info",
    "fused_prox_adam_",
    "fused_prox_sgd_",
    "load",
]

_SOURCE = Path(__file__).with_name("csrc") / "fused_cpu.cpp"
_ABI_VERSION = 2

# Flags shared with fused_cpu.cpp (keep in sync).
_MAXIMIZE = 1
_HAS_SCALE = 2
_COUPLED_WD = 4
_L1 = 8
_MOMENTUM = 16
_FIRST_STEP = 32
_NESTEROV = 64
_AMSGRAD = 128

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_REAL_OF_COMPLEX = {torch.complex64: torch.float32}

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


# ---------------------------------------------------------------------------------------------
# Build, cache, load


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


# ---------------------------------------------------------------------------------------------
# Pointer tables


class _Table:
    """int64 table, one row per role: numels (real elements), then data pointers; ``key`` is the
    :func:`regoptim._guard.group_key` of the tensors it was built and checked for."""

    __slots__ = ("key", "n", "rows", "tensor")

    def __init__(self, key: list[RoleKey], rows: list[list[int]]) -> None:
        self.key = key
        self.n = len(rows[0])
        self.tensor = torch.tensor(rows, dtype=torch.int64)
        base = self.tensor.data_ptr()
        self.rows = [base + 8 * self.n * r for r in range(len(rows))]


class _Prepared:
    """What one call hands the kernel: a pointer table, plus contiguous stand-ins (copied back
    after the step) for tensors the kernel cannot address directly."""

    __slots__ = ("copies", "keep", "table")

    def __init__(
        self, table: _Table, copies: list[tuple[Tensor, Tensor]], keep: list[Tensor]
    ) -> None:
        self.table = table
        self.copies = copies  # (original, contiguous copy) to copy back
        self.keep = keep  # every stand-in, alive until the kernel has run

    def finish(self) -> None:
        for orig, copy in self.copies:
            orig.copy_(copy)


_tables: dict[tuple[str, int, int, int], _Table] = {}
_MAX_TABLES = 64
_CPU = torch.device("cpu")
_is_cpu = attrgetter("is_cpu")


def _prepare(
    where: str, names: list[str], lists: list[list[Tensor]], written: list[bool], n_shaped: int
) -> _Prepared:
    """Pointer table for ``lists`` (params first; every list of the same length; the lists
    after the first ``n_shaped`` are Adam's step counters), checked before the kernel sees it.

    The table is cached per call site (``where``) and group, and reused while the
    :func:`~regoptim._guard.group_key` of the tensors (pointers, sizes, strides, dtypes, conj/neg
    bits) is the one it was checked for; a role whose tensors moved (fresh grads) is re-pointed
    when it still matches the params. Anything else takes the full check, which raises naming
    the parameter index. Tensors that are not contiguous, or carry a conj/neg bit, get resolved
    contiguous copies (not cached) that ``finish()`` copies back into the ``written`` roles.
    """
    key = group_key(lists)
    slot = (where, len(lists), len(lists[0]), key[0][0][0])  # one entry per group of tensors
    hit = _tables.get(slot)
    if hit is not None and hit.key[0] == key[0]:
        changed = [r for r in range(len(lists)) if key[r] != hit.key[r]]
        if not changed:
            return _Prepared(hit, [], [])
        if _refresh(hit, lists, key, changed, n_shaped):
            return _Prepared(hit, [], [])
    params = lists[0]
    validate(where, names[:n_shaped], lists[:n_shaped], _CPU)
    for steps in lists[n_shaped:]:
        validate_steps(where, params, steps, _CPU)
    factor = 2 if params[0].is_complex() else 1
    copies: list[tuple[Tensor, Tensor]] = []
    keep: list[Tensor] = []
    # A non-contiguous param whose layout is dense (e.g. channels_last) is addressed directly
    # when every tensor of its index has the same strides: the update is elementwise, so any
    # common order of the elements will do. Otherwise non-contiguous tensors get contiguous
    # copies (the logical order of the contiguous ones).
    rows: list[list[int]] = [[p.numel() * factor for p in params]] + [[] for _ in lists]
    for i in range(len(params)):
        group = [lst[i] for lst in lists]
        shaped = group[:n_shaped]
        same = not any(map(_has_bit, shaped)) and (
            all(t.is_contiguous() for t in shaped) or _dense_same_layout(shaped)
        )
        for r, t in enumerate(group):
            if same or (t.is_contiguous() and not _has_bit(t)):
                rows[r + 1].append(t.data_ptr())
                continue
            c = t.resolve_conj().resolve_neg().contiguous()
            rows[r + 1].append(c.data_ptr())
            keep.append(c)
            if written[r]:
                copies.append((t, c))
    table = _Table(key, rows)
    if not keep:
        if len(_tables) >= _MAX_TABLES:
            _tables.clear()
        _tables[slot] = table
    return _Prepared(table, copies, keep)


def _has_bit(t: Tensor) -> bool:
    return t.is_conj() or t.is_neg()


def _dense_same_layout(tensors: list[Tensor]) -> bool:
    """All ``tensors`` have the first one's strides, and those strides lay its elements out
    densely without overlap (a permutation of a contiguous layout)."""
    first = tensors[0]
    strides = first.stride()
    if any(t.stride() != strides for t in tensors[1:]):
        return False
    dims = sorted((s, n) for s, n in zip(strides, first.shape, strict=True) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True


def _refresh(
    table: _Table,
    lists: list[list[Tensor]],
    key: list[RoleKey],
    changed: list[int],
    n_shaped: int,
) -> bool:
    """Re-point the rows of roles whose tensors moved (typically fresh grads every step) when
    they are CPU tensors with the params' sizes, strides and dtypes and no conj/neg bit (the
    cached table addresses every param directly, so such tensors line up with it); ``False``:
    rebuild from scratch, with the full check. The params are those the table was built for."""
    for r in changed:
        if r >= n_shaped or not like_params(key, r) or not all(map(_is_cpu, lists[r])):
            return False
    for r in changed:
        table.tensor[r + 1] = torch.tensor(key[r][0], dtype=torch.int64)
        table.key[r] = key[r]
    return True


_tail_width: int | None = None


def _torch_tail_width() -> int:
    """Vector width (float32 lanes) of torch's CPU kernels: the last ``numel % width`` elements
    of each tensor go through torch's scalar loop, whose float32 rounding the kernel mirrors
    there (0: no mirroring)."""
    global _tail_width
    if _tail_width is None:
        try:
            cap = torch.backends.cpu.get_cpu_capability()
        except (AttributeError, RuntimeError):  # pragma: no cover
            cap = ""
        _tail_width = {"AVX512": 16, "AVX2": 8}.get(cap, 0)
    return _tail_width


def _scalar(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _skip_step(found_inf: Tensor | None) -> bool:
    return found_inf is not None and float(found_inf.item()) != 0.0


def _check(params: Sequence[Tensor], others: Sequence[Sequence[Tensor] | None]) -> torch.dtype:
    """The storage dtype the kernel runs in (float32 for complex64); checks list lengths."""
    dtype = params[0].dtype
    real = _REAL_OF_COMPLEX.get(dtype, dtype)
    if real not in _DTYPE_CODE:
        raise TypeError(
            f"regoptim fused CPU kernel supports float32, bfloat16, float16 (and complex64) "
            f"parameters, got {dtype}"
        )
    for lst in others:
        if lst is not None and len(lst) != len(params):
            raise ValueError("regoptim fused CPU kernel: tensor lists of different lengths")
    return real


# ---------------------------------------------------------------------------------------------
# Public entry points


def fused_prox_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    *,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    l1: float,
    is_first_step: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One ProxSGD step over CPU tensors of one dtype (see :func:`regoptim._fused.fused_prox_sgd_`)."""
    if not params:
        return
    dtype = _check(params, [grads, momentum_buffers])
    if _skip_step(found_inf):
        return
    lib = load()
    lr_f = _scalar(lr)
    has_mom = momentum != 0.0
    if has_mom and momentum_buffers is None:
        raise ValueError("regoptim fused CPU kernel: momentum != 0 needs momentum_buffers")
    lists: list[list[Tensor]] = [list(params), list(grads)]
    if has_mom:
        lists.append(list(momentum_buffers))  # type: ignore[arg-type]
    complex_l1 = params[0].is_complex() and l1 != 0.0
    flags = 0
    if maximize:
        flags |= _MAXIMIZE
    if grad_scale is not None:
        flags |= _HAS_SCALE
    if weight_decay != 0.0 and not decoupled_weight_decay:
        flags |= _COUPLED_WD
    if l1 != 0.0 and not complex_l1:
        flags |= _L1
    if has_mom:
        flags |= _MOMENTUM
        if is_first_step:
            flags |= _FIRST_STEP
        if nesterov:
            flags |= _NESTEROV
    decay = 1.0 - lr_f * weight_decay if (weight_decay != 0.0 and decoupled_weight_decay) else 1.0

    names = ["param", "grad", "momentum_buffer"]
    written = [True, grad_scale is not None, True]
    prep = _prepare("ProxSGD fused step", names, lists, written, len(lists))
    rows = prep.table.rows
    lib.regoptim_sgd(
        _DTYPE_CODE[dtype],
        prep.table.n,
        rows[0],
        rows[1],
        rows[2],
        rows[3] if has_mom else None,
        lr_f,
        float(weight_decay),
        float(momentum),
        float(dampening),
        decay,
        lr_f * l1,
        _scalar(grad_scale) if grad_scale is not None else 1.0,
        flags,
        torch.get_num_threads(),
        _torch_tail_width(),
    )
    prep.finish()
    if complex_l1:
        # the modulus shrink couples real and imaginary parts: one extra pass per tensor
        from regoptim.prox import soft_threshold_

        for p in params:
            soft_threshold_(p, lr_f * l1)


def fused_prox_adam_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    amsgrad: bool,
    l1: float,
    maximize: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One ProxAdam/ProxAdamW step over CPU tensors of one dtype (see
    :func:`regoptim._fused.fused_prox_adam_`)."""
    if not params:
        return
    dtype = _check(params, [grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps])
    if params[0].is_complex() and l1 != 0.0:
        raise NotImplementedError(
            "regoptim fused CPU kernel: L1 on complex parameters with Adam (the modulus shrink "
            "couples the real and imaginary parts); use the torch path"
        )
    if _skip_step(found_inf):
        return
    lib = load()
    lr_f = _scalar(lr)
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("regoptim fused CPU kernel: amsgrad needs max_exp_avg_sqs")
    lists: list[list[Tensor]] = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)]
    if amsgrad:
        lists.append(list(max_exp_avg_sqs))  # type: ignore[arg-type]
    n_shaped = len(lists)
    lists.append(list(state_steps))
    flags = 0
    if maximize:
        flags |= _MAXIMIZE
    if grad_scale is not None:
        flags |= _HAS_SCALE
    if weight_decay != 0.0 and not decoupled_weight_decay:
        flags |= _COUPLED_WD
    if l1 != 0.0:
        flags |= _L1
    if amsgrad:
        flags |= _AMSGRAD
    decay = 1.0 - lr_f * weight_decay if (weight_decay != 0.0 and decoupled_weight_decay) else 1.0

    names = ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    written = [True, grad_scale is not None, True, True, True][:n_shaped] + [True]
    prep = _prepare("ProxAdam fused step", names, lists, written, n_shaped)
    rows = prep.table.rows
    lib.regoptim_adam(
        _DTYPE_CODE[dtype],
        prep.table.n,
        rows[0],
        rows[1],
        rows[2],
        rows[3],
        rows[4],
        rows[5] if amsgrad else None,
        rows[-1],
        lr_f,
        float(beta1),
        float(beta2),
        float(eps),
        float(weight_decay),
        decay,
        lr_f * l1,
        _scalar(grad_scale) if grad_scale is not None else 1.0,
        flags,
        torch.get_num_threads(),
        _torch_tail_width(),
    )
    prep.finish()


if sys.platform == "win32":  # pragma: no cover
    _BASE_FLAGS = [f for f in _BASE_FLAGS if f != "-fPIC"]

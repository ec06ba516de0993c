"""Triton helpers shared by the kernels (``@triton.jit``, inlined into them).

They mirror ``regoptim.regularizers.l1`` (soft-threshold, complex modulus shrink) and address the
multi-tensor launch plan built in ``_common``.
"""

# Triton reads parameter annotations as kernel types, so jit functions are left unannotated.
# ruff: noqa: ANN001, ANN202

from __future__ import annotations

import types
from typing import Any

import triton.language as tl

__all__ = [
    "DualJIT",
    "block_offsets",
    "dual_jit",
    "complex_shrink",
    "group_offsets",
    "group_part",
    "to_storage",
    "block_max",
    "block_min",
    "block_sum",
    "load_scalar",
    "one_minus_pow",
    "pair_mean",
    "soft_threshold",
    "tensor_ptr",
]


class DualJIT:
    """A ``@triton.jit`` function that runs compiled on CUDA and interpreted on CPU tensors.

    ``triton.jit`` picks compiled or interpreted once, from ``TRITON_INTERPRET`` at decoration
    time, for the whole process. regoptim chooses per call (the dispatcher reads the variable on
    every step, and a process may hold CPU and CUDA parameters), so each kernel and helper keeps
    both variants, built on first use: a ``JITFunction`` and an ``InterpretedFunction`` of the same
    source, each seeing its own variant of the helpers it calls (a copy of the module globals with
    every ``DualJIT`` it names replaced by that variant).
    """

    def __init__(self, fn: types.FunctionType, **options: Any) -> None:
        self.fn = fn
        self.options = options
        self._variants: dict[bool, Any] = {}
        self.__name__ = fn.__name__
        self.__doc__ = fn.__doc__

    def variant(self, interpret: bool) -> Any:
        """The ``InterpretedFunction`` (``interpret=True``) or the ``JITFunction``."""
        found = self._variants.get(interpret)
        if found is None:
            from triton.runtime.interpreter import InterpretedFunction
            from triton.runtime.jit import JITFunction

            fn = self.fn
            scope = dict(fn.__globals__)
            for name in _global_names(fn.__code__):  # what it calls (each variant: its own)
                if isinstance(scope.get(name), DualJIT):
                    scope[name] = scope[name].variant(interpret)
            copy = types.FunctionType(
                fn.__code__, scope, fn.__name__, fn.__defaults__, fn.__closure__
            )
            copy.__kwdefaults__ = fn.__kwdefaults__
            copy.__annotations__ = dict(fn.__annotations__)
            copy.__qualname__ = fn.__qualname__
            copy.__module__ = fn.__module__
            copy.__doc__ = fn.__doc__
            cls = InterpretedFunction if interpret else JITFunction
            found = self._variants[interpret] = cls(copy, **self.options)
        return found

    def for_device(self, device_type: str) -> Any:
        """The variant that serves tensors on ``device_type`` (CPU: interpreted, CUDA: compiled)."""
        if device_type == "cpu":
            return self.variant(True)
        if device_type == "cuda":
            return self.variant(False)
        raise RuntimeError(f"regoptim's Triton kernels do not run on device type '{device_type}'")


def _global_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _global_names(const)
    return names


def dual_jit(fn: types.FunctionType | None = None, **options: Any) -> Any:
    """``@dual_jit`` / ``@dual_jit(**triton_jit_options)``: a :class:`DualJIT`."""
    if fn is None:
        return lambda f: DualJIT(f, **options)
    return DualJIT(fn, **options)


@dual_jit
def block_offsets(
    numels,
    block_tensor,
    block_start,
    found_inf_ptr,
    HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """(tensor index, int64 element offsets, mask) of this program's block.

    Where ``found_inf != 0`` the mask is all false: nothing is read or written. ``ALIGNED``: the
    launcher checked that every numel is a multiple of 8 (and every base pointer of 16 bytes), so
    the mask is constant over aligned runs of 8 and loads/stores can be vectorised.
    """
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.multiple_of(tl.load(block_start + pid), BLOCK)  # block starts are k * BLOCK
    n = tl.load(numels + t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    if ALIGNED:
        mask = tl.max_constancy(mask, 8)
    if HAS_FOUND_INF:
        # a `where`, not `mask & scalar`: Triton 3.9's interpreter cannot `&` a scalar into a block
        mask = tl.where(tl.load(found_inf_ptr) == 0, mask, False)
    return t, offs, mask


@dual_jit
def tensor_ptr(table, t, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Base pointer of tensor ``t`` of a list, from its int64 ``data_ptr`` table.

    ``ALIGNED``: the launcher checked it is a multiple of 16 bytes (a loaded pointer carries no
    alignment information otherwise, and every access would be scalar). Measured on the generated
    code only (no GPU to time it): sm_90 PTX from Triton 3.9 has ``ld.global.b32`` per element
    without the hints and ``ld.global.v4.b32`` with them.
    """
    ptr = tl.load(table + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@dual_jit
def load_scalar(ptr):
    """A 1-element device tensor (lr, grad_scale), in float32."""
    return tl.load(ptr).to(tl.float32)


@dual_jit
def soft_threshold(x, t):
    """``regoptim.regularizers.l1.soft_threshold`` for real ``x``: ``x - clamp(x, -t, t)``.

    An exact zero where ``|x| <= t``, one rounding of ``x -/+ t`` elsewhere; NaN propagates.
    """
    return x - tl.clamp(x, -t, t, propagate_nan=tl.PropagateNan.ALL)


@dual_jit
def complex_shrink(x, t, BLOCK: tl.constexpr):
    """Complex soft-threshold on the real view ``x`` (re, im interleaved): modulus shrink.

    ``t`` is a scalar or one threshold per complex entry (``BLOCK // 2``). Mirrors
    ``regoptim.regularizers.l1._complex_shrink``: 0 where ``|z| <= t``, ``z * (1 - t/|z|)`` elsewhere.
    """
    re, im = tl.split(tl.reshape(x, (BLOCK // 2, 2)))
    mod = tl.sqrt_rn(re * re + im * im)
    zero = mod <= t
    scale = tl.where(zero, 0.0, 1.0 - t / tl.where(zero, 1.0, mod))
    return tl.reshape(tl.join(re * scale, im * scale), (BLOCK,))


@dual_jit
def pair_mean(x, BLOCK: tl.constexpr):
    """Mean of each (re, im) pair of the real view ``x``: ``BLOCK // 2`` values."""
    re, im = tl.split(tl.reshape(x, (BLOCK // 2, 2)))
    return (re + im) * 0.5


@dual_jit
def one_minus_pow(log_beta, step):
    """``1 - beta**step`` in float32, given ``log_beta = ln(beta)`` (host double, beta in [0, 1)).

    ``1 - exp(y)`` with ``y = step * ln(beta)`` cancels badly for small ``|y|`` (beta2 = 0.999 at
    step 1 would lose ~4 digits), so it is ``-expm1(y)``: a degree-6 Taylor polynomial where
    ``|y| < 0.1`` (truncation < 0.1**6 / 5040 = 2e-10 relative) and ``1 - exp(y)`` beyond (then
    ``exp(y) < 0.905``: at most a 10x amplification of exp's error).
    """
    y = step * log_beta
    ys = tl.maximum(y, -0.1)
    taylor = -ys * (
        1.0 + ys * (0.5 + ys * (1.0 / 6.0 + ys * (1.0 / 24.0 + ys * (1.0 / 120.0 + ys / 720.0))))
    )
    direct = 1.0 - tl.exp(tl.minimum(y, -0.1))
    return tl.where(y > -0.1, taylor, direct)


@dual_jit
def group_part(outers, inners, j, group, n_groups, WIDE: tl.constexpr):
    """``(count, inner, slice_stride, first)`` of group ``group``'s part of tensor ``j``.

    Tensor ``j``, addressed flat, is ``(outer, n_groups, inner)`` (``outers``/``inners``: int64
    tables); the group's part is its ``count = outer * inner`` elements
    ``o * slice_stride + first + k`` (``o < outer``, ``k < inner``,
    ``slice_stride = n_groups * inner``, ``first = group * inner``, both int64, ``group`` int64):
    rows (``outer = 1``), columns (``inner = 1``) and conv filters alike. ``count`` and ``inner``
    are int32 unless ``WIDE`` (the launcher checked every part's count + BLOCK fits in int32), so
    the per-element division in :func:`group_offsets` is 32-bit (int64 division is a long
    software sequence on GPUs).
    """
    inner = tl.load(inners + j)
    count = tl.load(outers + j) * inner
    slice_stride = n_groups * inner
    first = group * inner
    if not WIDE:
        inner = inner.to(tl.int32)
        count = count.to(tl.int32)
    return count, inner, slice_stride, first


@dual_jit
def group_offsets(start, lanes, count, inner, slice_stride, first):
    """(int64 offsets, mask) of elements ``start + lanes`` of a group's part of one tensor
    (:func:`group_part`); the offsets are int64 whatever the index type."""
    e = start + lanes
    mask = e < count
    o = e // inner
    return o.to(tl.int64) * slice_stride + first + (e - o * inner), mask


# Reductions, without tl.standard: ``tl.sum``, ``tl.zeros`` and the other tl.standard helpers
# are ``triton.jit`` functions, interpreted for the whole process when TRITON_INTERPRET=1 was set
# at import (then no kernel calling them compiles for CUDA), and Triton 3.9's interpreter patches
# triton.language.core for each such nested call without restoring it (every later compilation in
# the process fails). So blocks are reduced with ``tl.reduce`` (a builtin) and a combine function
# that is our own JITFunction when compiled and tl.standard's when interpreted: the interpreter
# recognises tl.standard's combine functions and reduces with numpy (sum, nanmin, nanmax) without
# calling them.


class _Combine(DualJIT):
    """A combine function for ``tl.reduce``: ``fn`` compiled, ``tl.standard.<name>`` interpreted."""

    def __init__(self, fn: types.FunctionType, standard: str) -> None:
        super().__init__(fn)
        self.standard = standard

    def variant(self, interpret: bool) -> Any:
        if interpret:
            return getattr(tl.standard, self.standard)
        return super().variant(False)


def _add(a, b):
    return a + b


def _min(a, b):
    return tl.minimum(a, b)


def _max(a, b):
    return tl.maximum(a, b)


_add_combine = _Combine(_add, "_sum_combine")
_min_combine = _Combine(_min, "_elementwise_min")
_max_combine = _Combine(_max, "_elementwise_max")


@dual_jit
def block_sum(x):
    """Sum of a 1-D block (a tree reduction, in the block's dtype)."""
    return tl.reduce(x, 0, _add_combine)


@dual_jit
def block_min(x):
    """Minimum of a 1-D block (NaN ignored where another value is present)."""
    return tl.reduce(x, 0, _min_combine)


@dual_jit
def block_max(x):
    """Maximum of a 1-D block (NaN ignored where another value is present)."""
    return tl.reduce(x, 0, _max_combine)


class _PerVariant(DualJIT):
    """A helper whose compiled and interpreted variants have different bodies."""

    def __init__(self, compiled: types.FunctionType, interpreted: types.FunctionType) -> None:
        super().__init__(compiled)
        self.interpreted = DualJIT(interpreted)

    def variant(self, interpret: bool) -> Any:
        if interpret:
            return self.interpreted.variant(True)
        return super().variant(False)


def _to_storage_compiled(x, DTYPE: tl.constexpr):
    return x.to(DTYPE)  # cvt.rn: round to nearest even


def _to_storage_interpreted(x, DTYPE: tl.constexpr):
    # Triton 3.9's interpreter truncates float32 -> bfloat16 (toward zero), a GPU rounds to
    # nearest even: round the float32 bits here first (exactly representable afterwards, so the
    # truncation is exact); NaN kept as it is
    if tl.bfloat16 == DTYPE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16) << 16
        x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(DTYPE)


# ``x`` (float32) in the storage dtype, rounded to nearest even on both variants (what the
# compiled kernels do; the interpreter's own float32 -> bfloat16 conversion truncates)
to_storage = _PerVariant(_to_storage_compiled, _to_storage_interpreted)

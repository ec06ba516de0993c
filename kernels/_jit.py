"""Triton helpers shared by the two kernels (``@triton.jit``, inlined into them).

They mirror ``regoptim.prox`` (soft-threshold, complex modulus shrink) and address the
multi-tensor launch plan built in ``_common``.
"""

# Triton reads parameter annotations as kernel types, so jit functions are left unannotated.
# ruff: noqa: ANN001, ANN202

from __future__ import annotations

import triton
import triton.language as tl

__all__ = [
    "block_offsets",
    "complex_shrink",
    "load_scalar",
    "one_minus_pow",
    "pair_mean",
    "soft_threshold",
    "tensor_ptr",
]


@triton.jit
def block_offsets(
    numels,
    block_tensor,
    block_start,
    found_inf_ptr,
    HAS_FOUND_INF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """(tensor index, int64 element offsets, mask) of this program's block.

    Where ``found_inf != 0`` the mask is all false: nothing is read or written.
    """
    pid = tl.program_id(0)
    t = tl.load(block_tensor + pid)
    start = tl.load(block_start + pid)
    n = tl.load(numels + t)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    if HAS_FOUND_INF:
        # a `where`, not `mask & scalar`: Triton 3.9's interpreter cannot `&` a scalar into a block
        mask = tl.where(tl.load(found_inf_ptr) == 0, mask, False)
    return t, offs, mask


@triton.jit
def tensor_ptr(table, t, DTYPE: tl.constexpr):
    """Base pointer of tensor ``t`` of a list, from its int64 ``data_ptr`` table."""
    return tl.load(table + t).to(tl.pointer_type(DTYPE))


@triton.jit
def load_scalar(ptr):
    """A 1-element device tensor (lr, grad_scale), in float32."""
    return tl.load(ptr).to(tl.float32)


@triton.jit
def soft_threshold(x, t):
    """``regoptim.prox.soft_threshold`` for real ``x``: ``x - clamp(x, -t, t)``.

    An exact zero where ``|x| <= t``, one rounding of ``x -/+ t`` elsewhere; NaN propagates.
    """
    return x - tl.clamp(x, -t, t, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def complex_shrink(x, t, BLOCK: tl.constexpr):
    """Complex soft-threshold on the real view ``x`` (re, im interleaved): modulus shrink.

    ``t`` is a scalar or one threshold per complex entry (``BLOCK // 2``). Mirrors
    ``regoptim.prox._complex_shrink``: 0 where ``|z| <= t``, ``z * (1 - t/|z|)`` elsewhere.
    """
    re, im = tl.split(tl.reshape(x, (BLOCK // 2, 2)))
    mod = tl.sqrt_rn(re * re + im * im)
    zero = mod <= t
    scale = tl.where(zero, 0.0, 1.0 - t / tl.where(zero, 1.0, mod))
    return tl.reshape(tl.join(re * scale, im * scale), (BLOCK,))


@triton.jit
def pair_mean(x, BLOCK: tl.constexpr):
    """Mean of each (re, im) pair of the real view ``x``: ``BLOCK // 2`` values."""
    re, im = tl.split(tl.reshape(x, (BLOCK // 2, 2)))
    return (re + im) * 0.5


@triton.jit
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

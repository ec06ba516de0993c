r"""Pure proximal operators.

Each operator is a small function with one job, tested on its own (property tests in
``tests/test_prox.py``). The torch path calls them; the Triton kernels and the fused CPU kernel
mirror them line for line.

Soft-thresholding is the proximal operator of :math:`t\,\|x\|_1`:

.. math::
    \operatorname{prox}_{t\|\cdot\|_1}(x) = \operatorname{sign}(x)\,\max(|x| - t,\ 0)

For complex ``x`` the penalty is :math:`t \sum_i |x_i|` on the modulus, whose prox keeps the phase
and shrinks the modulus: :math:`x \max(1 - t / |x|,\ 0)` (and 0 at ``x = 0``).

The real case is computed as ``x - clamp(x, -t, t)``, which is exactly
``sign(x) * max(|x| - t, 0)`` in floating point: where ``|x| <= t`` it is ``x - x = 0`` (an exact
zero), elsewhere it is the single rounding of ``x -/+ t``, and rounding is monotonic so the sign can
never flip. NaN propagates (a NaN parameter stays NaN instead of being silently zeroed).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["soft_threshold", "soft_threshold_"]


def _check_threshold(threshold: float | Tensor) -> None:
    if isinstance(threshold, Tensor):
        if threshold.is_complex():
            raise TypeError("soft_threshold: threshold must be real, got a complex tensor")
    elif not threshold >= 0.0:  # also rejects NaN
        raise ValueError(f"soft_threshold: threshold must be >= 0, got {threshold}")


def soft_threshold(x: Tensor, threshold: float | Tensor) -> Tensor:
    """Return ``sign(x) * max(|x| - threshold, 0)`` (modulus shrink for complex ``x``).

    Args:
        x: input tensor (real or complex).
        threshold: non-negative scalar, or a real tensor broadcastable to ``x`` (a per-element
            threshold, as ProxAdam uses).
    """
    _check_threshold(threshold)
    if x.is_complex():
        return _complex_shrink(x, threshold)
    if isinstance(threshold, Tensor):
        return x - torch.clamp(x, -threshold, threshold)
    if threshold == 0.0:
        return x.clone()
    return x - x.clamp(-threshold, threshold)


def soft_threshold_(x: Tensor, threshold: float | Tensor) -> Tensor:
    """In-place :func:`soft_threshold`; returns ``x``."""
    _check_threshold(threshold)
    if x.is_complex():
        return x.copy_(_complex_shrink(x, threshold))
    if isinstance(threshold, Tensor):
        return x.sub_(torch.clamp(x, -threshold, threshold))
    if threshold == 0.0:
        return x
    return x.sub_(x.clamp(-threshold, threshold))


def _complex_shrink(x: Tensor, threshold: float | Tensor) -> Tensor:
    mod = x.abs()
    # `mod <= t` is False for NaN, so a NaN entry stays NaN; where `mod > t`, mod > 0 and the
    # division is safe.
    shrunk = x * (1 - threshold / mod)
    return torch.where(mod <= threshold, torch.zeros((), dtype=x.dtype, device=x.device), shrunk)

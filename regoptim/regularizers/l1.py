r"""L1: the proximal operator of :math:`t\,\|x\|_1` and its eager passes.

The regularizer's forms, found together:

* math: step 5 of :class:`regoptim.ProxSGD` and of :class:`regoptim.ProxAdam` (in Adam's metric);
* float64 reference: :func:`regoptim.reference.soft_threshold_ref` (in ``sgd_step``/``adam_step``);
* pure operators and eager torch passes: here;
* C++: ``soft_threshold`` in ``regoptim/backends/cpu/csrc/fused_cpu.cpp``; Triton: ``soft_threshold`` and
  ``complex_shrink`` in ``kernels/_jit.py``.

Soft-thresholding is the proximal operator of :math:`t\,\|x\|_1`:

.. math::
    \operatorname{prox}_{t\|\cdot\|_1}(x) = \operatorname{sign}(x)\,\max(|x| - t,\ 0)

For complex ``x`` the penalty is :math:`t \sum_i |x_i|` on the modulus, whose prox keeps the phase
and shrinks the modulus: :math:`x \max(1 - t / |x|,\ 0)` (and 0 at ``x = 0``).

The real case is computed as ``x - clamp(x, -t, t)``, which is exactly
``sign(x) * max(|x| - t, 0)`` in floating point: where ``|x| <= t`` it is ``x - x = 0`` (an exact
zero), elsewhere it is the single rounding of ``x -/+ t``, and rounding is monotonic so the sign can
never flip. NaN propagates (a NaN parameter stays NaN instead of being silently zeroed).

The passes (:func:`prox_l1_`, :func:`adam_prox_l1_`) follow torch.optim's own functional SGD/Adam
on the eager paths. With ``differentiable=True`` they run out of place so autograd can follow
them; with ``on_device_step`` (capturable) they never read a tensor on the host.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from regoptim.optimizer import group_tensors, on_device
from regoptim.regularizers.metric import bias_correction2_sqrt

__all__ = ["adam_prox_l1_", "prox_l1_", "soft_threshold", "soft_threshold_"]


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


def prox_l1_(
    params: list[Tensor],
    lr: float | Tensor,
    l1: float,
    *,
    foreach: bool,
    differentiable: bool = False,
) -> None:
    """Soft-threshold every parameter by ``lr * l1`` (ProxSGD's step 5)."""
    threshold = lr * l1
    if differentiable:
        # out of place from a clone, which clamp keeps for the backward pass
        for p in params:
            p.copy_(soft_threshold(p.clone(), on_device(threshold, p.device)))
        return
    real = [p for p in params if not p.is_complex()]
    for p in params:
        if p.is_complex():
            soft_threshold_(p, on_device(threshold, p.device))
    if foreach and real and not isinstance(threshold, Tensor):
        for (device, dtype), ((dps,), _) in group_tensors([real]):  # type: ignore[list-item]
            if device.type == "cpu" and _softshrink_is_prox(dtype):
                # one pass per tensor instead of three foreach passes and a temporary
                for p in dps:
                    _softshrink(p, threshold, out=p)  # type: ignore[misc]
                continue
            # p - clamp(p, -t, t): soft-thresholding with exact zeros (see soft_threshold)
            clamped = torch._foreach_clamp_min(dps, -threshold)  # type: ignore[arg-type]
            torch._foreach_clamp_max_(clamped, threshold)
            torch._foreach_sub_(dps, clamped)  # type: ignore[arg-type]
    else:
        for p in real:
            soft_threshold_(p, on_device(threshold, p.device))


# aten's softshrink with an ``out=`` argument (the public functional API has none)
_softshrink = getattr(torch._C._nn, "softshrink", None)


@functools.cache
def _softshrink_is_prox(dtype: torch.dtype) -> bool:
    """Whether ``aten.softshrink(x, t, out=x)`` on CPU is exactly ``x - clamp(x, -t, t)`` for ``dtype``.

    It is one pass where the clamp form is three foreach passes and a temporary, but torch before
    2.6 maps NaN to 0 (pytorch#138385), which the prox must not do. Checked once per dtype, on an
    input long enough for both the vectorized body and the scalar tail; limited to float32 and
    float64, where both forms round the threshold to the tensor's dtype alike.
    """
    if _softshrink is None or dtype not in (torch.float32, torch.float64):
        return False
    vals = [math.nan, math.inf, -math.inf, 0.0, -0.0, 0.5, -0.5, 0.25, -0.25, 1.0, -1.0, 3.0]
    x = torch.tensor(vals * 6, dtype=dtype)
    try:
        y = torch.empty_like(x)
        _softshrink(x, 0.5, out=y)
    except (RuntimeError, TypeError):
        return False
    ref = x - x.clamp(-0.5, 0.5)
    return bool(
        torch.equal(y.isnan(), ref.isnan()) and torch.equal(y.nan_to_num(), ref.nan_to_num())
    )


def adam_prox_l1_(
    params: list[Tensor],
    second_moments: list[Tensor],
    state_steps: list[Tensor],
    *,
    lr: float | Tensor,
    beta2: float,
    eps: float,
    l1: float,
    foreach: bool,
    on_device_step: bool = False,
    differentiable: bool = False,
) -> None:
    """Soft-threshold each weight by ``lr * l1 / d`` with ``d = sqrt(v) / sqrt(1 - beta2^t) + eps``.

    ``on_device_step`` (capturable, differentiable): the bias correction in tensor arithmetic on
    the step's device, never read on the host. ``differentiable``: out of place, so autograd can
    follow it.
    """
    bc2_sqrt = bias_correction2_sqrt(beta2, state_steps, on_device_step)
    if differentiable:
        for i, p in enumerate(params):
            v = second_moments[i]
            if p.is_complex():
                d = (torch.view_as_real(v).sqrt() / bc2_sqrt[i] + eps).mean(dim=-1)
            else:
                d = v.sqrt() / bc2_sqrt[i] + eps
            # p <- p - clamp(p, -t, t) from a clone, which clamp keeps for the backward pass
            p.copy_(soft_threshold(p.clone(), on_device(lr, p.device) * l1 / d))
        return
    real = [i for i, p in enumerate(params) if not p.is_complex()]
    if foreach and real and not isinstance(lr, Tensor):
        lists = (
            [params[i] for i in real],
            [second_moments[i] for i in real],
            [bc2_sqrt[i] for i in real],
        )
        if all(params[i].device.type == "cpu" for i in real):
            # CPU: a chain of whole-list foreach ops streams every tensor through memory at each
            # op; cache-sized blocks keep the temporaries (and p, v) in cache between ops.
            for block in _cache_blocks(*lists, _PROX_BLOCK_NUMEL):
                _foreach_adam_prox_(*block, lr * l1, eps)
        else:
            _foreach_adam_prox_(*lists, lr * l1, eps)
        done = set(real)
    else:
        done = set()
    for i, p in enumerate(params):
        if i in done:
            continue
        v = second_moments[i]
        if p.is_complex():
            d = (torch.view_as_real(v).sqrt() / bc2_sqrt[i]).add_(eps).mean(dim=-1)
        else:
            d = (v.sqrt() / bc2_sqrt[i]).add_(eps)
        threshold = d.reciprocal_().mul_(on_device(lr, p.device) * l1)
        soft_threshold_(p, threshold)


# Elements per block of the CPU prox pass: p, v and two temporaries of this size (4 MiB in float32)
# stay in L2/L3 from one foreach op to the next.
_PROX_BLOCK_NUMEL = 256 * 1024


def _foreach_adam_prox_(
    ps: list[Tensor], vs: list[Tensor], bc2_sqrt: list[Any], lr_l1: float, eps: float
) -> None:
    """``p -= clamp(p, -t, t)`` with ``t = lr_l1 / (sqrt(v) / bc2_sqrt + eps)``, foreach."""
    denom = torch._foreach_sqrt(vs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_reciprocal_(denom)
    torch._foreach_mul_(denom, lr_l1)  # the threshold t = lr * l1 / d
    clamped = torch._foreach_minimum(ps, denom)
    torch._foreach_neg_(denom)
    torch._foreach_maximum_(clamped, denom)
    torch._foreach_sub_(ps, clamped)


def _cache_blocks(
    ps: list[Tensor], vs: list[Tensor], bc2_sqrt: list[Any], numel: int
) -> Iterator[tuple[list[Tensor], list[Tensor], list[Any]]]:
    """Split the lists into blocks of about ``numel`` elements; a larger tensor is cut into flat
    chunks when it and its ``v`` are contiguous (elementwise ops do not care where a chunk ends)."""
    bp: list[Tensor] = []
    bv: list[Tensor] = []
    bb: list[Any] = []
    n = 0
    for p, v, b in zip(ps, vs, bc2_sqrt, strict=True):
        m = p.numel()
        if m > numel and p.is_contiguous() and v.is_contiguous():
            pf, vf = p.view(-1), v.view(-1)
            pieces = [(pf[s : s + numel], vf[s : s + numel]) for s in range(0, m, numel)]
        else:
            pieces = [(p, v)]
        for pp, vv in pieces:
            bp.append(pp)
            bv.append(vv)
            bb.append(b)
            n += pp.numel()
            if n >= numel:
                yield bp, bv, bb
                bp, bv, bb, n = [], [], [], 0
    if bp:
        yield bp, bv, bb

"""The regularizers' passes on the eager (torch) paths: decoupled decay and the L1 prox.

torch.optim's own functional SGD/Adam do the optimizer's update; these passes add what it lacks,
before it (decoupled decay) or after it (the prox). Each mirrors :mod:`regoptim.prox` and the fused
kernels. With ``differentiable=True`` they run out of place so autograd can follow them; with
``on_device_step`` (capturable) they never read a tensor on the host.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from regoptim.optimizer import group_tensors, on_device
from regoptim.prox import soft_threshold, soft_threshold_

__all__ = ["adam_prox_l1_", "decay_", "prox_l1_"]


def decay_(params: list[Tensor], lr: float | Tensor, weight_decay: float, *, foreach: bool) -> None:
    """``p <- p * (1 - lr * weight_decay)`` (decoupled decay)."""
    factor = 1 - lr * weight_decay
    if foreach:
        for (device, _), ((dps,), _) in group_tensors([params]):
            torch._foreach_mul_(dps, on_device(factor, device))  # type: ignore[arg-type]
    else:
        for p in params:
            p.mul_(factor)


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
            # p - clamp(p, -t, t): soft-thresholding with exact zeros (see regoptim.prox)
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
    bc2_sqrt = _bias_correction2_sqrt(beta2, state_steps, on_device_step)
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


def _bias_correction2_sqrt(
    beta2: float | Tensor, state_steps: list[Tensor], on_device_step: bool
) -> list[Any]:
    """``sqrt(1 - beta2^t)`` per parameter: a float, or a 0-d tensor that is never read on the host
    (capturable, differentiable, and under torch.compile, where ``.item()`` breaks the graph)."""
    if torch.compiler.is_compiling():
        # the step tensor in float64, as float(s) is in eager
        return [(1 - beta2 ** s.double()) ** 0.5 for s in state_steps]
    if on_device_step:
        return [(1 - beta2**s).sqrt() for s in state_steps]
    return [float((1 - beta2 ** float(s)) ** 0.5) for s in state_steps]


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

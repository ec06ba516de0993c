r"""Group lasso: the param-group keys ``group_l1`` / ``group_axes``, their prox and its eager form.

In a param group with ``group_l1 = λ > 0``, slice ``i`` of every parameter along its group axis
(``group_axes``, default 0 for each) belongs to group ``i``, so one group can span several tensors
(a neuron's weight row and its bias entry; a conv filter and its BatchNorm entries). The penalty
is :math:`\lambda \sum_i \|x_{g_i}\|_2`, unweighted. After each step (and after the L1 prox) the
optimizers apply its exact proximal operator in the metric of their step:

* ProxSGD (metric :math:`I/\gamma`): block soft-thresholding,
  :math:`x_g \leftarrow x_g \max(0,\ 1 - \gamma\lambda / \|x_g\|)`, and a zero group stays 0.
* ProxAdam/ProxAdamW (metric :math:`\operatorname{diag}(d)/\gamma`, with :math:`d` the update's
  own denominator): :math:`x = \operatorname{argmin}_x \lambda\|x\| + \sum_i d_i (x_i - z_i)^2 /
  (2\gamma)` with :math:`z` the step's result after the L1 prox (the L1 prox composes first,
  coordinate-wise). The group is exactly zero iff :math:`\|d \odot z\| \le \gamma\lambda`; else
  :math:`x_i = d_i z_i \rho / (d_i \rho + \gamma\lambda)` with :math:`\rho = \|x\| > 0` the root of
  :math:`\sum_i (d_i z_i / (d_i\rho + \gamma\lambda))^2 = 1` in :math:`(0, \|z\|)`, found per group
  (vectorised over the groups) by Newton's method on
  :math:`\psi(\rho) = h(\rho)^{-1/2} - 1`, :math:`h(\rho) = \sum_i (d_i z_i/(d_i\rho+\gamma\lambda))^2`,
  inside a bisection bracket, starting from the bracket's left end (a proven lower bound of the
  root, see ``_solve_rho``); with equal :math:`d_i` that start is the root.

The float64 transcription is :func:`regoptim.reference.group_prox_ref`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from regoptim.optimizer import on_device, validate_non_negative
from regoptim.regularizers.metric import bias_correction2_sqrt

__all__ = ["group_prox_diag_", "group_soft_threshold_", "resolve_group_axes"]

# Newton iterations at most (each a handful of passes over the group's elements). Converging to
# 4 ulps of the accumulation dtype took at most 7 on 2000 groups of 50 with d spread as
# exp(s N(0,1)), s up to 12 (clamped to [1e-8, 1e8]), and c from 1e-9 to 0.999999 of the median
# ||d z||, in float32 and float64; with equal d it takes 1.
MAX_ITERS = 100
# Iterations run without host checks (capturable, differentiable, torch.compile, which unrolls
# them): measured, not proven, to reach the converged value (tests/test_group_prox.py)
FIXED_ITERS = 30


def validate_group_lasso(group: dict[str, Any]) -> None:
    """The rules of ``group_l1`` and ``group_axes`` for one param group (or the defaults)."""
    validate_non_negative(group["group_l1"], "group_l1")
    axes = group["group_axes"]
    if axes is not None and not (
        isinstance(axes, (list, tuple))
        and all(isinstance(a, int) and not isinstance(a, bool) for a in axes)
    ):
        raise TypeError(
            f"Invalid group_axes: expected None or a list of ints (one per parameter), got {axes!r}"
        )
    params = group.get("params")  # the defaults have none
    if params is not None and (group["group_l1"] != 0 or axes is not None):
        resolve_group_axes(params, axes)


def resolve_group_axes(params: Sequence[Tensor], axes: Sequence[int] | None) -> list[int]:
    """The group axis of each parameter, normalised to ``>= 0``; raises on any mismatch."""
    if axes is None:
        axes = [0] * len(params)
    if len(axes) != len(params):
        raise ValueError(
            f"Invalid group_axes: {len(axes)} axes for {len(params)} parameters ({list(axes)!r}); "
            "give one axis per parameter"
        )
    out = []
    for i, (p, axis) in enumerate(zip(params, axes, strict=True)):
        if p.ndim == 0:
            raise ValueError(
                f"Invalid group_axes: params[{i}] is 0-d and cannot be grouped; put it in a param "
                "group without group_l1"
            )
        if not -p.ndim <= axis < p.ndim:
            raise ValueError(
                f"Invalid group_axes[{i}]: {axis} is out of range for params[{i}] of shape "
                f"{tuple(p.shape)}"
            )
        if p.is_complex():
            raise ValueError(
                f"Invalid params[{i}] for group_l1: complex parameters ({p.dtype}) are not "
                "supported by the group prox"
            )
        out.append(axis % p.ndim)
    sizes = [p.shape[a] for p, a in zip(params, out, strict=True)]
    if len(set(sizes)) > 1:
        listed = ", ".join(
            f"params[{i}]: {n} along axis {a}"
            for i, (n, a) in enumerate(zip(sizes, out, strict=True))
        )
        raise ValueError(
            "Invalid group_axes: every parameter of a param group with group lasso needs the same "
            f"size along its group axis (one slice per group); got {listed}"
        )
    return out


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    # bfloat16/float16 accumulate in float32, as the update itself does
    return torch.float64 if dtype == torch.float64 else torch.float32


def _group_acc_dtype(tensors: Sequence[Tensor]) -> torch.dtype:
    """float64 if any tensor of the group is, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _rows(t: Tensor, axis: int, dtype: torch.dtype) -> Tensor:
    """``t`` as an (groups, elements per group) matrix in ``dtype``."""
    n = t.shape[axis]
    return t.movedim(axis, 0).reshape(n, t.numel() // n if n else 0).to(dtype)


def _along(v: Tensor, t: Tensor, axis: int) -> Tensor:
    """A per-group vector shaped to broadcast along ``axis`` of ``t``."""
    shape = [1] * t.ndim
    shape[axis] = -1
    return v.view(shape)


def group_soft_threshold_(
    tensors: Sequence[Tensor],
    axes: Sequence[int],
    threshold: float | Tensor,
    *,
    differentiable: bool = False,
) -> None:
    """``x_g <- x_g * max(0, 1 - threshold / ||x_g||)`` for each group, in place.

    ``||x_g||`` is over the group's slices in every tensor. A zero group stays exactly 0 (no NaN);
    NaN propagates. ``differentiable``: out of place from a clone, so autograd can follow it.
    """
    if not tensors or tensors[0].shape[axes[0]] == 0:
        return
    acc = _group_acc_dtype(tensors)
    # differentiable: from clones, which the norm keeps for the backward pass
    src = [t.clone() for t in tensors] if differentiable else tensors
    sq = sum(_rows(t, a, acc).square().sum(dim=1) for t, a in zip(src, axes, strict=True))
    norm = sq.sqrt()  # type: ignore[union-attr]
    # 1 - t/0 = -inf -> 0: a zero group stays zero
    scale = (1 - on_device(threshold, norm.device) / norm).clamp_min(0)
    # a zero group stays zero at threshold 0 too (lr = 0: 0/0), while a NaN norm keeps NaN
    scale = torch.where(norm == 0, 0.0, scale)
    for t, s, a in zip(tensors, src, axes, strict=True):
        if differentiable:
            t.copy_(s * _along(scale, t, a))
        else:
            t.mul_(_along(scale, t, a))


def group_prox_diag_(
    tensors: Sequence[Tensor],
    denominators: Sequence[Tensor],
    axes: Sequence[int],
    threshold: float | Tensor,
    *,
    host_checks: bool = True,
) -> None:
    r"""The group prox in the metric ``diag(d)``, in place: for each group,
    ``x = argmin lr*λ ||x|| + sum_i d_i (x_i - z_i)^2 / 2`` with ``threshold = lr*λ``.

    ``host_checks``: stop Newton's iterations once every group has converged (reads a flag on the
    host each iteration; at most :data:`MAX_ITERS`); without them (capturable, differentiable,
    torch.compile) :data:`FIXED_ITERS` iterations run.
    """
    if not tensors or tensors[0].shape[axes[0]] == 0:
        return
    acc = _group_acc_dtype(tensors)
    c = on_device(threshold, tensors[0].device)
    n = tensors[0].shape[axes[0]]
    moved = [t.movedim(a, 0) for t, a in zip(tensors, axes, strict=True)]
    d_moved = [v.movedim(a, 0) for v, a in zip(denominators, axes, strict=True)]
    sizes = [m[0].numel() for m in moved]  # elements of each tensor per group
    # CPU: blocks of whole groups of about _BLOCK_NUMEL elements, whose temporaries stay in cache
    # and come back from the allocator warm (whole-tensor temporaries cost more in page faults
    # than in arithmetic); elsewhere all groups at once
    rows = n
    if tensors[0].device.type == "cpu" and not torch.compiler.is_compiling():
        rows = max(1, _BLOCK_NUMEL // max(sum(sizes), 1))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        z = torch.cat(
            [m[r0:r1].reshape(r1 - r0, k).to(acc) for m, k in zip(moved, sizes, strict=True)], dim=1
        )
        d = torch.cat(
            [m[r0:r1].reshape(r1 - r0, k).to(acc) for m, k in zip(d_moved, sizes, strict=True)],
            dim=1,
        )
        a = d * z
        alive = torch.linalg.vector_norm(a, dim=1) > c  # else the group is exactly zero
        rho = _solve_rho(a, d, c, alive, torch.linalg.vector_norm(z, dim=1), host_checks)
        dr = d * rho[:, None]
        # rho = 0: an exact zero group (and no 0/0 when c = 0 too, lr = 0)
        x = z * torch.where(dr > 0, dr / (dr + c), 0.0)
        start = 0
        for m, k in zip(moved, sizes, strict=True):
            block = m[r0:r1]
            # computed out of place, so autograd can follow it (differentiable)
            block.copy_(x[:, start : start + k].reshape(block.shape))
            start += k


# Elements per block of the CPU group prox (4 MiB of float32 temporaries at most per buffer)
_BLOCK_NUMEL = 256 * 1024


def _solve_rho(
    a: Tensor, d: Tensor, c: Any, alive: Tensor, hi: Tensor, host_checks: bool
) -> Tensor:
    """The root of ``h(rho) = sum_i (a_i / (d_i rho + c))^2 = 1`` per alive group (0 elsewhere).

    Newton on ``psi = h^(-1/2) - 1`` (increasing in rho) from the bracket's left end; a step that
    leaves the bracket [lo, hi] is replaced by bisection. The bracket (``hi = ||z||`` given, with
    ``z = a / d``): ``h >= ||a||^2 / (d_max rho + c)^2`` and ``h >= sum z_i^2 / (rho + c/d_min)^2``
    put the root at or right of ``(||a|| - c) / d_max`` and of ``||z|| - c / d_min``;
    ``h <= ||a||^2 / (d_min rho + c)^2`` and ``h(||z||) < 1`` put it at or left of
    ``(||a|| - c) / d_min`` and ``||z||``. Starting close matters when c is small against the
    group (a weak group_l1): from 0 Newton then needs some 20 iterations, from here a few.
    """
    tol = 4 * torch.finfo(a.dtype).eps
    a2 = a.square()
    norm_a = a2.sum(dim=1).sqrt()
    d_min, d_max = d.amin(dim=1), d.amax(dim=1)
    lo = torch.maximum((hi - c / d_min).clamp_min(0), (norm_a - c) / d_max)
    hi = torch.minimum(hi, (norm_a - c) / d_min)
    lo = torch.where(alive, lo, 0.0)  # a dead group may have made a 0/0 here
    rho = lo
    a2d = a2 * d
    for _ in range(MAX_ITERS if host_checks else FIXED_ITERS):
        r = 1 / (d * rho[:, None] + c)
        r2 = r * r
        h = _rowdot(a2, r2)  # sum_i a_i^2 / (d_i rho + c)^2
        s3 = _rowdot(a2d, r2 * r)  # sum_i a_i^2 d_i / (d_i rho + c)^3 = -h'/2
        below = h > 1  # rho is left of the root
        lo = torch.where(below, rho, lo)
        hi = torch.where(below, hi, rho)
        step = h * (h.sqrt() - 1) / torch.where(alive, s3, 1.0)
        new = rho + step
        new = torch.where((new >= lo) & (new <= hi), new, (lo + hi) / 2)
        new = torch.where(alive, new, 0.0)
        done = ((new - rho).abs() <= tol * new) | ~alive
        rho = new
        if host_checks and bool(done.all()):
            break
    return rho


def _rowdot(x: Tensor, y: Tensor) -> Tensor:
    return torch.linalg.vecdot(x, y, dim=1)


def adam_denominators(
    params: Sequence[Tensor],
    state: Any,
    *,
    beta2: Any,
    eps: float,
    amsgrad: bool,
    on_device_step: bool,
) -> list[Tensor]:
    """``d = sqrt(v_hat) / sqrt(1 - beta2^t) + eps`` of each parameter's last update (the running
    max of ``v`` under amsgrad); ``eps`` everywhere for a parameter that has no state yet (Adam's
    initial ``v = 0``)."""
    with_state = [i for i, p in enumerate(params) if "step" in state.get(p, {})]
    steps = [state[params[i]]["step"] for i in with_state]
    bc2 = dict(zip(with_state, bias_correction2_sqrt(beta2, steps, on_device_step), strict=True))
    out = []
    for i, p in enumerate(params):
        if i not in bc2:
            out.append(torch.full_like(p, eps, dtype=_acc_dtype(p.dtype)))
            continue
        st = state[p]
        v = st["max_exp_avg_sq"] if amsgrad and "max_exp_avg_sq" in st else st["exp_avg_sq"]
        out.append(v.to(_acc_dtype(p.dtype)).sqrt() / bc2[i] + eps)
    return out


def apply_group_prox_(optimizer: Any, group: dict[str, Any], *, adam: bool) -> None:
    """The group prox of one param group after its step, over all its parameters (those without a
    gradient this step included: their values are part of their groups' norms). Nothing happens
    when no parameter had a gradient (no step) or when AMP skipped the step (``found_inf``)."""
    params = group["params"]
    if group["group_l1"] == 0 or all(p.grad is None for p in params):
        return
    found_inf = getattr(optimizer, "found_inf", None)
    if found_inf is not None and bool(found_inf.item()):  # fused=True under a GradScaler
        return
    axes = resolve_group_axes(params, group["group_axes"])
    threshold = group["lr"] * group["group_l1"]
    differentiable = group["differentiable"]
    with torch.set_grad_enabled(differentiable):
        if not adam:
            group_soft_threshold_(params, axes, threshold, differentiable=differentiable)
            return
        on_device_step = group["capturable"] or differentiable
        ds = adam_denominators(
            params,
            optimizer.state,
            beta2=group["betas"][1],
            eps=group["eps"],
            amsgrad=group["amsgrad"],
            on_device_step=on_device_step,
        )
        group_prox_diag_(
            params,
            ds,
            axes,
            threshold,
            host_checks=not (on_device_step or torch.compiler.is_compiling()),
        )

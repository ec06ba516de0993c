r"""Float64 reference transcriptions of the algorithms in the optimizers' docstrings.

One parameter at a time, one line per line of the docstring's algorithm block, in float64
(complex128 for complex parameters). Never optimised: this is what the torch path, the Triton
kernels and the fused CPU kernel are tested against.

State is a plain dict with torch's keys, holding float64 tensors:
``momentum_buffer`` (SGD); ``step`` (a Python int), ``exp_avg``, ``exp_avg_sq``,
``max_exp_avg_sq`` (Adam).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["adam_denominator_ref", "adam_step", "group_prox_ref", "sgd_step", "soft_threshold_ref"]


def _f64(t: Tensor) -> Tensor:
    return t.detach().to(torch.complex128 if t.is_complex() else torch.float64).clone()


def soft_threshold_ref(x: Tensor, t: float | Tensor) -> Tensor:
    """``sign(x) * max(|x| - t, 0)``; for complex ``x``: ``x * max(1 - t/|x|, 0)``, 0 at x = 0."""
    if x.is_complex():
        mod = x.abs()
        t = torch.as_tensor(t, dtype=torch.float64)
        scale = torch.where(mod > t, 1 - t / torch.where(mod > 0, mod, 1.0), 0.0)
        return x * scale
    return torch.sign(x) * torch.clamp(x.abs() - t, min=0.0)


def sgd_step(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    decoupled_weight_decay: bool = False,
    l1: float = 0.0,
    maximize: bool = False,
    decay_scaling: str = "lr",
    initial_lr: float | None = None,
) -> Tensor:
    """One ProxSGD step on one parameter; returns the new parameter (float64), updates ``state``.

    ``decay_scaling`` (decoupled decay only): the decay factor is ``1 - lr * wd`` ("lr"),
    ``1 - wd * lr / initial_lr`` ("schedule") or ``1 - wd`` ("none")."""
    p = _f64(param)
    g = _f64(grad)
    if maximize:
        g = -g
    # 1. coupled L2
    if weight_decay != 0 and not decoupled_weight_decay:
        g = g + weight_decay * p
    # 2. momentum, exactly torch's
    if momentum != 0:
        if "momentum_buffer" not in state or state["momentum_buffer"] is None:
            b = g.clone()
        else:
            b = momentum * state["momentum_buffer"] + (1 - dampening) * g
        state["momentum_buffer"] = b
        g = g + momentum * b if nesterov else b
    # 3. decoupled decay
    if weight_decay != 0 and decoupled_weight_decay:
        p = p * decay_factor(lr, weight_decay, decay_scaling, initial_lr)
    # 4. gradient step
    p = p - lr * g
    # 5. proximal L1
    if l1 != 0:
        p = soft_threshold_ref(p, lr * l1)
    return p


def decay_factor(lr: float, weight_decay: float, scaling: str, initial_lr: float | None) -> float:
    """The decoupled decay's multiplier for ``decay_scaling``: ``1 - lr*wd`` (torch's, "lr"),
    ``1 - wd*lr/initial_lr`` ("schedule": the decay follows the lr schedule's shape, not its
    scale) or ``1 - wd`` ("none": independent of lr)."""
    if scaling == "lr":
        return 1 - lr * weight_decay
    if scaling == "schedule":
        assert initial_lr is not None and initial_lr > 0
        return 1 - weight_decay * lr / initial_lr
    if scaling == "none":
        return 1 - weight_decay
    raise ValueError(f"unknown decay_scaling {scaling!r}")


def adam_step(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    amsgrad: bool = False,
    decoupled_weight_decay: bool = False,
    l1: float = 0.0,
    maximize: bool = False,
    decay_scaling: str = "lr",
    initial_lr: float | None = None,
) -> Tensor:
    """One ProxAdam/ProxAdamW step on one parameter; returns the new parameter, updates ``state``.

    ``decay_scaling`` as in :func:`sgd_step`.

    Complex parameters follow torch: the moments are kept per real/imaginary component
    (``view_as_real``). The L1 prox of a complex entry shrinks its modulus with the threshold
    ``lr * l1 / d``, where ``d`` is the mean of the two components' denominators.
    """
    beta1, beta2 = betas
    p = _f64(param)
    g = _f64(grad)
    if maximize:
        g = -g
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)
        state["exp_avg_sq"] = torch.zeros_like(p)
        if amsgrad:
            state["max_exp_avg_sq"] = torch.zeros_like(p)
    state["step"] += 1
    t = state["step"]
    # 1. coupled L2 / 3. decoupled decay (before the update, as torch.optim.AdamW)
    if weight_decay != 0:
        if decoupled_weight_decay:
            p = p * decay_factor(lr, weight_decay, decay_scaling, initial_lr)
        else:
            g = g + weight_decay * p
    complex_param = p.is_complex()
    # moments per real component, as torch
    pr = torch.view_as_real(p) if complex_param else p
    gr = torch.view_as_real(g) if complex_param else g
    m = _as_real(state["exp_avg"])
    v = _as_real(state["exp_avg_sq"])
    m = beta1 * m + (1 - beta1) * gr
    v = beta2 * v + (1 - beta2) * gr * gr
    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    if amsgrad:
        vmax = torch.maximum(_as_real(state["max_exp_avg_sq"]), v)
        state["max_exp_avg_sq"] = _as_like(vmax, complex_param)
        v_used = vmax
    else:
        v_used = v
    d = torch.sqrt(v_used) / math.sqrt(bias_correction2) + eps
    pr = pr - (lr / bias_correction1) * m / d
    state["exp_avg"] = _as_like(m, complex_param)
    state["exp_avg_sq"] = _as_like(v, complex_param)
    # 5. proximal L1 in Adam's metric: threshold lr * l1 / d
    if complex_param:
        p = torch.view_as_complex(pr.contiguous())
        if l1 != 0:
            p = soft_threshold_ref(p, lr * l1 / d.mean(dim=-1))
    else:
        p = pr
        if l1 != 0:
            p = soft_threshold_ref(p, lr * l1 / d)
    return p


def _as_real(t: Tensor) -> Tensor:
    return torch.view_as_real(t) if t.is_complex() else t


def _as_like(t: Tensor, complex_param: bool) -> Tensor:
    return torch.view_as_complex(t.contiguous()) if complex_param else t


def adam_denominator_ref(
    state: dict[str, Any], *, betas: tuple[float, float], eps: float, amsgrad: bool
) -> Tensor:
    """``d_t = sqrt(v_hat_t) / sqrt(1 - beta2^t) + eps`` from a reference state after its step."""
    v = state["max_exp_avg_sq"] if amsgrad else state["exp_avg_sq"]
    return torch.sqrt(v) / math.sqrt(1 - betas[1] ** state["step"]) + eps


def group_prox_ref(
    params: list[Tensor],
    axes: list[int],
    *,
    lr: float,
    group_l1: float,
    denominators: list[Tensor] | None = None,
) -> list[Tensor]:
    """Group lasso's step 6 for one param group, one group at a time, in float64.

    Slice ``i`` of ``params[j]`` along ``axes[j]`` is part of group ``i``. Without
    ``denominators`` (ProxSGD): ``x_g * max(0, 1 - lr*group_l1 / ||x_g||)``. With them (ProxAdam,
    ``d`` per element): ``x = argmin_x lr*group_l1*||x|| + sum_i d_i (x_i - z_i)^2 / 2``, which is
    0 iff ``||d * z|| <= lr*group_l1``, else ``x_i = d_i z_i rho / (d_i rho + lr*group_l1)`` with
    ``rho`` the root of ``sum_i (d_i z_i / (d_i rho + lr*group_l1))^2 = 1`` in ``(0, ||z||]``
    (decreasing in rho), found here by 200 bisections.
    """
    c = lr * group_l1
    zs = [_f64(p) for p in params]
    ds = (
        [torch.ones_like(z) for z in zs]
        if denominators is None
        else [_f64(d) for d in denominators]
    )
    outs = [z.clone() for z in zs]
    n = zs[0].shape[axes[0]]
    for i in range(n):
        z = torch.cat([zz.select(a, i).reshape(-1) for zz, a in zip(zs, axes, strict=True)])
        d = torch.cat([dd.select(a, i).reshape(-1) for dd, a in zip(ds, axes, strict=True)])
        if denominators is None:
            norm = float(torch.linalg.vector_norm(z))
            x = z * max(0.0, 1 - c / norm) if norm > 0 else torch.zeros_like(z)
        elif float(torch.linalg.vector_norm(d * z)) <= c:
            x = torch.zeros_like(z)
        else:
            lo, hi = 0.0, float(torch.linalg.vector_norm(z))
            for _ in range(200):
                mid = (lo + hi) / 2
                if float(((d * z / (d * mid + c)) ** 2).sum()) > 1:
                    lo = mid
                else:
                    hi = mid
            rho = (lo + hi) / 2
            x = d * z * rho / (d * rho + c)
        start = 0
        for out, a in zip(outs, axes, strict=True):
            sl = out.select(a, i)
            m = sl.numel()
            sl.copy_(x[start : start + m].reshape(sl.shape))
            start += m
    return outs

"""Each family's per-element update as one ``@triton.jit`` device function (inlined).

The plain kernels (``_sgd``, ``_adam``) and the group-lasso kernels (``_group_sgd``,
``_group_adam``) call the same function, then do their own regularizer's part: the plain kernels
store, the group kernels store and run the group prox over what they stored. The functions take
and return float32 values; the caller loads and stores (in the param dtype, with its own rounding)
and so keeps its own addressing (block map or group parts).

Each is the whole step before the group prox: ``g`` unscaled (``/ grad_scale``) and negated
(``maximize``) first, the family's recurrence, decoupled decay, the step, the L1 prox. A state the
step does not read (the momentum buffer on the first step, ``vmax`` without amsgrad) is passed as
any block of the right shape (the caller's ``g`` or ``v``) and ignored.
"""

# Triton reads parameter annotations as kernel types, so jit functions are left unannotated.
# ruff: noqa: ANN001, ANN202

from __future__ import annotations

import triton.language as tl

from ._jit import complex_shrink, dual_jit, load_scalar, pair_mean, soft_threshold

__all__ = ["adam_update", "sgd_update"]


@dual_jit
def sgd_update(
    p,
    g,
    b,
    lr,
    weight_decay,
    momentum,
    dampening,
    l1,
    grad_scale_ptr,
    BLOCK: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    NESTEROV: tl.constexpr,
    HAS_L1: tl.constexpr,
    COMPLEX: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
):
    """ProxSGD: ``(p, b)`` after the step, from the param ``p``, grad ``g`` and buffer ``b``.

    1. coupled L2: ``g += wd * p``
    2. momentum: ``b = g`` (first step) or ``b = mu * b + (1 - dampening) * g``;
       ``g = g + mu * b`` (nesterov) or ``g = b``
    3. decoupled decay: ``p *= 1 - lr * wd``
    4. ``p -= lr * g``
    5. proximal L1: ``p = soft_threshold(p, lr * l1)`` (modulus shrink for complex params)

    The returned ``b`` is the new buffer under ``HAS_MOMENTUM`` (to be stored), else meaningless.
    """
    if HAS_GRAD_SCALE:
        g = g / load_scalar(grad_scale_ptr)
    if MAXIMIZE:
        g = -g
    # 1. coupled L2
    if HAS_WD and not DECOUPLED:
        g = g + weight_decay * p
    # 2. momentum (torch's recurrence; the caller stores the buffer in the param dtype)
    if HAS_MOMENTUM:
        b = g if FIRST_STEP else momentum * b + (1.0 - dampening) * g
        g = g + momentum * b if NESTEROV else b
    # 3. decoupled decay
    if HAS_WD and DECOUPLED:
        p = p * (1.0 - lr * weight_decay)
    # 4. gradient step
    p = p - lr * g
    # 5. proximal L1
    if HAS_L1:
        p = complex_shrink(p, lr * l1, BLOCK) if COMPLEX else soft_threshold(p, lr * l1)
    return p, b


@dual_jit
def adam_update(
    p,
    g,
    m,
    v,
    vmax,
    lr,
    beta2,
    one_minus_beta1,
    one_minus_beta2,
    bias_correction1,
    bias_correction2_sqrt,
    eps,
    weight_decay,
    l1,
    grad_scale_ptr,
    BLOCK: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    HAS_L1: tl.constexpr,
    COMPLEX: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
):
    """ProxAdam/ProxAdamW: ``(p, m, v, vmax)`` after the step.

    ``bias_correction1 = 1 - b1**step``, ``bias_correction2_sqrt = sqrt(1 - b2**step)`` (the
    tensor's incremented step). The returned ``vmax`` is the denominator's moment: the running max
    under ``AMSGRAD`` (to be stored), the new ``v`` otherwise.

    1. weight decay: ``p *= 1 - lr * wd`` (decoupled) or ``g += wd * p`` (coupled)
    2. ``m = m + (1 - b1) * (g - m)``, ``v = b2 * v + (1 - b2) * g * g``; amsgrad:
       ``vmax = max(vmax, v)``
    3. ``d = sqrt(vmax) / bias_correction2_sqrt + eps``; ``p -= lr / bias_correction1 * m / d``
    4. proximal L1 in Adam's metric: ``p = soft_threshold(p, lr * l1 / d)`` (complex params:
       modulus shrink with the mean of the two components' ``d``)
    """
    if HAS_GRAD_SCALE:
        g = g / load_scalar(grad_scale_ptr)
    if MAXIMIZE:
        g = -g
    # 1. weight decay, before the moments (as torch.optim.Adam/AdamW)
    if HAS_WD:
        if DECOUPLED:
            p = p * (1.0 - lr * weight_decay)
        else:
            g = g + weight_decay * p
    # 2. moments (m: torch's lerp form)
    m = m + one_minus_beta1 * (g - m)
    v = beta2 * v + one_minus_beta2 * g * g
    vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL) if AMSGRAD else v
    # 3. the preconditioned step
    d = tl.div_rn(tl.sqrt_rn(vmax), bias_correction2_sqrt) + eps
    p = p - tl.div_rn(lr, bias_correction1) * tl.div_rn(m, d)
    # 4. proximal L1 in Adam's metric
    if HAS_L1:
        if COMPLEX:
            p = complex_shrink(p, tl.div_rn(lr * l1, pair_mean(d, BLOCK)), BLOCK)
        else:
            p = soft_threshold(p, tl.div_rn(lr * l1, d))
    return p, m, v, vmax

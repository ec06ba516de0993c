"""The ProxAdam/ProxAdamW family in one Triton kernel, launched at most twice per group.

Per element, in float32 registers: ``_update.adam_update`` (unscale and maximize, weight decay,
the moments, amsgrad's max, the preconditioned step, the L1 prox in Adam's metric), shared with
the group-lasso kernel; ``step`` (already incremented) is read from its device tensor for the bias
corrections.

``p``, ``m``, ``v`` (and ``vmax``) are read once and written once, in the param dtype.
"""

# Triton reads parameter annotations as kernel types, so the jit kernel is left unannotated.
# ruff: noqa: ANN001, ANN202

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from regoptim.hyper import AdamHyper

from ._common import (
    BLOCK,
    check_lists,
    flatten_group,
    launch_plan,
    log_beta,
    lr_args,
    scalar_arg,
    triton_dtype,
)
from ._jit import block_offsets, dual_jit, load_scalar, one_minus_pow, tensor_ptr
from ._update import adam_update

__all__ = ["fused_prox_adam_"]


# The 1-element tensors are read once per program: alignment specialisation buys nothing there and
# would compile a second variant for an lr that is a view (e.g. one entry of a schedule tensor).
@dual_jit(do_not_specialize_on_alignment=["lr_ptr", "grad_scale_ptr", "found_inf_ptr"])
def _prox_adam_kernel(
    param_ptrs,
    grad_ptrs,
    exp_avg_ptrs,
    exp_avg_sq_ptrs,
    max_exp_avg_sq_ptrs,
    step_ptrs,
    numels,
    block_tensor,
    block_start,
    lr_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    lr: tl.float32,
    beta2: tl.float32,
    one_minus_beta1: tl.float32,
    one_minus_beta2: tl.float32,
    log_beta1: tl.float32,
    log_beta2: tl.float32,
    eps: tl.float32,
    weight_decay: tl.float32,
    l1: tl.float32,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    HAS_L1: tl.constexpr,
    COMPLEX: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
):
    t, offs, mask = block_offsets(
        numels, block_tensor, block_start, found_inf_ptr, HAS_FOUND_INF, BLOCK, ALIGNED
    )
    if LR_IS_TENSOR:
        lr = load_scalar(lr_ptr)
    step = tl.load(tensor_ptr(step_ptrs, t, tl.float32, False))
    bias_correction1 = one_minus_pow(log_beta1, step)
    bias_correction2_sqrt = tl.sqrt_rn(one_minus_pow(log_beta2, step))

    p_ptrs = tensor_ptr(param_ptrs, t, DTYPE, ALIGNED) + offs
    m_ptrs = tensor_ptr(exp_avg_ptrs, t, DTYPE, ALIGNED) + offs
    v_ptrs = tensor_ptr(exp_avg_sq_ptrs, t, DTYPE, ALIGNED) + offs
    p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(tensor_ptr(grad_ptrs, t, DTYPE, ALIGNED) + offs, mask=mask, other=0.0).to(
        tl.float32
    )
    m = tl.load(m_ptrs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_ptrs, mask=mask, other=0.0).to(tl.float32)
    vmax = v  # not read without amsgrad
    if AMSGRAD:
        vmax_ptrs = tensor_ptr(max_exp_avg_sq_ptrs, t, DTYPE, ALIGNED) + offs
        vmax = tl.load(vmax_ptrs, mask=mask, other=0.0).to(tl.float32)
    p, m, v, vmax = adam_update(
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
        BLOCK,
        MAXIMIZE,
        HAS_WD,
        DECOUPLED,
        AMSGRAD,
        HAS_L1,
        COMPLEX,
        HAS_GRAD_SCALE,
    )
    tl.store(m_ptrs, m.to(DTYPE), mask=mask)
    tl.store(v_ptrs, v.to(DTYPE), mask=mask)
    if AMSGRAD:
        tl.store(vmax_ptrs, vmax.to(DTYPE), mask=mask)
    tl.store(p_ptrs, p.to(DTYPE), mask=mask)


def _launch_prox_adam(
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
    """Increment the steps, build (or fetch) the tables, run :func:`_prox_adam_kernel` once."""
    if not params:
        return
    device = params[0].device
    kernel = _prox_adam_kernel.for_device(device.type)  # compiled on CUDA, interpreted on CPU
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad needs max_exp_avg_sqs")
    check_lists(
        "ProxAdam fused step",
        params,
        state_steps,
        grad=grads,
        exp_avg=exp_avgs,
        exp_avg_sq=exp_avg_sqs,
        max_exp_avg_sq=max_exp_avg_sqs if amsgrad else None,
    )
    dtype = triton_dtype(params[0].dtype)
    lr_value, lr_tensor = lr_args(lr, device)
    grad_scale = scalar_arg(grad_scale, "grad_scale", device)
    found_inf = scalar_arg(found_inf, "found_inf", device)

    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    flat = flatten_group(lists, mutated=[True, False, True, True, True])  # type: ignore[list-item]
    # torch's fused-Adam protocol: +1 on the device, and -found_inf after the kernel, so a
    # skipped step leaves the count untouched without reading found_inf on the host.
    torch._foreach_add_(state_steps, 1)
    if flat.kept:
        steps = [state_steps[i] for i in flat.kept]
        plan = launch_plan(flat.lists, device, scalars=[steps])
        tables = plan.tables
        for launch in plan.launches:  # the vectorised (aligned) tensors, then the rest
            kernel[(launch.n_blocks,)](
                tables[0],
                tables[1],
                tables[2],
                tables[3],
                tables[4] if amsgrad else None,
                tables[-1],
                plan.numels,
                launch.block_tensor,
                launch.block_start,
                lr_tensor,
                grad_scale,
                found_inf,
                lr_value,
                float(beta2),
                1.0 - float(beta1),
                1.0 - float(beta2),
                log_beta(float(beta1)),
                log_beta(float(beta2)),
                float(eps),
                float(weight_decay),
                float(l1),
                DTYPE=dtype,
                BLOCK=BLOCK,
                ALIGNED=launch.aligned,
                MAXIMIZE=bool(maximize),
                HAS_WD=weight_decay != 0,
                DECOUPLED=bool(decoupled_weight_decay),
                AMSGRAD=bool(amsgrad),
                HAS_L1=l1 != 0,
                COMPLEX=params[0].is_complex(),
                LR_IS_TENSOR=lr_tensor is not None,
                HAS_GRAD_SCALE=grad_scale is not None,
                HAS_FOUND_INF=found_inf is not None,
                # FMA contraction on, as nvcc's default for torch's own CUDA kernels (explicit: Triton 3.9
                # warns when it is left to its changing default)
                enable_fp_fusion=True,
            )
        flat.finish()
    if found_inf is not None:
        torch._foreach_sub_(state_steps, [found_inf] * len(state_steps))


@torch.library.custom_op(
    "regoptim::fused_prox_adam_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
)
def _fused_prox_adam_op(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    lr: float,
    lr_tensor: Tensor | None,
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
    # custom-op schemas have no `list[Tensor] | None` and no `float | Tensor`: max_exp_avg_sqs is
    # empty unless amsgrad, lr_tensor (when given) overrides lr.
    _launch_prox_adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs if amsgrad else None,
        state_steps,
        lr=lr if lr_tensor is None else lr_tensor,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        amsgrad=amsgrad,
        l1=l1,
        maximize=maximize,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


def fused_prox_adam_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    state_steps: list[Tensor],
    hyper: AdamHyper,
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One ProxAdam/ProxAdamW step for tensors of one device and dtype, in at most two launches.

    See ``regoptim.backends.dispatch.fused_prox_adam_`` for the contract. Runs as the custom op
    ``torch.ops.regoptim.fused_prox_adam_`` so ``torch.compile`` can trace a step that calls it.
    """
    if not params:
        return
    h = hyper
    with torch.no_grad():
        _fused_prox_adam_op(
            list(params),
            list(grads),
            list(exp_avgs),
            list(exp_avg_sqs),
            list(max_exp_avg_sqs) if h.amsgrad and max_exp_avg_sqs is not None else [],
            list(state_steps),
            0.0 if isinstance(h.lr, Tensor) else float(h.lr),
            h.lr if isinstance(h.lr, Tensor) else None,
            float(h.beta1),
            float(h.beta2),
            float(h.eps),
            float(h.weight_decay),
            bool(h.decoupled_weight_decay),
            bool(h.amsgrad),
            float(h.l1),
            bool(h.maximize),
            grad_scale,
            found_inf,
        )

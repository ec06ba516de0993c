"""ProxSGD with group lasso in one Triton launch per param group: one program per group.

Program ``i`` owns group ``i`` (slice ``i`` along its axis of every tensor, ``_group`` tables it):

1. for each tensor, for each block of the group's part of it: the elementwise ProxSGD step,
   ``_update.sgd_update`` as ``_sgd`` (unscale, maximize, coupled L2, momentum, decoupled decay,
   gradient step, L1 prox),
   storing ``p`` and the momentum buffer in the param dtype, and adding the stored ``p``'s
   squares to a float32 accumulator (what the eager group prox reads back: the same rounding);
2. ``scale = max(0, 1 - lr * group_l1 / ||x_g||)`` (0 for a zero group, NaN for a NaN one);
3. for each tensor, the group's part re-read (its own writes, from L2 on a GPU) and scaled.

Launches per step: one, for any number of tensors (grid: the number of groups).
"""

# Triton reads parameter annotations as kernel types, so the jit kernel is left unannotated.
# ruff: noqa: ANN001, ANN202

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from regoptim.hyper import GroupLasso, SgdHyper

from ._common import check_lists, lr_args, scalar_arg, triton_dtype
from ._group import check_group_axes, group_plan, reject_complex
from ._jit import (
    block_sum,
    dual_jit,
    group_offsets,
    group_part,
    load_scalar,
    tensor_ptr,
    to_storage,
)
from ._update import sgd_update

__all__ = ["fused_group_sgd_"]


@dual_jit(do_not_specialize_on_alignment=["lr_ptr", "grad_scale_ptr", "found_inf_ptr"])
def _group_sgd_kernel(
    param_ptrs,
    grad_ptrs,
    buf_ptrs,
    outers,
    inners,
    n_tensors,
    n_groups,
    lr_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    lr: tl.float32,
    weight_decay: tl.float32,
    momentum: tl.float32,
    dampening: tl.float32,
    l1: tl.float32,
    group_l1: tl.float32,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    WIDE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    NESTEROV: tl.constexpr,
    HAS_L1: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    if LR_IS_TENSOR:
        lr = load_scalar(lr_ptr)
    n_t = n_tensors
    if HAS_FOUND_INF:  # a skipped step loops over no tensor: nothing is read or written
        n_t = tl.where(tl.load(found_inf_ptr) == 0, n_tensors, 0)
    lanes = tl.arange(0, BLOCK)
    sumsq = tl.full([BLOCK], 0.0, tl.float32)
    # 1. the elementwise step, and the group's sum of squares
    for j in range(0, n_t):
        count, inner, slice_stride, first = group_part(outers, inners, j, group, n_groups, WIDE)
        p_base = tensor_ptr(param_ptrs, j, DTYPE, False)
        g_base = tensor_ptr(grad_ptrs, j, DTYPE, False)
        for start in range(0, count, BLOCK):
            offs, mask = group_offsets(start, lanes, count, inner, slice_stride, first)
            p = tl.load(p_base + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_base + offs, mask=mask, other=0.0).to(tl.float32)
            b = g  # the buffer is not read on the first step (nor without momentum)
            if HAS_MOMENTUM:
                b_ptrs = tensor_ptr(buf_ptrs, j, DTYPE, False) + offs
                if not FIRST_STEP:
                    b = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
            p, b = sgd_update(
                p,
                g,
                b,
                lr,
                weight_decay,
                momentum,
                dampening,
                l1,
                grad_scale_ptr,
                BLOCK,
                MAXIMIZE,
                HAS_WD,
                DECOUPLED,
                HAS_MOMENTUM,
                FIRST_STEP,
                NESTEROV,
                HAS_L1,
                False,  # COMPLEX: complex params cannot be grouped
                HAS_GRAD_SCALE,
            )
            if HAS_MOMENTUM:
                tl.store(b_ptrs, to_storage(b, DTYPE), mask=mask)
            z = to_storage(p, DTYPE)
            tl.store(p_base + offs, z, mask=mask)
            z = z.to(tl.float32)
            sumsq += tl.where(mask, z * z, 0.0)
    # every thread's writes of pass 1 visible to every thread of the program
    tl.debug_barrier()
    # 2. block soft-thresholding; a zero group stays 0 (also when c = 0: no 0/0)
    norm = tl.sqrt_rn(block_sum(sumsq))
    zero = norm == 0.0  # False for NaN, which propagates
    scale = 1.0 - (lr * group_l1) / tl.where(zero, 1.0, norm)
    scale = tl.where(zero, 0.0, tl.maximum(scale, 0.0, propagate_nan=tl.PropagateNan.ALL))
    # 3. scale the group's part of every tensor
    for j in range(0, n_t):
        count, inner, slice_stride, first = group_part(outers, inners, j, group, n_groups, WIDE)
        p_base = tensor_ptr(param_ptrs, j, DTYPE, False)
        for start in range(0, count, BLOCK):
            offs, mask = group_offsets(start, lanes, count, inner, slice_stride, first)
            x = tl.load(p_base + offs, mask=mask, other=0.0).to(tl.float32) * scale
            tl.store(p_base + offs, to_storage(x, DTYPE), mask=mask)


def _launch_group_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    hyper: SgdHyper,
    lasso: GroupLasso,
    *,
    is_first_step: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """Check, build (or fetch) the tables, run :func:`_group_sgd_kernel` once for the group."""
    where = "ProxSGD fused group-lasso step"
    device = params[0].device
    kernel = _group_sgd_kernel.for_device(device.type)  # compiled on CUDA, interpreted on CPU
    has_momentum = momentum_buffers is not None
    if (hyper.momentum != 0) != has_momentum:
        raise ValueError("momentum_buffers must be given exactly when momentum != 0")
    reject_complex(where, params)
    check_lists(where, params, grad=grads, momentum_buffer=momentum_buffers)
    n_groups = check_group_axes(where, params, lasso.axes)
    dtype = triton_dtype(params[0].dtype)
    lr_value, lr_tensor = lr_args(hyper.lr, device)
    grad_scale = scalar_arg(grad_scale, "grad_scale", device)
    found_inf = scalar_arg(found_inf, "found_inf", device)

    lists = [params, grads] + ([momentum_buffers] if has_momentum else [])
    plan = group_plan(lists, [True, False, True], lasso.axes, n_groups, device)  # type: ignore[arg-type]
    if plan is None:
        return
    kernel[(plan.n_groups,)](
        plan.tables[0],
        plan.tables[1],
        plan.tables[2] if has_momentum else None,
        plan.outers,
        plan.inners,
        plan.n_tensors,
        plan.n_groups,
        lr_tensor,
        grad_scale,
        found_inf,
        lr_value,
        float(hyper.weight_decay),
        float(hyper.momentum),
        float(hyper.dampening),
        float(hyper.l1),
        float(lasso.group_l1),
        DTYPE=dtype,
        BLOCK=plan.block,
        WIDE=plan.wide,
        MAXIMIZE=bool(hyper.maximize),
        HAS_WD=hyper.weight_decay != 0,
        DECOUPLED=bool(hyper.decoupled_weight_decay),
        HAS_MOMENTUM=has_momentum,
        FIRST_STEP=bool(is_first_step),
        NESTEROV=bool(hyper.nesterov),
        HAS_L1=hyper.l1 != 0,
        LR_IS_TENSOR=lr_tensor is not None,
        HAS_GRAD_SCALE=grad_scale is not None,
        HAS_FOUND_INF=found_inf is not None,
        num_warps=plan.num_warps,
        enable_fp_fusion=True,  # as the elementwise kernels (nvcc's default contraction)
    )
    plan.finish()


def fused_group_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    hyper: SgdHyper,
    lasso: GroupLasso,
    *,
    is_first_step: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One ProxSGD step with group lasso (``lasso.group_l1 > 0``) over all params of one param
    group, in one launch: the step of ``fused_prox_sgd_``, then
    ``x_g <- x_g * max(0, 1 - lr * group_l1 / ||x_g||)`` per group
    (``regoptim.regularizers.group_lasso``).

    ``params``: every param of the param group, each with its grad, on one device, one dtype
    (float32, bfloat16, float16); ``lasso.axes`` normalised, every param the same size along its
    axis. ``momentum_buffers`` and the AMP arguments as for ``fused_prox_sgd_``.
    """
    if not params:
        return
    with torch.no_grad():
        _launch_group_sgd(
            list(params),
            list(grads),
            list(momentum_buffers) if momentum_buffers is not None else None,
            hyper,
            lasso,
            is_first_step=is_first_step,
            grad_scale=grad_scale,
            found_inf=found_inf,
        )

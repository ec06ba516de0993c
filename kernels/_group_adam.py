"""ProxAdam/ProxAdamW with group lasso in one Triton launch per param group: one program per group.

Program ``i`` owns group ``i`` (slice ``i`` along its axis of every tensor, ``_group`` tables it).
With ``c = lr * group_l1`` and ``d = sqrt(v) / sqrt(1 - beta2^t) + eps`` each element's
denominator (``v``: the stored second moment, its running max under amsgrad; ``t`` the tensor's
incremented step), the prox in the metric ``diag(d)`` (``regoptim.regularizers.group_lasso``):

1. for each tensor, for each block of the group's part: the elementwise step,
   ``_update.adam_update`` as ``_adam`` (moments, preconditioned step, L1 prox in Adam's
   metric), storing ``m``, ``v`` (, ``vmax``) and
   ``z = p`` in the param dtype; from the stored (rounded) ``z`` and ``v``, as the eager prox reads
   them back: ``||d z||^2``, ``||z||^2``, ``min d``, ``max d`` (float32);
2. the group is exactly zero iff ``||d z|| <= c``; else ``rho``, the root of
   ``h(rho) = sum (d z / (d rho + c))^2 = 1``, by Newton's method on ``h^(-1/2) - 1`` inside the
   bisection bracket of ``group_lasso._solve_rho``, from its left end (a proven lower bound), to 4
   float32 ulps or ``group_lasso.MAX_ITERS`` iterations; each iteration re-reads ``z`` and ``v``
   (its own writes, from L2 on a GPU) to sum ``h`` and ``-h'/2``;
3. for each tensor, ``x = z * d rho / (d rho + c)`` (``x = z * 0`` for a zero group: NaN stays).

Launches per step: one, for any number of tensors (grid: the number of groups), besides torch's
fused-Adam step protocol on the counters (+1 before, ``-found_inf`` after), as ``_adam``.
"""

# Triton reads parameter annotations as kernel types, so the jit kernel is left unannotated.
# ruff: noqa: ANN001, ANN202

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from regoptim.hyper import AdamHyper, GroupLasso
from regoptim.regularizers.group_lasso import MAX_ITERS

from ._common import check_lists, log_beta, lr_args, scalar_arg, triton_dtype
from ._group import check_group_axes, group_plan, reject_complex
from ._jit import (
    block_max,
    block_min,
    block_sum,
    dual_jit,
    group_offsets,
    group_part,
    load_scalar,
    one_minus_pow,
    tensor_ptr,
    to_storage,
)
from ._update import adam_update

__all__ = ["fused_group_adam_"]

# Newton's stopping rule: |rho_new - rho| <= TOL * rho_new, 4 float32 ulps as the eager solver
_TOL = 4 * 1.1920928955078125e-07


@dual_jit
def _bc2_sqrt(step_ptrs, j, log_beta2):
    """``sqrt(1 - beta2^t)`` of tensor ``j`` (its incremented step)."""
    step = tl.load(tensor_ptr(step_ptrs, j, tl.float32, False))
    return tl.sqrt_rn(one_minus_pow(log_beta2, step))


@dual_jit
def _load_zd(p_base, v_base, offs, mask, bc2_sqrt, eps):
    """``(z, d)`` from the stored param and (max) second moment, in float32."""
    z = tl.load(p_base + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(v_base + offs, mask=mask, other=0.0).to(tl.float32)
    return z, tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps


@dual_jit(do_not_specialize_on_alignment=["lr_ptr", "grad_scale_ptr", "found_inf_ptr"])
def _group_adam_kernel(
    param_ptrs,
    grad_ptrs,
    exp_avg_ptrs,
    exp_avg_sq_ptrs,
    max_exp_avg_sq_ptrs,
    step_ptrs,
    outers,
    inners,
    n_tensors,
    n_groups,
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
    group_l1: tl.float32,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    WIDE: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    AMSGRAD: tl.constexpr,
    HAS_L1: tl.constexpr,
    LR_IS_TENSOR: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr,
    MAX_ITERS: tl.constexpr,
    TOL: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    if LR_IS_TENSOR:
        lr = load_scalar(lr_ptr)
    c = lr * group_l1
    n_t = n_tensors
    if HAS_FOUND_INF:  # a skipped step loops over no tensor: nothing is read or written
        n_t = tl.where(tl.load(found_inf_ptr) == 0, n_tensors, 0)
    d_ptrs = max_exp_avg_sq_ptrs if AMSGRAD else exp_avg_sq_ptrs  # the denominator's moment
    lanes = tl.arange(0, BLOCK)
    a2 = tl.full([BLOCK], 0.0, tl.float32)  # (d z)^2
    z2 = tl.full([BLOCK], 0.0, tl.float32)
    d_lo = tl.full([BLOCK], float("inf"), tl.float32)
    d_hi = tl.full([BLOCK], 0.0, tl.float32)
    # 1. the elementwise step, then the group's sums from the stored values
    for j in range(0, n_t):
        count, inner, slice_stride, first = group_part(outers, inners, j, group, n_groups, WIDE)
        step = tl.load(tensor_ptr(step_ptrs, j, tl.float32, False))
        bias_correction1 = one_minus_pow(log_beta1, step)
        bc2_sqrt = tl.sqrt_rn(one_minus_pow(log_beta2, step))
        p_base = tensor_ptr(param_ptrs, j, DTYPE, False)
        g_base = tensor_ptr(grad_ptrs, j, DTYPE, False)
        m_base = tensor_ptr(exp_avg_ptrs, j, DTYPE, False)
        v_base = tensor_ptr(exp_avg_sq_ptrs, j, DTYPE, False)
        for start in range(0, count, BLOCK):
            offs, mask = group_offsets(start, lanes, count, inner, slice_stride, first)
            p = tl.load(p_base + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.load(g_base + offs, mask=mask, other=0.0).to(tl.float32)
            m = tl.load(m_base + offs, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(v_base + offs, mask=mask, other=0.0).to(tl.float32)
            vmax = v  # not read without amsgrad
            if AMSGRAD:
                vmax_ptrs = tensor_ptr(max_exp_avg_sq_ptrs, j, DTYPE, False) + offs
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
                bc2_sqrt,
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
                False,  # COMPLEX: complex params cannot be grouped
                HAS_GRAD_SCALE,
            )
            tl.store(m_base + offs, to_storage(m, DTYPE), mask=mask)
            tl.store(v_base + offs, to_storage(v, DTYPE), mask=mask)
            if AMSGRAD:
                tl.store(vmax_ptrs, to_storage(vmax, DTYPE), mask=mask)
            z = to_storage(p, DTYPE)
            tl.store(p_base + offs, z, mask=mask)
            z = z.to(tl.float32)
            # d from the stored denominator's moment, as the eager prox reads it back
            d = tl.div_rn(tl.sqrt_rn(to_storage(vmax, DTYPE).to(tl.float32)), bc2_sqrt) + eps
            a = d * z
            a2 += tl.where(mask, a * a, 0.0)
            z2 += tl.where(mask, z * z, 0.0)
            d_lo = tl.minimum(d_lo, tl.where(mask, d, float("inf")))
            d_hi = tl.maximum(d_hi, tl.where(mask, d, 0.0))
    # every thread's writes of pass 1 visible to every thread of the program
    tl.debug_barrier()
    # 2. zero iff ||d z|| <= c; else rho by safeguarded Newton from the bracket's left end
    norm_a = tl.sqrt_rn(block_sum(a2))
    hi = tl.sqrt_rn(block_sum(z2))
    d_min = block_min(d_lo)
    d_max = block_max(d_hi)
    alive = norm_a > c  # False for NaN: rho = 0 and x = z * 0 keeps the NaN
    # a dead group's bracket is never used (and may have no element: d_max = 0)
    d_min = tl.where(alive, d_min, 1.0)
    d_max = tl.where(alive, d_max, 1.0)
    lo = tl.maximum(tl.maximum(hi - c / d_min, 0.0), (norm_a - c) / d_max)
    hi = tl.minimum(hi, (norm_a - c) / d_min)
    lo = tl.where(alive, lo, 0.0)
    rho = lo
    it = 0
    go = alive
    while go:
        h_acc = tl.full([BLOCK], 0.0, tl.float32)
        s3_acc = tl.full([BLOCK], 0.0, tl.float32)
        for j in range(0, n_t):
            count, inner, slice_stride, first = group_part(outers, inners, j, group, n_groups, WIDE)
            bc2_sqrt = _bc2_sqrt(step_ptrs, j, log_beta2)
            p_base = tensor_ptr(param_ptrs, j, DTYPE, False)
            v_base = tensor_ptr(d_ptrs, j, DTYPE, False)
            for start in range(0, count, BLOCK):
                offs, mask = group_offsets(start, lanes, count, inner, slice_stride, first)
                z, d = _load_zd(p_base, v_base, offs, mask, bc2_sqrt, eps)
                a = d * z
                r = 1.0 / (d * rho + c)
                r2 = r * r
                h_acc += tl.where(mask, a * a * r2, 0.0)  # sum a^2 / (d rho + c)^2
                s3_acc += tl.where(mask, a * a * d * r2 * r, 0.0)  # -h'/2
        h = block_sum(h_acc)
        s3 = block_sum(s3_acc)
        below = h > 1.0  # rho is left of the root
        lo = tl.where(below, rho, lo)
        hi = tl.where(below, hi, rho)
        new = rho + h * (tl.sqrt_rn(h) - 1.0) / s3
        new = tl.where((new >= lo) & (new <= hi), new, (lo + hi) * 0.5)
        done = tl.abs(new - rho) <= TOL * new
        rho = new
        it += 1
        go = (~done) & (it < MAX_ITERS)
    # 3. x = z * d rho / (d rho + c); a zero group (rho = 0) is z * 0
    for j in range(0, n_t):
        count, inner, slice_stride, first = group_part(outers, inners, j, group, n_groups, WIDE)
        bc2_sqrt = _bc2_sqrt(step_ptrs, j, log_beta2)
        p_base = tensor_ptr(param_ptrs, j, DTYPE, False)
        v_base = tensor_ptr(d_ptrs, j, DTYPE, False)
        for start in range(0, count, BLOCK):
            offs, mask = group_offsets(start, lanes, count, inner, slice_stride, first)
            z, d = _load_zd(p_base, v_base, offs, mask, bc2_sqrt, eps)
            dr = d * rho
            x = z * tl.where(rho == 0.0, 0.0, dr / tl.where(rho == 0.0, 1.0, dr + c))
            tl.store(p_base + offs, to_storage(x, DTYPE), mask=mask)


def _launch_group_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    state_steps: list[Tensor],
    hyper: AdamHyper,
    lasso: GroupLasso,
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """Check, increment the steps, build (or fetch) the tables, run :func:`_group_adam_kernel`
    once for the group."""
    where = "ProxAdam fused group-lasso step"
    device = params[0].device
    kernel = _group_adam_kernel.for_device(device.type)  # compiled on CUDA, interpreted on CPU
    amsgrad = bool(hyper.amsgrad)
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad needs max_exp_avg_sqs")
    reject_complex(where, params)
    check_lists(
        where,
        params,
        state_steps,
        grad=grads,
        exp_avg=exp_avgs,
        exp_avg_sq=exp_avg_sqs,
        max_exp_avg_sq=max_exp_avg_sqs if amsgrad else None,
    )
    n_groups = check_group_axes(where, params, lasso.axes)
    dtype = triton_dtype(params[0].dtype)
    lr_value, lr_tensor = lr_args(hyper.lr, device)
    grad_scale = scalar_arg(grad_scale, "grad_scale", device)
    found_inf = scalar_arg(found_inf, "found_inf", device)

    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    plan = group_plan(
        lists,  # type: ignore[arg-type]
        [True, False, True, True, True],
        lasso.axes,
        n_groups,
        device,
        scalars=[state_steps],
    )
    # torch's fused-Adam protocol: +1 on the device, and -found_inf after the kernel, so a
    # skipped step leaves the count untouched without reading found_inf on the host.
    torch._foreach_add_(state_steps, 1)
    if plan is not None:
        tables = plan.tables
        kernel[(plan.n_groups,)](
            tables[0],
            tables[1],
            tables[2],
            tables[3],
            tables[4] if amsgrad else None,
            tables[-1],
            plan.outers,
            plan.inners,
            plan.n_tensors,
            plan.n_groups,
            lr_tensor,
            grad_scale,
            found_inf,
            lr_value,
            float(hyper.beta2),
            1.0 - float(hyper.beta1),
            1.0 - float(hyper.beta2),
            log_beta(float(hyper.beta1)),
            log_beta(float(hyper.beta2)),
            float(hyper.eps),
            float(hyper.weight_decay),
            float(hyper.l1),
            float(lasso.group_l1),
            DTYPE=dtype,
            BLOCK=plan.block,
            WIDE=plan.wide,
            MAXIMIZE=bool(hyper.maximize),
            HAS_WD=hyper.weight_decay != 0,
            DECOUPLED=bool(hyper.decoupled_weight_decay),
            AMSGRAD=amsgrad,
            HAS_L1=hyper.l1 != 0,
            LR_IS_TENSOR=lr_tensor is not None,
            HAS_GRAD_SCALE=grad_scale is not None,
            HAS_FOUND_INF=found_inf is not None,
            MAX_ITERS=MAX_ITERS,
            TOL=_TOL,
            num_warps=plan.num_warps,
            enable_fp_fusion=True,  # as the elementwise kernels (nvcc's default contraction)
        )
        plan.finish()
    if found_inf is not None:
        torch._foreach_sub_(state_steps, [found_inf] * len(state_steps))


def fused_group_adam_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    state_steps: list[Tensor],
    hyper: AdamHyper,
    lasso: GroupLasso,
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One ProxAdam/ProxAdamW step with group lasso (``lasso.group_l1 > 0``) over all params of
    one param group, in one launch: the step of ``fused_prox_adam_``, then the group prox in
    Adam's metric ``diag(d)``, ``d`` the step's own denominator
    (``regoptim.regularizers.group_lasso``).

    Preconditions as ``fused_group_sgd_``; ``state_steps`` float32 0-d tensors on the device,
    incremented here (not when ``found_inf`` is set); ``max_exp_avg_sqs`` only under amsgrad.
    """
    if not params:
        return
    with torch.no_grad():
        _launch_group_adam(
            list(params),
            list(grads),
            list(exp_avgs),
            list(exp_avg_sqs),
            list(max_exp_avg_sqs) if hyper.amsgrad and max_exp_avg_sqs is not None else None,
            list(state_steps),
            hyper,
            lasso,
            grad_scale=grad_scale,
            found_inf=found_inf,
        )

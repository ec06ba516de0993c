"""The ProxSGD family in one Triton kernel, launched at most twice per group.

Per element, in float32 registers: ``_update.sgd_update`` (unscale and maximize, coupled L2,
momentum, decoupled decay, the step, the L1 prox), shared with the group-lasso kernel.

``p`` and ``b`` are read once and written once, in the param dtype.
"""

# Triton reads parameter annotations as kernel types, so the jit kernel is left unannotated.
# ruff: noqa: ANN001, ANN202

from __future__ import annotations

import torch
import triton.language as tl
from torch import Tensor

from regoptim.hyper import SgdHyper

from ._common import (
    BLOCK,
    check_lists,
    flatten_group,
    launch_plan,
    lr_args,
    scalar_arg,
    triton_dtype,
)
from ._jit import block_offsets, dual_jit, load_scalar, tensor_ptr
from ._update import sgd_update

__all__ = ["fused_prox_sgd_"]


# The 1-element tensors are read once per program: alignment specialisation buys nothing there and
# would compile a second variant for an lr that is a view (e.g. one entry of a schedule tensor).
@dual_jit(do_not_specialize_on_alignment=["lr_ptr", "grad_scale_ptr", "found_inf_ptr"])
def _prox_sgd_kernel(
    param_ptrs,
    grad_ptrs,
    buf_ptrs,
    numels,
    block_tensor,
    block_start,
    lr_ptr,
    grad_scale_ptr,
    found_inf_ptr,
    lr: tl.float32,
    weight_decay: tl.float32,
    momentum: tl.float32,
    dampening: tl.float32,
    l1: tl.float32,
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    HAS_WD: tl.constexpr,
    DECOUPLED: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    FIRST_STEP: tl.constexpr,
    NESTEROV: tl.constexpr,
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
    p_ptrs = tensor_ptr(param_ptrs, t, DTYPE, ALIGNED) + offs
    p = tl.load(p_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(tensor_ptr(grad_ptrs, t, DTYPE, ALIGNED) + offs, mask=mask, other=0.0).to(
        tl.float32
    )
    b = g  # the buffer is not read on the first step (nor without momentum)
    if HAS_MOMENTUM:
        b_ptrs = tensor_ptr(buf_ptrs, t, DTYPE, ALIGNED) + offs
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
        COMPLEX,
        HAS_GRAD_SCALE,
    )
    if HAS_MOMENTUM:
        tl.store(b_ptrs, b.to(DTYPE), mask=mask)
    tl.store(p_ptrs, p.to(DTYPE), mask=mask)


def _launch_prox_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    *,
    lr: float | Tensor,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    l1: float,
    is_first_step: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """Build (or fetch) the launch tables and run :func:`_prox_sgd_kernel` once for the group."""
    if not params:
        return
    device = params[0].device
    kernel = _prox_sgd_kernel.for_device(device.type)  # compiled on CUDA, interpreted on CPU
    has_momentum = momentum_buffers is not None
    check_lists("ProxSGD fused step", params, grad=grads, momentum_buffer=momentum_buffers)
    dtype = triton_dtype(params[0].dtype)
    lr_value, lr_tensor = lr_args(lr, device)
    grad_scale = scalar_arg(grad_scale, "grad_scale", device)
    found_inf = scalar_arg(found_inf, "found_inf", device)

    lists = [params, grads] + ([momentum_buffers] if has_momentum else [])
    flat = flatten_group(lists, mutated=[True, False, True])  # type: ignore[list-item]
    if not flat.kept:
        return
    plan = launch_plan(flat.lists, device)
    for launch in plan.launches:  # the vectorised (aligned) tensors, then the rest
        kernel[(launch.n_blocks,)](
            plan.tables[0],
            plan.tables[1],
            plan.tables[2] if has_momentum else None,
            plan.numels,
            launch.block_tensor,
            launch.block_start,
            lr_tensor,
            grad_scale,
            found_inf,
            lr_value,
            float(weight_decay),
            float(momentum),
            float(dampening),
            float(l1),
            DTYPE=dtype,
            BLOCK=BLOCK,
            ALIGNED=launch.aligned,
            MAXIMIZE=bool(maximize),
            HAS_WD=weight_decay != 0,
            DECOUPLED=bool(decoupled_weight_decay),
            HAS_MOMENTUM=has_momentum,
            FIRST_STEP=bool(is_first_step),
            NESTEROV=bool(nesterov),
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


@torch.library.custom_op("regoptim::fused_prox_sgd_", mutates_args=("params", "momentum_buffers"))
def _fused_prox_sgd_op(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    lr: float,
    lr_tensor: Tensor | None,
    weight_decay: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    l1: float,
    is_first_step: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    # custom-op schemas have no `list[Tensor] | None` and no `float | Tensor`: an empty
    # momentum_buffers list means "no momentum", lr_tensor (when given) overrides lr.
    _launch_prox_sgd(
        params,
        grads,
        momentum_buffers if momentum != 0 else None,
        lr=lr if lr_tensor is None else lr_tensor,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
        l1=l1,
        is_first_step=is_first_step,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


def fused_prox_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    hyper: SgdHyper,
    *,
    is_first_step: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One ProxSGD step for tensors of one device and dtype, in at most two launches.

    See ``regoptim.backends.dispatch.fused_prox_sgd_`` for the contract. Runs as the custom op
    ``torch.ops.regoptim.fused_prox_sgd_`` so ``torch.compile`` can trace a step that calls it.
    """
    if not params:
        return
    h = hyper
    if (h.momentum != 0) != (momentum_buffers is not None):
        raise ValueError("momentum_buffers must be given exactly when momentum != 0")
    with torch.no_grad():
        _fused_prox_sgd_op(
            list(params),
            list(grads),
            list(momentum_buffers) if momentum_buffers is not None else [],
            0.0 if isinstance(h.lr, Tensor) else float(h.lr),
            h.lr if isinstance(h.lr, Tensor) else None,
            float(h.weight_decay),
            float(h.momentum),
            float(h.dampening),
            bool(h.nesterov),
            bool(h.maximize),
            bool(h.decoupled_weight_decay),
            float(h.l1),
            bool(is_first_step),
            grad_scale,
            found_inf,
        )

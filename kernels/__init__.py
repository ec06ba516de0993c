"""regoptim's fused Triton kernels (installed as ``regoptim._kernels``).

One kernel per family (ProxSGD; ProxAdam/ProxAdamW) updates every parameter of a (device, dtype)
group in at most two launches (16-byte-aligned tensors get a vectorised variant) and one
pass over memory. They run compiled on CUDA tensors, or on CPU tensors
in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before this package's kernels are first
used (that is how CI validates them).

Group lasso (``group_l1 > 0``) has its own kernels, one launch per param group and step: one
program per group updates its slices in every tensor, reduces the group's norm and applies the
group prox (:func:`fused_group_sgd_`, :func:`fused_group_adam_`). Both kinds call the family's
per-element update from ``_update`` (one ``@triton.jit`` device function per family).

This module imports without triton; :func:`available` says whether the kernels can run, and the
step functions import the kernels on first use.
"""

from __future__ import annotations

import os

from torch import Tensor

from regoptim.hyper import AdamHyper, GroupLasso, SgdHyper

__all__ = [
    "available",
    "fused_group_adam_",
    "fused_group_sgd_",
    "fused_prox_adam_",
    "fused_prox_sgd_",
]


def available() -> str | None:
    """``None`` if the Triton kernels can run here, else a message saying what ``fused=True`` needs.

    They can run when triton imports and either a CUDA device is present or ``TRITON_INTERPRET=1``
    (CPU tensors in Triton's interpreter).
    """
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError as exc:
        return (
            "fused=True needs Triton for regoptim's fused kernels "
            f"(pip install 'regoptim[triton]'): {exc}"
        )
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return (
        "fused=True runs regoptim's Triton kernels on CUDA tensors, or on CPU tensors in Triton's "
        "interpreter with TRITON_INTERPRET=1; neither is available here (use fused=None)"
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
    """One ProxSGD step for tensors of one device and dtype (see ``regoptim.backends.dispatch``)."""
    from ._sgd import fused_prox_sgd_ as impl

    impl(
        params,
        grads,
        momentum_buffers,
        hyper,
        is_first_step=is_first_step,
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
    """One ProxAdam/ProxAdamW step for tensors of one device and dtype (see ``regoptim.backends.dispatch``)."""
    from ._adam import fused_prox_adam_ as impl

    impl(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        hyper,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


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
    group, in one launch: the step of :func:`fused_prox_sgd_`, then
    ``x_g <- x_g * max(0, 1 - lr * group_l1 / ||x_g||)`` per group (``regoptim.regularizers.group_lasso``).

    ``params``: every param of the param group, each with its grad, on one device, one dtype
    (float32, bfloat16, float16); ``lasso.axes`` normalised, every param the same size along its
    axis. ``momentum_buffers`` and the AMP arguments as for :func:`fused_prox_sgd_`.
    """
    from ._group_sgd import fused_group_sgd_ as impl

    impl(
        params,
        grads,
        momentum_buffers,
        hyper,
        lasso,
        is_first_step=is_first_step,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


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
    one param group, in one launch: the step of :func:`fused_prox_adam_`, then the group prox in
    Adam's metric ``diag(d)``, ``d`` the step's own denominator (``regoptim.regularizers.group_lasso``).

    Preconditions as :func:`fused_group_sgd_`; ``state_steps`` float32 0-d tensors on the device,
    incremented here (not when ``found_inf`` is set); ``max_exp_avg_sqs`` only under amsgrad.
    """
    from ._group_adam import fused_group_adam_ as impl

    impl(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        hyper,
        lasso,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )

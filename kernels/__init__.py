"""regoptim's fused Triton kernels (installed as ``regoptim._kernels``).

One kernel per family (ProxSGD; ProxAdam/ProxAdamW) updates every parameter of a (device, dtype)
group in at most two launches (16-byte-aligned tensors get a vectorised variant) and one
pass over memory. They run compiled on CUDA tensors, or on CPU tensors
in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before this package's kernels are first
used (that is how CI validates them).

This module imports without triton; :func:`available` says whether the kernels can run, and the
two step functions import the kernels on first use.
"""

from __future__ import annotations

import os

from torch import Tensor

from regoptim.hyper import AdamHyper, SgdHyper

__all__ = ["available", "fused_prox_adam_", "fused_prox_sgd_"]


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

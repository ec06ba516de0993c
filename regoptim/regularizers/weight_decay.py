"""Decoupled weight decay's eager form: ``p <- p * (1 - lr * weight_decay)``.

Its other forms: step 3 of :class:`regoptim.ProxSGD` / :class:`regoptim.ProxAdam` (math), the
``decay`` factor of ``sgd_step``/``adam_step`` in :mod:`regoptim.reference`, and the ``decay``
scalar of the C++ and Triton kernels. Coupled L2 is torch.optim's own ``weight_decay`` (added to the
gradient inside the update). How the factor follows the lr (``decay_scaling``) is in
:mod:`regoptim.optimizer`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from regoptim.optimizer import group_tensors, on_device

__all__ = ["decay_"]


def decay_(params: list[Tensor], lr: float | Tensor, weight_decay: float, *, foreach: bool) -> None:
    """``p <- p * (1 - lr * weight_decay)`` (decoupled decay)."""
    factor = 1 - lr * weight_decay
    if foreach:
        for (device, _), ((dps,), _) in group_tensors([params]):
            torch._foreach_mul_(dps, on_device(factor, device))  # type: ignore[arg-type]
    else:
        for p in params:
            p.mul_(factor)

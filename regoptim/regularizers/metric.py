r"""Adam's diagonal metric, shared by the regularizers whose prox Adam takes in it (L1, group lasso).

The metric of a ProxAdam step is :math:`\operatorname{diag}(d)/\mathrm{lr}` with
:math:`d = \sqrt{\hat v} + \epsilon`, the update's own denominator.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["bias_correction2_sqrt"]


def bias_correction2_sqrt(
    beta2: float | Tensor, state_steps: list[Tensor], on_device_step: bool
) -> list[Any]:
    """``sqrt(1 - beta2^t)`` per parameter: a float, or a 0-d tensor that is never read on the host
    (capturable, differentiable, and under torch.compile, where ``.item()`` breaks the graph)."""
    if torch.compiler.is_compiling():
        # the step tensor in float64, as float(s) is in eager
        return [(1 - beta2 ** s.double()) ** 0.5 for s in state_steps]
    if on_device_step:
        return [(1 - beta2**s).sqrt() for s in state_steps]
    return [float((1 - beta2 ** float(s)) ** 0.5) for s in state_steps]

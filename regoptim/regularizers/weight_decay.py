"""Decoupled weight decay's eager form: ``p <- p * (1 - lr * weight_decay)``.

Its other forms: step 3 of :class:`regoptim.ProxSGD` / :class:`regoptim.ProxAdam` (math), the
``decay`` factor of ``sgd_step``/``adam_step`` in :mod:`regoptim.reference`, and the ``decay``
scalar of the C++ and Triton kernels. Coupled L2 is torch.optim's own ``weight_decay`` (added to the
gradient inside the update).

``decay_scaling`` (how the factor follows the lr) is here too: "lr" (torch's ``1 - lr * wd``,
applied by the backends inside the step), "schedule" (``1 - wd * lr / initial_lr``) or "none"
(``1 - wd``), the last two applied by :func:`predecay_` before the step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from regoptim.optimizer import _is_number, group_tensors, on_device

__all__ = ["DECAY_SCALINGS", "decay_", "decay_lr", "predecay_", "validate_decay_scaling"]


def decay_(params: list[Tensor], lr: float | Tensor, weight_decay: float, *, foreach: bool) -> None:
    """``p <- p * (1 - lr * weight_decay)`` (decoupled decay)."""
    factor = 1 - lr * weight_decay
    if foreach:
        for (device, _), ((dps,), _) in group_tensors([params]):
            torch._foreach_mul_(dps, on_device(factor, device))  # type: ignore[arg-type]
    else:
        for p in params:
            p.mul_(factor)


DECAY_SCALINGS = ("lr", "schedule", "none")


def validate_decay_scaling(group: dict[str, Any]) -> None:
    """``decay_scaling`` is one of :data:`DECAY_SCALINGS`, only with decoupled decay; with
    "schedule", the group's ``initial_lr`` (when set) is a finite number > 0."""
    scaling = group["decay_scaling"]
    if not isinstance(scaling, str) or scaling not in DECAY_SCALINGS:
        raise ValueError(
            f"Invalid decay_scaling: {scaling!r} (expected 'lr', 'schedule' or 'none')"
        )
    if scaling != "lr" and not group["decoupled_weight_decay"]:
        raise ValueError(
            f"decay_scaling={scaling!r} applies to decoupled weight decay only: pass "
            "decoupled_weight_decay=True (coupled weight_decay is the gradient of an L2 term and "
            "is scaled by lr like the rest of the gradient)"
        )
    if scaling == "schedule" and "initial_lr" in group:
        ref = group["initial_lr"]
        value = float(ref.detach()) if isinstance(ref, Tensor) else ref
        if not _is_number(value) or not (0.0 < value < math.inf):
            raise ValueError(
                f"decay_scaling='schedule' divides by the group's initial_lr, got {ref!r} "
                "(must be a finite number > 0)"
            )


def decay_lr(group: dict[str, Any]) -> float | Tensor | None:
    """The lr the decoupled decay uses instead of ``lr`` (``p <- p * (1 - decay_lr * wd)``):
    ``lr / initial_lr`` for ``decay_scaling="schedule"``, 1 for "none"; ``None`` for "lr"
    (torch's, applied by the backends themselves) or when there is no decoupled decay."""
    scaling = group.get("decay_scaling", "lr")
    if scaling == "lr" or not group["decoupled_weight_decay"] or group["weight_decay"] == 0:
        return None
    if scaling == "none":
        return 1.0
    ref = group["initial_lr"]
    return group["lr"] / (float(ref) if isinstance(ref, Tensor) else ref)


def predecay_(opt: Optimizer, group: dict[str, Any], params: list[Tensor]) -> float:
    """Apply ``decay_scaling``'s decoupled decay to ``params`` (those stepping now) before the
    step, and return the weight decay the step itself then takes: 0 when it was applied here,
    the group's otherwise ("lr": the backends apply torch's decay themselves). A step that
    GradScaler's ``found_inf`` skips is not decayed (read on the host: fused steps only)."""
    weight_decay = group["weight_decay"]
    scaled = decay_lr(group)
    if scaled is None:
        return weight_decay
    found_inf = getattr(opt, "found_inf", None)
    if params and not (found_inf is not None and bool(found_inf.item())):
        foreach = group["foreach"] is not False and not group["differentiable"]
        decay_(params, scaled, weight_decay, foreach=foreach)
    return 0.0

"""One hyperparameter record per optimizer family, and one per regularizer.

A record is built once per param group and step from the group's dict (after validation and
``decay_scaling``) and travels unchanged to whichever backend runs the step (eager torch, the C++
CPU kernel, the Triton kernels), instead of the same keywords written out in every backend's
signature. Backends read the fields they need; a new regularizer adds a record here and one form
per backend. Defaults are torch.optim's, so a record names only what differs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from torch import Tensor

__all__ = ["AdamHyper", "GroupLasso", "SgdHyper"]


@dataclass(frozen=True)
class SgdHyper:
    """ProxSGD's step (see :class:`regoptim.ProxSGD`): ``weight_decay`` is what remains to apply
    in the step (0 when ``decay_scaling`` already applied a decoupled decay), ``l1`` the strength
    of the elementwise prox."""

    lr: float | Tensor
    weight_decay: float = 0.0
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    maximize: bool = False
    decoupled_weight_decay: bool = False
    l1: float = 0.0

    @classmethod
    def from_group(cls, group: dict[str, Any], weight_decay: float) -> SgdHyper:
        return cls(
            lr=group["lr"],
            weight_decay=weight_decay,
            momentum=group["momentum"],
            dampening=group["dampening"],
            nesterov=group["nesterov"],
            maximize=group["maximize"],
            decoupled_weight_decay=group["decoupled_weight_decay"],
            l1=group["l1"],
        )

    def on(self, device: Any) -> SgdHyper:
        """This record with a tensor ``lr`` moved to ``device``."""
        return replace(self, lr=self.lr.to(device)) if isinstance(self.lr, Tensor) else self


@dataclass(frozen=True)
class AdamHyper:
    """ProxAdam/ProxAdamW's step (see :class:`regoptim.ProxAdam`); ``weight_decay`` as for
    :class:`SgdHyper`."""

    lr: float | Tensor
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    amsgrad: bool = False
    maximize: bool = False
    l1: float = 0.0

    @classmethod
    def from_group(cls, group: dict[str, Any], weight_decay: float) -> AdamHyper:
        beta1, beta2 = group["betas"]
        return cls(
            lr=group["lr"],
            beta1=beta1,
            beta2=beta2,
            eps=group["eps"],
            weight_decay=weight_decay,
            decoupled_weight_decay=group["decoupled_weight_decay"],
            amsgrad=group["amsgrad"],
            maximize=group["maximize"],
            l1=group["l1"],
        )

    def on(self, device: Any) -> AdamHyper:
        """This record with a tensor ``lr`` moved to ``device``."""
        return replace(self, lr=self.lr.to(device)) if isinstance(self.lr, Tensor) else self


@dataclass(frozen=True)
class GroupLasso:
    """Group lasso over one param group (``regoptim.regularizers.group_lasso``): slice ``i`` of ``params[j]``
    along ``axes[j]`` (normalised to ``>= 0``) belongs to group ``i``; the prox threshold is
    ``lr * group_l1`` in the metric of the family's step."""

    group_l1: float
    axes: tuple[int, ...]

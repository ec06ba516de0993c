r"""ProxAdamW: torch.optim.AdamW with a proximal L1 step in Adam's metric (and group lasso)."""

from __future__ import annotations

from typing import Any

from torch import Tensor
from torch.optim.optimizer import ParamsT

from regoptim.adam import ProxAdam

__all__ = ["ProxAdamW"]


class ProxAdamW(ProxAdam):
    r"""ProxAdam with decoupled weight decay: :class:`torch.optim.AdamW` plus a proximal L1 step.

    Same math as :class:`ProxAdam` with ``decoupled_weight_decay=True`` (and AdamW's default
    ``weight_decay=1e-2``); with ``l1=0`` it computes exactly what ``torch.optim.AdamW`` computes.

    Args:
        params: iterable of parameters or named parameters, or of dicts defining groups.
        lr: learning rate, a float or a 1-element tensor (default: 1e-3).
        betas: running-average coefficients, each in [0, 1) (default: (0.9, 0.999)).
        eps: term added to the denominator (default: 1e-8).
        weight_decay: decoupled weight decay coefficient (default: 1e-2).
        amsgrad: use the running maximum of the second moment (default: False).
        l1: L1 strength of the proximal step in Adam's metric (default: 0).
        group_l1: group lasso strength, its prox in Adam's metric (default: 0; see
            :class:`ProxAdam`).
        group_axes: the group axis of each parameter (``None``: 0 for each; see
            :class:`ProxAdam`).
        decay_scaling: how decoupled decay follows the lr: ``"lr"`` (default, torch's
            :math:`\theta \leftarrow \theta(1 - \gamma\lambda)`), ``"schedule"``
            (:math:`\theta \leftarrow \theta(1 - \lambda\gamma/\gamma_0)`, with
            :math:`\gamma_0` the group's ``initial_lr``: a scheduler's, else the lr at
            construction; the decay follows the schedule's shape, not its scale) or ``"none"``
            (:math:`\theta \leftarrow \theta(1 - \lambda)` every step, whatever the lr).
            Decoupled decay only: a ValueError with coupled ``weight_decay``. Other than
            ``"lr"``, the decay is one extra pass over the parameters before the step.
        maximize: maximize the objective instead of minimizing it (default: False).
        foreach: use torch's foreach implementation (``None``: pick).
        capturable: keep ``step`` on the device for CUDA graphs (see :class:`ProxAdam`).
        differentiable: autograd through the step (see :class:`ProxAdam`).
        fused: use regoptim's fused kernels (``None``: pick; see :class:`ProxAdam`).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        l1: float = 0.0,
        group_l1: float = 0.0,
        group_axes: list[int] | None = None,
        decay_scaling: str = "lr",
        maximize: bool = False,
        foreach: bool | None = None,
        capturable: bool = False,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        super().__init__(
            params,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            decoupled_weight_decay=True,
            l1=l1,
            group_l1=group_l1,
            group_axes=group_axes,
            decay_scaling=decay_scaling,
            maximize=maximize,
            foreach=foreach,
            capturable=capturable,
            differentiable=differentiable,
            fused=fused,
        )

    @staticmethod
    def _default_decoupled() -> bool:
        return True

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # as torch.optim.AdamW: any state loaded into ProxAdamW decays decoupled
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True

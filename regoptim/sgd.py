r"""ProxSGD: torch.optim.SGD with decoupled weight decay and a proximal L1 step."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import Tensor
from torch.optim.optimizer import ParamsT

from regoptim._sgd_impl import IMPLS
from regoptim.backends.cpu import plan as _plan
from regoptim.backends.dispatch import call_fused
from regoptim.backends.group_step import fused_group_sgd_step
from regoptim.hyper import SgdHyper
from regoptim.optimizer import (
    ProxOptimizer,
    check_fused_params,
    resolve_impl,
    validate_flag,
    validate_lr,
    validate_non_negative,
    validate_optional_flag,
)
from regoptim.regularizers.group_lasso import (
    apply_group_prox_,
    resolve_group_axes,
    validate_group_lasso,
)
from regoptim.regularizers.weight_decay import predecay_, validate_decay_scaling

__all__ = ["ProxSGD", "prox_sgd"]


class ProxSGD(ProxOptimizer):
    r"""Stochastic gradient descent with coupled L2, decoupled weight decay and proximal L1.

    A drop-in replacement for :class:`torch.optim.SGD`: same arguments, defaults, state keys
    (``momentum_buffer``) and ``state_dict`` format. With ``l1=0`` and
    ``decoupled_weight_decay=False`` it computes exactly what ``torch.optim.SGD`` computes.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)}, \theta_0 \text{ (params)}, f(\theta)
                \text{ (objective)}, \lambda \text{ (weight decay)}, \mu \text{ (momentum)},
                \tau \text{ (dampening)}, \kappa \text{ (l1)}, \eta \text{ (group\_l1)},
                \textit{nesterov}, \textit{maximize}, \textit{decoupled} \\
            &\textbf{for}\ t=1\ \textbf{to}\ \ldots\ \textbf{do} \\
            &\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
                \quad (g_t \leftarrow -g_t \textbf{ if } \textit{maximize}) \\
            &\quad \textbf{if}\ \lambda \neq 0 \textbf{ and not } \textit{decoupled}:
                \ g_t \leftarrow g_t + \lambda\theta_{t-1}
                && \text{1. coupled L2} \\
            &\quad \textbf{if}\ \mu \neq 0: && \text{2. momentum (torch's)} \\
            &\quad\quad b_t \leftarrow g_t \textbf{ if } t = 1
                \textbf{ else } \mu b_{t-1} + (1-\tau) g_t \\
            &\quad\quad g_t \leftarrow g_t + \mu b_t \textbf{ if } \textit{nesterov}
                \textbf{ else } b_t \\
            &\quad \textbf{if}\ \lambda \neq 0 \textbf{ and } \textit{decoupled}:
                \ \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)
                && \text{3. decoupled decay} \\
            &\quad \theta_t \leftarrow \theta_{t-1} - \gamma g_t && \text{4. step} \\
            &\quad \textbf{if}\ \kappa \neq 0:
                \ \theta_t \leftarrow \operatorname{sign}(\theta_t)
                \max(|\theta_t| - \gamma\kappa,\ 0) && \text{5. proximal L1} \\
            &\quad \textbf{if}\ \eta \neq 0: \textbf{ for each group } g:
                \ \theta_{t,g} \leftarrow \theta_{t,g}
                \max(0,\ 1 - \gamma\eta / \|\theta_{t,g}\|_2) && \text{6. group prox} \\
            &\textbf{return}\ \theta_t
       \end{aligned}

    Step 5 is the proximal operator of :math:`\gamma\kappa\|\theta\|_1` (soft-thresholding): it
    solves :math:`\min_\theta \kappa\|\theta\|_1 + \frac{1}{2\gamma}\|\theta - \theta_t\|^2`
    exactly, so weights that the data do not support land on exact zeros instead of wobbling
    around zero as they do with an L1 term in the loss. For complex parameters it shrinks the
    modulus and keeps the phase.

    Step 6 (group lasso, ``group_l1 > 0``) is the proximal operator of
    :math:`\gamma\eta\sum_g \|\theta_g\|_2` (block soft-thresholding): a group whose norm is at
    most :math:`\gamma\eta` becomes exactly zero (a whole neuron or filter), the others shrink
    toward zero; a zero group stays zero. Group :math:`g` is slice :math:`g` of every parameter of
    the param group along its axis in ``group_axes``, so one group can span several tensors. It
    runs over all the param group's parameters, those without a gradient this step included
    (the step leaves them as they are; their values count in their groups' norms); it does not
    run when no parameter of the group has a gradient. Steps 5 then 6 are together the exact prox
    of :math:`\gamma(\kappa\|\theta\|_1 + \eta\sum_g\|\theta_g\|_2)` (sparse group lasso).

    Args:
        params: iterable of parameters or named parameters to optimize, or of dicts defining
            parameter groups (every hyperparameter below may differ per group).
        lr: learning rate, a float or a 1-element tensor (default: 1e-3).
        momentum: momentum factor :math:`\mu` (default: 0).
        dampening: dampening :math:`\tau` for momentum, in [0, 1] (default: 0).
        weight_decay: weight decay :math:`\lambda` (default: 0). Coupled (an L2 term's gradient,
            as ``torch.optim.SGD``) unless ``decoupled_weight_decay``.
        nesterov: Nesterov momentum; needs ``momentum > 0`` and ``dampening = 0``.
        decoupled_weight_decay: shrink the weights by :math:`(1-\gamma\lambda)` instead of
            adding :math:`\lambda\theta` to the gradient, so the decay bypasses momentum, as AdamW
            does for Adam (default: False).
        l1: L1 strength :math:`\kappa` of the proximal soft-threshold step (default: 0).
        group_l1: group lasso strength :math:`\eta` (default: 0), unweighted: every group has
            the same strength whatever its size. To weight by group size as Yuan & Lin do, put
            groups of one size in their own param group with ``group_l1`` times
            ``sqrt(group size)``. A param group whose parameters all have gradients and are
            contiguous tensors of one device and kernel dtype runs its step and group prox in
            one call of regoptim's fused kernels (C++ on CPU, Triton on CUDA;
            ``regoptim.backends.group_step``); any other runs the step, then the group prox in
            torch.
        group_axes: the group axis of each parameter of the param group (``None``, the default:
            0 for each; negative axes count from the end). Every parameter needs the same size
            along its axis, and 0-d and complex parameters cannot be grouped.
        decay_scaling: how decoupled decay follows the lr: ``"lr"`` (default, torch's
            :math:`\theta \leftarrow \theta(1 - \gamma\lambda)`), ``"schedule"``
            (:math:`\theta \leftarrow \theta(1 - \lambda\gamma/\gamma_0)`, with
            :math:`\gamma_0` the group's ``initial_lr``: a scheduler's, else the lr at
            construction; the decay follows the schedule's shape, not its scale) or ``"none"``
            (:math:`\theta \leftarrow \theta(1 - \lambda)` every step, whatever the lr).
            Decoupled decay only: a ValueError with coupled ``weight_decay``. Other than
            ``"lr"``, the decay is one extra pass over the parameters before the step.
        maximize: maximize the objective instead of minimizing it (default: False).
        foreach: use torch's foreach implementation (``None``: pick, as torch does).
        differentiable: run the step with autograd on, as ``torch.optim.SGD(differentiable=True)``
            does, so gradients flow through it (the prox included); takes the for-loop unless
            ``foreach=True``, and cannot be combined with ``fused=True`` (default: False).
        fused: use regoptim's fused kernels: Triton on CUDA (also on CPU under
            ``TRITON_INTERPRET=1``), the fused C++ kernel on CPU. ``None`` (default): the Triton
            kernels for CUDA parameters when triton is installed; on CPU, regoptim's one-pass C++
            kernel (built at install time) for float32 groups, else torch's fused SGD kernel
            with one extra pass for what it lacks (decoupled decay, the prox). The parameters'
            devices and dtypes are checked when it steps, not at construction, as torch does.

    Note:
        Torch's default on CPU is a for-loop; regoptim's default there is the C++ kernel, whose
        float32 results equal torch's ``fused=True`` SGD bit for bit (regularizers off) and may
        differ from the for-loop in the last bit. Pass ``foreach=False`` to reproduce
        ``torch.optim.SGD()`` bit for bit.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        momentum: float = 0,
        dampening: float = 0,
        weight_decay: float = 0,
        nesterov: bool = False,
        *,
        decoupled_weight_decay: bool = False,
        l1: float = 0.0,
        group_l1: float = 0.0,
        group_axes: list[int] | None = None,
        decay_scaling: str = "lr",
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
    ) -> None:
        defaults: dict[str, Any] = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
            "decoupled_weight_decay": decoupled_weight_decay,
            "l1": l1,
            "group_l1": group_l1,
            "group_axes": group_axes,
            "decay_scaling": decay_scaling,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        validate_flag(group["differentiable"], "differentiable")
        validate_lr(group["lr"], differentiable=group["differentiable"])
        validate_non_negative(group["momentum"], "momentum")
        validate_non_negative(group["dampening"], "dampening")
        if group["dampening"] > 1.0:
            raise ValueError(f"Invalid dampening value: {group['dampening']} (must be in [0, 1])")
        validate_non_negative(group["weight_decay"], "weight_decay")
        validate_non_negative(group["l1"], "l1")
        validate_group_lasso(group)
        validate_flag(group["nesterov"], "nesterov")
        validate_flag(group["decoupled_weight_decay"], "decoupled_weight_decay")
        validate_decay_scaling(group)
        validate_flag(group["maximize"], "maximize")
        validate_optional_flag(group["foreach"], "foreach")
        validate_optional_flag(group["fused"], "fused")
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError(
                "Nesterov momentum requires a momentum and zero dampening "
                f"(got momentum={group['momentum']}, dampening={group['dampening']})"
            )
        if group["fused"] and group["differentiable"]:
            raise RuntimeError("`fused` does not support `differentiable`")
        if group["fused"] and group["foreach"]:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("l1", 0.0)
            group.setdefault("group_l1", 0.0)
            group.setdefault("decay_scaling", "lr")
            group.setdefault("group_axes", None)

    def _init_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        momentum_buffer_list: list[Tensor | None],
    ) -> bool:
        has_sparse_grad = False
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            has_sparse_grad |= p.grad.is_sparse
            if group["momentum"] != 0:
                momentum_buffer_list.append(self.state[p].get("momentum_buffer"))
        if group["fused"]:
            check_fused_params(params)
        return has_sparse_grad

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (``None`` without one)."""
        return self._step_groups(closure, self._step_group)

    def _step_group(self, group: dict[str, Any]) -> None:
        if _plan.sgd_step(self, group):  # the cached C++ CPU path (regoptim/backends/cpu/plan.py)
            return
        self._dispatch_group(group)
        _plan.build(self, group, "sgd")

    def _dispatch_group(self, group: dict[str, Any]) -> None:
        if group["group_l1"] != 0:  # group_axes edited in place: caught before any update
            axes = resolve_group_axes(group["params"], group["group_axes"])
            if fused_group_sgd_step(self, group, axes):  # update and group prox in one kernel call
                return
        params: list[Tensor] = []
        grads: list[Tensor] = []
        momentum_buffer_list: list[Tensor | None] = []
        has_sparse_grad = self._init_group(group, params, grads, momentum_buffer_list)
        weight_decay = predecay_(self, group, params)  # decay_scaling other than "lr"
        _prox_sgd(
            params,
            grads,
            momentum_buffer_list,
            SgdHyper.from_group(group, weight_decay),
            has_sparse_grad=has_sparse_grad,
            foreach=group["foreach"],
            fused=group["fused"],
            grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None),
            group_l1=group["group_l1"],
            differentiable=group["differentiable"],
        )
        if group["momentum"] != 0:
            for p, buf in zip(params, momentum_buffer_list, strict=True):
                if buf is not None:
                    self.state[p]["momentum_buffer"] = buf
        if group["group_l1"] != 0:
            apply_group_prox_(self, group, adam=False)


def prox_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    has_sparse_grad: bool = False,
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    *,
    weight_decay: float,
    momentum: float,
    lr: float | Tensor,
    dampening: float,
    nesterov: bool,
    maximize: bool,
    decoupled_weight_decay: bool = False,
    l1: float = 0.0,
    group_l1: float = 0.0,
    differentiable: bool = False,
) -> None:
    """Functional ProxSGD: picks the implementation and runs one step. See :class:`ProxSGD`.

    ``momentum_buffer_list`` entries that are ``None`` are created (first step) and written back
    into the list, as in ``torch.optim.sgd.sgd``. ``group_l1`` only steers the choice of
    implementation (a non-zero value keeps the default path off regoptim's fused kernels): the
    group prox needs every parameter of the param group, with or without a gradient, so
    :class:`ProxSGD` applies it after this step (``regoptim.regularizers.group_lasso``).
    """
    if not params:
        return
    hyper = SgdHyper(
        lr=lr,
        weight_decay=weight_decay,
        momentum=momentum,
        dampening=dampening,
        nesterov=nesterov,
        maximize=maximize,
        decoupled_weight_decay=decoupled_weight_decay,
        l1=l1,
    )
    _prox_sgd(
        params, grads, momentum_buffer_list, hyper, has_sparse_grad=has_sparse_grad,
        foreach=foreach, fused=fused, grad_scale=grad_scale, found_inf=found_inf,
        group_l1=group_l1, differentiable=differentiable,
    )  # fmt: skip


def _prox_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    hyper: SgdHyper,
    *,
    has_sparse_grad: bool,
    foreach: bool | None,
    fused: bool | None,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    group_l1: float,
    differentiable: bool,
) -> None:
    """:func:`prox_sgd` on a record: picks the implementation (``regoptim._sgd_impl``) and runs it."""
    if not params:
        return
    if has_sparse_grad and hyper.weight_decay != 0 and not hyper.decoupled_weight_decay:
        raise RuntimeError(
            "ProxSGD: coupled weight_decay does not support sparse gradients (neither does "
            "torch.optim.SGD); use decoupled_weight_decay=True or dense gradients"
        )
    impl = resolve_impl(
        params,
        grads,
        foreach=foreach,
        fused=fused,
        differentiable=differentiable,
        fused_ok=group_l1 == 0,
    )
    if differentiable and impl == "fused":
        raise RuntimeError("`fused` does not support `differentiable`")
    step = functools.partial(
        IMPLS[impl],
        params,
        grads,
        momentum_buffer_list,
        grad_scale,
        found_inf,
        hyper,
        has_sparse_grad=has_sparse_grad,
        # only the eager paths take the flag (the fused kernels refuse it above)
        **({"differentiable": True} if differentiable else {}),
    )
    call_fused(step, default_path=impl == "fused" and fused is None)

r"""ProxAdam and ProxAdamW: torch.optim.Adam/AdamW with a proximal L1 step in Adam's metric."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

from regoptim._adam_impl import run
from regoptim.backends.cpu import plan as _plan
from regoptim.backends.group_step import fused_group_adam_step
from regoptim.hyper import AdamHyper
from regoptim.optimizer import (
    Impl,
    ProxOptimizer,
    check_fused_params,
    resolve_impl,
    validate_betas,
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

__all__ = ["ProxAdam", "prox_adam"]


class ProxAdam(ProxOptimizer):
    r"""Adam with coupled L2 or decoupled weight decay and a proximal L1 step in Adam's metric.

    A drop-in replacement for :class:`torch.optim.Adam` (and, with
    ``decoupled_weight_decay=True``, for :class:`torch.optim.AdamW`): same arguments, defaults,
    state keys (``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``) and ``state_dict``
    format. With ``l1=0`` it computes exactly what torch computes.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)}, \beta_1, \beta_2 \text{ (betas)},
                \theta_0 \text{ (params)}, f(\theta) \text{ (objective)},
                \lambda \text{ (weight decay)}, \kappa \text{ (l1)}, \eta \text{ (group\_l1)},
                \epsilon,
                \textit{amsgrad}, \textit{maximize}, \textit{decoupled} \\
            &m_0 \leftarrow 0,\ v_0 \leftarrow 0,\ \hat v^{max}_0 \leftarrow 0 \\
            &\textbf{for}\ t=1\ \textbf{to}\ \ldots\ \textbf{do} \\
            &\quad g_t \leftarrow \nabla_\theta f_t(\theta_{t-1})
                \quad (g_t \leftarrow -g_t \textbf{ if } \textit{maximize}) \\
            &\quad \textbf{if}\ \lambda \neq 0 \textbf{ and not } \textit{decoupled}:
                \ g_t \leftarrow g_t + \lambda\theta_{t-1} && \text{1. coupled L2} \\
            &\quad \textbf{if}\ \lambda \neq 0 \textbf{ and } \textit{decoupled}:
                \ \theta_{t-1} \leftarrow \theta_{t-1}(1 - \gamma\lambda)
                && \text{3. decoupled decay} \\
            &\quad m_t \leftarrow \beta_1 m_{t-1} + (1-\beta_1) g_t \\
            &\quad v_t \leftarrow \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
            &\quad \hat v_t \leftarrow \max(\hat v^{max}_{t-1}, v_t)
                \textbf{ if } \textit{amsgrad} \textbf{ else } v_t \\
            &\quad d_t \leftarrow \sqrt{\hat v_t} / \sqrt{1-\beta_2^t} + \epsilon \\
            &\quad \theta_t \leftarrow \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\, m_t / d_t \\
            &\quad \textbf{if}\ \kappa \neq 0:
                \ \theta_t \leftarrow \operatorname{sign}(\theta_t)
                \max(|\theta_t| - \gamma\kappa / d_t,\ 0) && \text{5. proximal L1} \\
            &\quad \textbf{if}\ \eta \neq 0: \textbf{ for each group } g:
                \ \theta_{t,g} \leftarrow \operatorname{argmin}_x\ \gamma\eta\|x\|_2
                + \tfrac12 \textstyle\sum_i d_{t,i} (x_i - \theta_{t,g,i})^2
                && \text{6. group prox} \\
            &\textbf{return}\ \theta_t
       \end{aligned}

    The moments, bias corrections and amsgrad are exactly torch's. Step 5 is the exact proximal
    operator of :math:`\kappa\|\theta\|_1` in the metric of the preconditioned step
    (:math:`\operatorname{diag}(d_t)/\gamma`), as in ProxGen's AdamL1: each weight is
    soft-thresholded by :math:`\gamma\kappa/d_t`, with :math:`d_t` the same denominator the update
    used (the running max of :math:`v` under amsgrad). Weights the data do not support land on
    exact zeros.

    Step 6 (group lasso, ``group_l1 > 0``) is the exact prox of :math:`\eta\sum_g\|\theta_g\|_2`
    in the same metric; steps 5 then 6 are together the exact prox of the sparse group lasso
    :math:`\kappa\|\theta\|_1 + \eta\sum_g\|\theta_g\|_2`. With :math:`z = \theta_{t,g}` (after
    step 5) and :math:`c = \gamma\eta`: the group is exactly zero iff
    :math:`\|d \odot z\|_2 \le c`; otherwise :math:`x_i = d_i z_i \rho / (d_i \rho + c)`, where
    :math:`\rho = \|x\|_2` is the root in :math:`(0, \|z\|]` of
    :math:`\sum_i (d_i z_i / (d_i \rho + c))^2 = 1`, solved per group to the parameter's float
    precision (safeguarded Newton: per group in the fused kernels, vectorised over the groups in
    torch, ``regoptim.regularizers.group_lasso``; the C++ kernel solves groups with
    :math:`c \max_i 1/d_i \le \|z\|/256` from three moments instead, within :math:`2^{-30}`). Group
    :math:`g` is slice :math:`g` of every parameter of the param group along its axis in
    ``group_axes``. The prox covers the param group's parameters without a gradient this step too
    (the step leaves them as they are), with :math:`d` from their state's last update, or
    :math:`d = \epsilon` (Adam's :math:`v = 0`) if they have none yet; it does not run when no
    parameter of the group has a gradient.

    Args:
        params: iterable of parameters or named parameters to optimize, or of dicts defining
            parameter groups (every hyperparameter below may differ per group).
        lr: learning rate, a float or a 1-element tensor (default: 1e-3).
        betas: coefficients of the running averages of the gradient and its square, each in
            [0, 1): two floats, or two 1-element tensors (not with ``foreach=True`` unless
            ``capturable=True``), as torch takes them (default: (0.9, 0.999)).
        eps: term added to the denominator (default: 1e-8).
        weight_decay: weight decay :math:`\lambda` (default: 0).
        amsgrad: use the running maximum of :math:`v` (default: False).
        decoupled_weight_decay: AdamW's decoupled decay instead of the coupled L2 gradient
            (default: False).
        l1: L1 strength :math:`\kappa` of the proximal step (default: 0).
        group_l1: group lasso strength :math:`\eta` (default: 0), unweighted: every group has
            the same strength whatever its size (to weight by size, as Yuan & Lin, give each group
            size its own param group with ``group_l1`` times ``sqrt(group size)``). A param group
            whose parameters all have gradients and are contiguous tensors of one device and
            kernel dtype runs its step and group prox in one call of regoptim's fused kernels
            (C++ on CPU, Triton on CUDA; ``regoptim.backends.group_step``); any other runs the
            step, then the group prox in torch.
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
        foreach: use torch's foreach implementation (``None``: pick, as torch does). As in torch,
            a tensor ``lr`` cannot be combined with ``foreach=True`` unless ``capturable=True``.
        capturable: keep ``step`` on the parameters' device and never read it on the host, so
            the step can be captured in a CUDA graph (torch's meaning; torch's capturable
            for-loop/foreach paths with the prox in tensor arithmetic). As in torch, a step on
            devices torch does not capture (CPU) raises (default: False).
        differentiable: run the step with autograd on, as ``torch.optim.Adam(differentiable=True)``
            does, so gradients flow through it (the prox included); takes the for-loop, and cannot
            be combined with ``fused=True`` (default: False).
        fused: use regoptim's fused kernels: Triton on CUDA (also on CPU under
            ``TRITON_INTERPRET=1``), the fused C++ kernel on CPU. ``None`` (default): the Triton
            kernels for CUDA parameters when triton is installed; on CPU, regoptim's one-pass C++
            kernel (built at install time) for float32 groups, else torch's fused Adam kernel
            plus one pass for the prox. The parameters' devices and dtypes are checked when it
            steps, not at construction, as torch does.

    Note:
        For complex parameters torch keeps the moments per real and imaginary component; the prox
        shrinks each entry's modulus by :math:`\gamma\kappa/d`, with :math:`d` the mean of the two
        components' denominators. Sparse gradients are rejected, as by ``torch.optim.Adam``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = 1e-3,
        betas: tuple[float | Tensor, float | Tensor] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0,
        amsgrad: bool = False,
        *,
        decoupled_weight_decay: bool = False,
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
        if isinstance(betas, (tuple, list)) and len(betas) == 2:
            # as torch: a pair, 1-element tensors squeezed to 0-d (checked in _validate_group)
            betas = (_squeezed(betas[0]), _squeezed(betas[1]))
        defaults: dict[str, Any] = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "amsgrad": amsgrad,
            "decoupled_weight_decay": decoupled_weight_decay,
            "l1": l1,
            "group_l1": group_l1,
            "group_axes": group_axes,
            "decay_scaling": decay_scaling,
            "maximize": maximize,
            "foreach": foreach,
            "fused": fused,
            "capturable": capturable,
            "differentiable": differentiable,
        }
        super().__init__(params, defaults)

    def _validate_group(self, group: dict[str, Any]) -> None:
        validate_flag(group["capturable"], "capturable")
        validate_flag(group["differentiable"], "differentiable")
        validate_optional_flag(group["foreach"], "foreach")
        if isinstance(group["lr"], Tensor) and group["foreach"] and not group["capturable"]:
            raise ValueError(
                "lr as a Tensor is not supported for capturable=False and foreach=True"
            )
        validate_lr(group["lr"], differentiable=group["differentiable"])
        validate_non_negative(group["eps"], "eps", "epsilon value")
        validate_betas(group["betas"], capturable=group["capturable"], foreach=group["foreach"])
        validate_non_negative(group["weight_decay"], "weight_decay")
        validate_non_negative(group["l1"], "l1")
        validate_group_lasso(group)
        validate_flag(group["amsgrad"], "amsgrad")
        validate_flag(group["decoupled_weight_decay"], "decoupled_weight_decay")
        validate_decay_scaling(group)
        validate_flag(group["maximize"], "maximize")
        validate_optional_flag(group["fused"], "fused")
        if group["fused"] and group["differentiable"]:
            raise RuntimeError("`fused` does not support `differentiable`")
        if group["fused"] and group["foreach"]:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("fused", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", self._default_decoupled())
            group.setdefault("l1", 0.0)
            group.setdefault("group_l1", 0.0)
            group.setdefault("decay_scaling", "lr")
            group.setdefault("group_axes", None)
            for p in group["params"]:
                p_state = self.state.get(p, {})
                if len(p_state) != 0 and not torch.is_tensor(p_state["step"]):
                    on_param = group["capturable"] or group["fused"]
                    p_state["step"] = torch.tensor(
                        float(p_state["step"]),
                        dtype=torch.float32 if group["fused"] else _scalar_dtype(),
                        device=p.device if on_param else None,
                    )

    @staticmethod
    def _default_decoupled() -> bool:
        return False

    def _init_group(
        self,
        group: dict[str, Any],
        impl: Impl,
        params: list[Tensor],
        grads: list[Tensor],
        exp_avgs: list[Tensor],
        exp_avg_sqs: list[Tensor],
        max_exp_avg_sqs: list[Tensor],
        state_steps: list[Tensor],
    ) -> bool:
        has_complex = False
        fused_steps = impl in ("fused", "torch_fused")
        capturable = group["capturable"]
        for p in group["params"]:
            if p.grad is None:
                continue
            params.append(p)
            has_complex |= torch.is_complex(p)
            if p.grad is not None and p.grad.is_sparse:
                raise RuntimeError(
                    "ProxAdam does not support sparse gradients (as torch.optim.Adam); "
                    "use dense gradients or ProxSGD"
                )
            grads.append(p.grad)  # type: ignore[arg-type]
            state = self.state[p]
            if len(state) == 0:
                # torch's placement: a float32 step on the param's device for fused kernels, a
                # step on the param's device when capturable, a CPU scalar otherwise
                state["step"] = (
                    torch.zeros((), dtype=torch.float32, device=p.device)
                    if fused_steps
                    else torch.zeros((), dtype=_scalar_dtype(), device=p.device)
                    if capturable
                    else torch.tensor(0.0, dtype=_scalar_dtype())
                )
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
            elif fused_steps and (
                state["step"].device != p.device or state["step"].dtype != torch.float32
            ):
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)
            if group["differentiable"] and state["step"].requires_grad:
                raise RuntimeError(
                    "`requires_grad` is not supported for `step` in differentiable mode"
                )
            if group["amsgrad"] and "max_exp_avg_sq" not in state:
                # amsgrad switched on mid-run: the running max starts from the current v
                state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            if group["amsgrad"]:
                max_exp_avg_sqs.append(state["max_exp_avg_sq"])
            state_steps.append(state["step"])
        if group["fused"]:
            check_fused_params(params)
        return has_complex

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform one optimization step; returns the closure's loss (``None`` without one)."""
        return self._step_groups(closure, self._step_group)

    def _step_group(self, group: dict[str, Any]) -> None:
        if _plan.adam_step(self, group):  # the cached C++ CPU path (regoptim/backends/cpu/plan.py)
            return
        self._dispatch_group(group)
        _plan.build(self, group, "adam")

    def _dispatch_group(self, group: dict[str, Any]) -> None:
        if group["group_l1"] != 0:  # group_axes edited in place: caught before any update
            axes = resolve_group_axes(group["params"], group["group_axes"])
            if fused_group_adam_step(self, group, axes):  # update and group prox in one kernel call
                return
        probe = [p for p in group["params"] if p.grad is not None]
        if not probe:
            return
        grads_probe = [p.grad for p in probe]
        impl = resolve_impl(
            probe,  # type: ignore[arg-type]
            grads_probe,  # type: ignore[arg-type]
            foreach=group["foreach"],
            fused=group["fused"],
            torch_fused_ok=not isinstance(group["betas"][0], Tensor),
            differentiable=group["differentiable"],
            capturable=group["capturable"],
            fused_ok=group["group_l1"] == 0,
        )
        params: list[Tensor] = []
        grads: list[Tensor] = []
        exp_avgs: list[Tensor] = []
        exp_avg_sqs: list[Tensor] = []
        max_exp_avg_sqs: list[Tensor] = []
        state_steps: list[Tensor] = []
        has_complex = self._init_group(
            group, impl, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps
        )
        weight_decay = predecay_(self, group, params)  # decay_scaling other than "lr"
        lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        run(
            impl,
            lists,
            AdamHyper.from_group(group, weight_decay),
            getattr(self, "grad_scale", None),
            getattr(self, "found_inf", None),
            has_complex,
            group["capturable"],
            group["differentiable"],
            group["fused"],
        )
        if group["group_l1"] != 0:
            apply_group_prox_(self, group, adam=True)


def _squeezed(beta: Any) -> Any:
    """torch's ``_to_scalar``: a 1-element tensor as a 0-d tensor, anything else as it is."""
    return beta.squeeze() if isinstance(beta, Tensor) and beta.dim() != 0 else beta


def prox_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    foreach: bool | None = None,
    fused: bool | None = None,
    grad_scale: Tensor | None = None,
    found_inf: Tensor | None = None,
    has_complex: bool = False,
    decoupled_weight_decay: bool = False,
    *,
    amsgrad: bool,
    beta1: float,
    beta2: float,
    lr: float | Tensor,
    weight_decay: float,
    eps: float,
    maximize: bool,
    l1: float = 0.0,
    group_l1: float = 0.0,
    capturable: bool = False,
    differentiable: bool = False,
) -> None:
    """Functional ProxAdam: picks the implementation and runs one step. See :class:`ProxAdam`.

    The state tensors must already exist (zeros and a 0-d ``step`` tensor on the first step).
    ``group_l1`` only steers the choice of implementation (a non-zero value keeps the default path
    off regoptim's fused kernels): the group prox needs every parameter of the param group, so
    :class:`ProxAdam` applies it after this step (``regoptim.regularizers.group_lasso``).
    """
    if not params:
        return
    impl = resolve_impl(
        params,
        grads,
        foreach=foreach,
        fused=fused,
        torch_fused_ok=not isinstance(beta1, Tensor),
        differentiable=differentiable,
        capturable=capturable,
        fused_ok=group_l1 == 0,
    )
    hyper = AdamHyper(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        decoupled_weight_decay=decoupled_weight_decay,
        amsgrad=amsgrad,
        maximize=maximize,
        l1=l1,
    )
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
    run(impl, lists, hyper, grad_scale, found_inf, has_complex, capturable, differentiable, fused)


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32

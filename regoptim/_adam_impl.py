"""The implementations behind :func:`regoptim.adam.prox_adam`, with one shared signature.

``(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, grad_scale, found_inf,
hyper, *, has_complex)``: torch's for-loop and foreach Adam plus regoptim's prox pass (``loop``,
``foreach``, which also take ``capturable`` and ``differentiable``), torch's fused CPU kernel plus
the pass (``torch_fused``), and regoptim's fused kernels (``fused``: Triton on CUDA, C++ on CPU,
through ``regoptim.backends.dispatch``), as torch.optim.adam's ``_single_tensor_adam`` /
``_multi_tensor_adam`` / ``_fused_adam``. ``hyper`` is the step's
:class:`~regoptim.hyper.AdamHyper`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.optim.adam as _torch_adam
from torch import Tensor

from regoptim.backends.dispatch import call_fused
from regoptim.backends.guard import eager_context, eager_indices, renumbered, torch_fused_split
from regoptim.hyper import AdamHyper
from regoptim.optimizer import Impl, group_tensors, on_device, unscale_or_skip
from regoptim.regularizers.l1 import adam_prox_l1_

__all__ = ["IMPLS", "run"]


def _eager_prox_adam(
    impl: Impl,
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    hyper: AdamHyper,
    *,
    has_complex: bool,
    capturable: bool = False,
    differentiable: bool = False,
) -> None:
    # torch.optim's own Adam does everything but the prox, which follows in a second pass that
    # rebuilds the update's denominator from the state torch just wrote.
    if (grad_scale is not None or found_inf is not None) and unscale_or_skip(
        grads, grad_scale, found_inf
    ):
        return
    h = hyper
    _torch_adam.adam(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        foreach=impl == "foreach",
        fused=impl == "torch_fused",
        # under torch.compile dynamo sets "capturable" to True in torch's own optimizers' groups;
        # torch's non-capturable foreach Adam does not trace on CPU
        capturable=capturable or torch.compiler.is_compiling(),
        differentiable=differentiable,
        has_complex=has_complex,
        decoupled_weight_decay=h.decoupled_weight_decay,
        amsgrad=h.amsgrad,
        beta1=h.beta1,
        beta2=h.beta2,
        lr=h.lr,
        weight_decay=h.weight_decay,
        eps=h.eps,
        maximize=h.maximize,
    )
    if h.l1 != 0:
        adam_prox_l1_(
            params,
            max_exp_avg_sqs if h.amsgrad else exp_avg_sqs,
            state_steps,
            lr=h.lr,
            beta2=h.beta2,
            eps=h.eps,
            l1=h.l1,
            foreach=impl in ("foreach", "torch_fused"),
            on_device_step=capturable or differentiable,
            differentiable=differentiable,
        )


def _fused_prox_adam(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    hyper: AdamHyper,
    *,
    has_complex: bool,
) -> None:
    from regoptim.backends.dispatch import fused_prox_adam_

    amsgrad = hyper.amsgrad
    all_params = params
    cplx, mixed = eager_indices(
        _FUSED_DTYPES, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else None
    )
    if cplx:
        # complex parameters (their prox couples the two components), dtypes the kernels do not
        # store (float64), and grads/state of another dtype than their param (as torch allows)
        # take torch's for-loop; the rest stay fused
        lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps)
        pick = [[lst[i] for i in cplx] if lst else [] for lst in lists]
        with eager_context("ProxAdam fused step", mixed):
            _eager_prox_adam("loop", *pick, grad_scale, found_inf, hyper, has_complex=has_complex)  # type: ignore[arg-type]
        eager = set(cplx)
        keep = [i for i in range(len(params)) if i not in eager]
        rest = [[lst[i] for i in keep] if lst else [] for lst in lists]
        if not rest[0]:
            return
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = rest
    tensorlists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps]
    with renumbered(all_params):  # errors name the index in `params`, not in a device group
        for (device, _), ((dps, dgs, dms, dvs, dvmaxs, dsteps), _) in group_tensors(tensorlists):  # type: ignore[arg-type]
            fused_prox_adam_(
                dps,
                dgs,
                dms,
                dvs,
                dvmaxs if amsgrad else None,
                dsteps,
                hyper.on(device),
                grad_scale=on_device(grad_scale, device),
                found_inf=on_device(found_inf, device),
            )


# real dtypes regoptim's fused kernels store
_FUSED_DTYPES = frozenset((torch.float32, torch.bfloat16, torch.float16))


def _loop(*args: Any, **kwargs: Any) -> None:
    _eager_prox_adam("loop", *args, **kwargs)


def _foreach(*args: Any, **kwargs: Any) -> None:
    _eager_prox_adam("foreach", *args, **kwargs)


def _torch_fused(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor],
    state_steps: list[Tensor],
    *args: Any,
    **kwargs: Any,
) -> None:
    lists = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps]
    shaped = lists[:5] if args[2].amsgrad else lists[:4]  # args: grad_scale, found_inf, hyper
    names = ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    where = "ProxAdam step (torch's fused kernel)"
    with renumbered(params):
        eager, mixed = torch_fused_split(where, names, shaped, state_steps)
    if not eager:
        _eager_prox_adam("torch_fused", *lists, *args, **kwargs)
        return
    eager_set = set(eager)
    keep = [i for i in range(len(params)) if i not in eager_set]
    for impl, idx in (("loop", eager), ("torch_fused", keep)):
        if idx:
            sub = [[lst[i] for i in idx] if lst else [] for lst in lists]
            with renumbered(params), eager_context(where, mixed if impl == "loop" else []):
                _eager_prox_adam(impl, *sub, *args, **kwargs)  # type: ignore[arg-type]


IMPLS: dict[str, Callable[..., None]] = {
    "loop": _loop,
    "foreach": _foreach,
    "torch_fused": _torch_fused,
    "fused": _fused_prox_adam,
}


def run(
    impl: Impl,
    lists: tuple[list[Tensor], ...],
    hyper: AdamHyper,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    has_complex: bool,
    capturable: bool,
    differentiable: bool,
    fused: bool | None,
) -> None:
    """Run implementation ``impl`` (``regoptim._adam_impl``) on one step's ``lists``."""
    step = functools.partial(
        IMPLS[impl],
        *lists,
        grad_scale,
        found_inf,
        hyper,
        has_complex=has_complex,
        **_eager_flags(impl, capturable, differentiable),
    )
    call_fused(step, default_path=impl == "fused" and fused is None)


def _eager_flags(impl: Impl, capturable: bool, differentiable: bool) -> dict[str, bool]:
    """``capturable``/``differentiable`` for the eager paths only (the fused kernels take neither:
    fused with differentiable is refused, and they keep ``step`` on the device themselves)."""
    if impl == "fused":
        if differentiable:
            raise RuntimeError("`fused` does not support `differentiable`")
        return {}
    return {"capturable": capturable, "differentiable": differentiable}

"""The implementations behind :func:`regoptim.sgd.prox_sgd`, with one shared signature.

``(params, grads, momentum_buffer_list, grad_scale, found_inf, hyper, *, has_sparse_grad)``:
torch's for-loop and foreach SGD plus regoptim's passes (``loop``, ``foreach``), torch's fused CPU
kernel plus the passes (``torch_fused``), and regoptim's fused kernels (``fused``: Triton on CUDA,
C++ on CPU, through ``regoptim.backends.dispatch``), as torch.optim.sgd's ``_single_tensor_sgd`` /
``_multi_tensor_sgd`` / ``_fused_sgd``. ``hyper`` is the step's :class:`~regoptim.hyper.SgdHyper`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.optim.sgd as _torch_sgd
from torch import Tensor

from regoptim.backends.guard import eager_context, eager_indices, renumbered, torch_fused_split
from regoptim.hyper import SgdHyper
from regoptim.optimizer import Impl, group_tensors, on_device, unscale_or_skip
from regoptim.regularizers.l1 import prox_l1_
from regoptim.regularizers.weight_decay import decay_

__all__ = ["IMPLS"]


def _eager_prox_sgd(
    impl: Impl,
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    hyper: SgdHyper,
    *,
    has_sparse_grad: bool,
    differentiable: bool = False,
) -> None:
    # torch.optim's own SGD does steps 1, 2 and 4; regoptim adds 3 (decoupled decay, which may
    # run before torch's step because, decoupled, the gradient no longer depends on the weights)
    # and 5 (the prox, after it).
    if (grad_scale is not None or found_inf is not None) and unscale_or_skip(
        grads, grad_scale, found_inf
    ):
        return
    h = hyper
    if h.weight_decay != 0 and h.decoupled_weight_decay:
        decay_(params, h.lr, h.weight_decay, foreach=impl == "foreach")
    _torch_sgd.sgd(
        params,
        grads,
        momentum_buffer_list,
        has_sparse_grad=has_sparse_grad,
        foreach=impl == "foreach",
        fused=impl == "torch_fused",
        weight_decay=0.0 if h.decoupled_weight_decay else h.weight_decay,
        momentum=h.momentum,
        lr=h.lr,  # type: ignore[arg-type]
        dampening=h.dampening,
        nesterov=h.nesterov,
        maximize=h.maximize,
    )
    if h.l1 != 0:
        prox_l1_(
            params,
            h.lr,
            h.l1,
            foreach=impl in ("foreach", "torch_fused"),
            differentiable=differentiable,
        )


def _single_tensor_prox_sgd(*args: Any, **kwargs: Any) -> None:
    _eager_prox_sgd("loop", *args, **kwargs)


def _multi_tensor_prox_sgd(*args: Any, **kwargs: Any) -> None:
    _eager_prox_sgd("foreach", *args, **kwargs)


def _torch_fused_prox_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    hyper: SgdHyper,
    **kwargs: Any,
) -> None:
    use_momentum = hyper.momentum != 0
    where = "ProxSGD step (torch's fused kernel)"

    def run(ps: list[Tensor], gs: list[Tensor], bufs: list[Tensor | None]) -> None:
        # torch's fused SGD takes a group whose buffers are either all new or all existing.
        lists = [ps, gs, bufs] if use_momentum and bufs[0] is not None else [ps, gs]
        with renumbered(params):
            eager, mixed = torch_fused_split(where, ["param", "grad", "momentum_buffer"], lists)  # type: ignore[arg-type]
        if not eager:
            _eager_prox_sgd("torch_fused", ps, gs, bufs, grad_scale, found_inf, hyper, **kwargs)
            return
        eager_set = set(eager)
        keep = [i for i in range(len(ps)) if i not in eager_set]
        for impl, idx in (("loop", eager), ("torch_fused", keep)):
            sub_bufs = [bufs[i] for i in idx] if use_momentum else []
            with renumbered(params), eager_context(where, mixed if impl == "loop" else []):
                if idx:
                    _eager_prox_sgd(
                        impl, [ps[i] for i in idx], [gs[i] for i in idx], sub_bufs,
                        grad_scale, found_inf, hyper, **kwargs,
                    )  # fmt: skip
            for i, b in zip(idx if use_momentum else [], sub_bufs, strict=True):
                bufs[i] = b

    _for_each_first_step_split(params, grads, momentum_buffer_list, use_momentum, run)


def _fused_prox_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
    hyper: SgdHyper,
    *,
    has_sparse_grad: bool,
) -> None:
    from regoptim.backends.dispatch import fused_prox_sgd_

    if has_sparse_grad:  # pragma: no cover - resolve_impl routes sparse gradients away
        raise RuntimeError("regoptim's fused kernels do not take sparse gradients")
    use_momentum = hyper.momentum != 0
    eager, mixed = eager_indices(
        _FUSED_DTYPES, params, grads, momentum_buffer_list if use_momentum else None
    )
    if eager:
        # float64/complex128 and other dtypes the kernels do not store, and grads/buffers of
        # another dtype than their param (as torch allows), take torch's for-loop
        eager_set = set(eager)
        keep = [i for i in range(len(params)) if i not in eager_set]
        for idx, fn in ((eager, _single_tensor_prox_sgd), (keep, _fused_prox_sgd)):
            if not idx:
                continue
            sub_bufs = [momentum_buffer_list[i] for i in idx] if use_momentum else []
            named = mixed if fn is _single_tensor_prox_sgd else []
            with renumbered(params), eager_context("ProxSGD fused step", named):
                fn(
                    [params[i] for i in idx],
                    [grads[i] for i in idx],
                    sub_bufs,
                    grad_scale,
                    found_inf,
                    hyper,
                    has_sparse_grad=False,
                )
            for i, b in zip(idx if use_momentum else [], sub_bufs, strict=True):
                momentum_buffer_list[i] = b
        return

    def run(ps: list[Tensor], gs: list[Tensor], bufs: list[Tensor | None]) -> None:
        for (device, _), ((dps, dgs, dbufs), idx) in group_tensors([ps, gs, bufs]):
            first = use_momentum and dbufs[0] is None
            if first:
                if found_inf is not None and bool(found_inf.to("cpu")):
                    # A skipped first step must leave no momentum buffer behind (the next step
                    # is the first). This reads found_inf on the host once, on the first step.
                    continue
                for j, i in enumerate(idx):
                    dbufs[j] = bufs[i] = torch.empty_like(
                        gs[i], memory_format=torch.preserve_format
                    )
            fused_prox_sgd_(
                dps,
                dgs,
                dbufs if use_momentum else None,  # type: ignore[arg-type]
                hyper.on(device),
                is_first_step=first,
                grad_scale=on_device(grad_scale, device),
                found_inf=on_device(found_inf, device),
            )

    with renumbered(params):  # errors name the index in `params`, not in a device group
        _for_each_first_step_split(params, grads, momentum_buffer_list, use_momentum, run)


# dtypes regoptim's fused kernels (Triton and C++) store; others take the eager path
_FUSED_DTYPES = frozenset((torch.float32, torch.bfloat16, torch.float16, torch.complex64))


def _for_each_first_step_split(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor | None],
    use_momentum: bool,
    run: Callable[[list[Tensor], list[Tensor], list[Tensor | None]], None],
) -> None:
    """Call ``run`` on the params whose buffer is new, then on those whose buffer exists.

    New buffers created by ``run`` are written back into ``bufs``.
    """
    if not use_momentum:
        run(params, grads, bufs)
        return
    # both index sets before either run: the first creates buffers, which must not put its
    # params in the second set too (they would take a second step)
    new_idx = [i for i, b in enumerate(bufs) if b is None]
    new_set = set(new_idx)
    old_idx = [i for i in range(len(bufs)) if i not in new_set]
    for idx in (new_idx, old_idx):
        if not idx:
            continue
        if len(idx) == len(params):
            run(params, grads, bufs)
            return
        sub_bufs = [bufs[i] for i in idx]
        run([params[i] for i in idx], [grads[i] for i in idx], sub_bufs)
        for i, b in zip(idx, sub_bufs, strict=True):
            bufs[i] = b


IMPLS: dict[str, Callable[..., None]] = {
    "loop": _single_tensor_prox_sgd,
    "foreach": _multi_tensor_prox_sgd,
    "torch_fused": _torch_fused_prox_sgd,
    "fused": _fused_prox_sgd,
}

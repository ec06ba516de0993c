"""The fused group-lasso step: the update and the group prox of a param group in one kernel call.

With ``group_l1 > 0`` a param group's step is the family's update followed by the group prox over
*all* of the group's parameters (``regoptim.regularizers.group_lasso``). When the group qualifies, one call of a
fused backend does both, reducing each group's norm across its tensors in cache:

* CPU tensors: the C++ kernel (``regoptim.backends.cpu.group``), on the default path (float32, the kernel
  built at install) and under ``fused=True``;
* CUDA tensors (and CPU tensors under ``fused=True`` while ``TRITON_INTERPRET=1``): the Triton
  kernels (``regoptim._kernels``), one launch per param group whatever its number of tensors.

A group qualifies when every parameter has a gradient, all are plain dense tensors of one device
and one real dtype the kernels store (float32, bfloat16, float16) with gradients and state of the
same dtype and the parameters' strides, and the step is neither differentiable, capturable nor
traced. Anything else takes the unfused path (the family's step, then the eager group prox),
which the tests hold to the same reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from regoptim.backends.dispatch import fused_backend, fused_unavailable_reason
from regoptim.hyper import AdamHyper, GroupLasso, SgdHyper
from regoptim.optimizer import resolve_impl
from regoptim.regularizers.weight_decay import predecay_

__all__ = ["fused_group_adam_step", "fused_group_sgd_step"]

_KERNEL_DTYPES = frozenset((torch.float32, torch.bfloat16, torch.float16))
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _backend(device_type: str, default_path: bool) -> Any:
    """The module whose ``fused_group_sgd_`` / ``fused_group_adam_`` serve ``device_type``."""
    backend = "cpu" if default_path and device_type == "cpu" else fused_backend(device_type)
    if backend == "cpu":
        import regoptim.backends.cpu.group as mod
    else:
        import regoptim._kernels as mod
    return mod


def _qualifies(group: dict[str, Any], extra: list[list[Tensor]]) -> tuple[bool, bool]:
    """(whether the fused group step serves ``group``, whether on the default path)."""
    if group["differentiable"] or group.get("capturable", False):
        return False, False
    if torch.compiler.is_compiling():
        return False, False
    params: list[Tensor] = group["params"]
    grads = [p.grad for p in params]
    if not params or any(g is None for g in grads):
        return False, False
    impl = resolve_impl(
        params,
        grads,  # type: ignore[arg-type]
        foreach=group["foreach"],
        fused=group["fused"],
        differentiable=False,
    )
    if impl != "fused":
        return False, False
    default_path = group["fused"] is None
    device = params[0].device
    dtype = params[0].dtype
    if dtype not in _KERNEL_DTYPES:
        return False, default_path
    for t in [*params, *grads, *(s for lst in extra for s in lst)]:
        if (
            type(t) not in _PLAIN
            or t.device != device
            or t.dtype != dtype
            or t.is_sparse
            or not t.is_contiguous()
        ):
            return False, default_path
    if fused_unavailable_reason(device.type) is not None and not (
        default_path and device.type == "cpu"
    ):
        return False, default_path
    return True, default_path


def fused_group_sgd_step(opt: Any, group: dict[str, Any], axes: list[int]) -> bool:
    """ProxSGD's step of ``group`` (update and group prox) through a fused backend, if the group
    qualifies; returns whether it ran (False: nothing was touched). ``axes``: the group's
    ``resolve_group_axes``."""
    if group["group_l1"] == 0:
        return False
    params: list[Tensor] = group["params"]
    use_momentum = group["momentum"] != 0
    bufs = [opt.state[p].get("momentum_buffer") for p in params] if use_momentum else []
    existing = [b for b in bufs if b is not None]
    if existing and len(existing) != len(bufs):  # a mix of new and old buffers: unfused
        return False
    ok, default_path = _qualifies(group, [existing])
    if not ok:
        return False
    module = _backend(params[0].device.type, default_path)
    grads: list[Tensor] = [p.grad for p in params]  # type: ignore[misc]
    found_inf = getattr(opt, "found_inf", None)
    first = use_momentum and not existing
    if first and found_inf is not None and bool(found_inf.to("cpu")):
        return True  # a skipped first step leaves no buffer behind (and no update, no prox)
    weight_decay = predecay_(opt, group, params)  # decay_scaling other than "lr"
    hyper = SgdHyper.from_group(group, weight_decay)
    lasso = GroupLasso(group_l1=group["group_l1"], axes=tuple(axes))
    if first:
        bufs = [torch.empty_like(g, memory_format=torch.preserve_format) for g in grads]
    module.fused_group_sgd_(
        params,
        grads,
        bufs if use_momentum else None,
        hyper,
        lasso,
        is_first_step=first,
        grad_scale=getattr(opt, "grad_scale", None),
        found_inf=found_inf,
    )
    if first:
        for p, b in zip(params, bufs, strict=True):
            opt.state[p]["momentum_buffer"] = b
    return True


def fused_group_adam_step(opt: Any, group: dict[str, Any], axes: list[int]) -> bool:
    """ProxAdam(W)'s step of ``group`` (update and group prox) through a fused backend, if the
    group qualifies; returns whether it ran (False: nothing was touched). ``axes``: the group's
    ``resolve_group_axes``."""
    if group["group_l1"] == 0 or isinstance(group["betas"][0], Tensor):
        return False
    params: list[Tensor] = group["params"]
    states = [opt.state.get(p, {}) for p in params]
    keys = ["exp_avg", "exp_avg_sq", *(["max_exp_avg_sq"] if group["amsgrad"] else [])]
    existing = [[s[k] for s in states if k in s] for k in keys]
    if any(0 < len(lst) < len(params) for lst in existing):  # some params without state: unfused
        return False
    ok, default_path = _qualifies(group, existing)
    if not ok:
        return False
    module = _backend(params[0].device.type, default_path)
    lists: tuple[list[Tensor], ...] = ([], [], [], [], [], [])
    params_, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps = lists
    opt._init_group(group, "fused", params_, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps)
    weight_decay = predecay_(opt, group, params_)  # decay_scaling other than "lr"
    hyper = AdamHyper.from_group(group, weight_decay)
    lasso = GroupLasso(group_l1=group["group_l1"], axes=tuple(axes))
    module.fused_group_adam_(
        params_,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs if group["amsgrad"] else None,
        steps,
        hyper,
        lasso,
        grad_scale=getattr(opt, "grad_scale", None),
        found_inf=getattr(opt, "found_inf", None),
    )
    return True

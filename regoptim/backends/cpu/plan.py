"""Cached per-group plans for the C++ CPU kernel: no per-step dispatch.

The default CPU path (no ``foreach`` / ``fused`` argument, float32 CPU tensors) and ``fused=True``
on CPU (float32, bfloat16, float16) run the fused C++ kernel. Dispatching it afresh every step (which implementation, which tensors go where, the
dtype split, the pointer table) costs more Python than the kernel costs on a small model, so once
a step has taken that path the optimizer keeps a plan per param group: the tensors it was checked
for, the checked pointer table and the state keys it reads. A later step uses the plan only if
everything the plan depends on is as it was:

* the group's parameters (the same objects), the optimizer's ``state`` mapping, and the group's
  structural flags (``foreach``, ``fused``, ``differentiable``, ``capturable``, whether momentum
  is on, amsgrad);
* every param, grad and state tensor's dtype, device, sizes, strides, type and conj/neg bits
  (one C++ call, :class:`_MetaGuard`) and data pointer: a grad that moved (fresh every step) is
  re-pointed, its metadata being that of the grad the table was checked with; anything else falls
  back to the full dispatch, which checks (:mod:`regoptim.backends.guard`) and rebuilds;
* no GradScaler hand-off (``grad_scale`` / ``found_inf``), no tracing.

Values a schedule changes (lr, momentum, weight decay, l1, betas, eps) are read from the group
every step; they were validated by the optimizer before the step (``ProxOptimizer._revalidate``).
"""

from __future__ import annotations

from itertools import repeat
from operator import attrgetter, is_
from typing import Any

import torch
from torch import Tensor

from regoptim.backends.cpu import kernel as _cpu_fused
from regoptim.backends.dispatch import fused_backend
from regoptim.backends.guard import role_key
from regoptim.hyper import AdamHyper, SgdHyper
from regoptim.optimizer import _cpu_kernel_installed, resolve_impl

__all__ = ["Plan", "adam_step", "build", "sgd_step"]

_GRAD = attrgetter("grad")
_IS_CPU = attrgetter("is_cpu")
_PTR = Tensor.data_ptr
_MISSES_BEFORE_GIVING_UP = 8


def _structure(group: dict[str, Any], family: str) -> tuple:
    # group lasso needs the group prox after the kernel: never a plan (the full dispatch runs it)
    flags = (
        group["foreach"],
        group["fused"],
        group.get("differentiable", False),
        group.get("group_l1", 0) != 0,
        group.get("decay_scaling", "lr"),  # not "lr": the decay runs before the kernel
    )
    if family == "sgd":
        return (*flags, group["momentum"] != 0)
    betas_are_tensors = isinstance(group["betas"][0], Tensor)
    return (*flags, group.get("capturable", False), group["amsgrad"], betas_are_tensors)


def _state_keys(group: dict[str, Any], family: str) -> list[str]:
    if family == "sgd":
        return ["momentum_buffer"] if group["momentum"] != 0 else []
    keys = ["exp_avg", "exp_avg_sq"]
    return [*keys, "max_exp_avg_sq", "step"] if group["amsgrad"] else [*keys, "step"]


class _MetaGuard:
    """Checks that tensors still have the dtype, device, sizes, strides, type, requires_grad and
    dispatch keys (conj/neg bits included) they had when it was made: in one C++ call through
    dynamo's ``TensorGuards`` (about 50 ns a tensor), else in Python columns."""

    __slots__ = ("_guard", "_key")

    def __init__(self, tensors: list[Tensor]) -> None:
        self._guard = None
        try:
            from torch._C._dynamo.guards import TensorGuards

            self._guard = TensorGuards(
                *tensors,
                dynamic_dims_sizes=[list(t.size()) for t in tensors],
                dynamic_dims_strides=[list(t.stride()) for t in tensors],
            )
            if not self._guard.check(*tensors):  # pragma: no cover - an API that changed
                self._guard = None
        except Exception:  # pragma: no cover - a torch without it
            self._guard = None
        self._key = None if self._guard is not None else _meta_key(tensors)

    def check(self, tensors: list[Tensor]) -> bool:
        if self._guard is not None:
            return bool(self._guard.check(*tensors))
        return _meta_key(tensors) == self._key


def _meta_key(tensors: list[Tensor]) -> tuple:
    # regoptim.backends.guard's role key without the pointers, plus the types and the device
    complex_group = any(t.is_complex() for t in tensors)
    return (
        role_key(tensors, complex_group)[1:],
        tuple(map(type, tensors)),
        all(map(_IS_CPU, tensors)),
    )


class Plan:
    """A checked pointer table for one param group on the default CPU path."""

    __slots__ = (
        "dtype", "family", "guard", "ids", "ptrs", "params", "state", "state_keys", "structure",
        "table",
    )  # fmt: skip

    def __init__(
        self,
        family: str,
        group: dict[str, Any],
        state: Any,
        lists: list[list[Tensor]],
        table: _cpu_fused._Table,
    ) -> None:
        self.family = family
        self.dtype = lists[0][0].dtype
        self.params = list(group["params"])
        self.ids = list(map(id, self.params))
        self.state = state
        self.structure = _structure(group, family)
        self.state_keys = _state_keys(group, family)
        self.guard = _MetaGuard([t for lst in lists for t in lst])
        self.ptrs = [list(map(_PTR, lst)) for lst in lists]
        self.table = table

    def lists(self, opt: torch.optim.Optimizer, group: dict[str, Any]) -> list[list] | None:
        """The tensors of this step, if the plan still describes them; else ``None``."""
        params = group["params"]
        if (
            opt.state is not self.state
            or getattr(opt, "grad_scale", None) is not None
            or getattr(opt, "found_inf", None) is not None
            or list(map(id, params)) != self.ids
            or _structure(group, self.family) != self.structure
            or (group["fused"] and fused_backend("cpu") != "cpu")  # TRITON_INTERPRET=1 now
        ):
            return None
        grads = list(map(_GRAD, params))
        if any(map(is_, grads, repeat(None))):
            return None
        states = list(map(self.state.get, params))
        if any(map(is_, states, repeat(None))):
            return None
        lists = [params, grads]
        for name in self.state_keys:
            lst = [s.get(name) for s in states]
            if any(map(is_, lst, repeat(None))):
                return None
            lists.append(lst)
        if not self.guard.check([t for lst in lists for t in lst]):
            return None
        ptrs = self.ptrs
        if list(map(_PTR, params)) != ptrs[0]:
            return None
        for r in range(2, len(lists)):
            if list(map(_PTR, lists[r])) != ptrs[r]:
                return None
        grad_ptrs = list(map(_PTR, grads))
        if grad_ptrs != ptrs[1]:  # fresh grads, with their params' layout (the guard): re-point
            self.table.tensor[2] = torch.tensor(grad_ptrs, dtype=torch.int64)
            ptrs[1] = grad_ptrs
        return lists


def _plans(opt: torch.optim.Optimizer) -> dict[int, Plan]:
    return opt.__dict__.setdefault("_cpu_plans", {})


def _misses(opt: torch.optim.Optimizer) -> dict[int, int]:
    return opt.__dict__.setdefault("_cpu_plan_misses", {})


def _run(opt: torch.optim.Optimizer, group: dict[str, Any], family: str) -> bool:
    plan = _plans(opt).get(id(group))
    if plan is None or torch.compiler.is_compiling():
        return False
    if plan.lists(opt, group) is None:
        _miss(opt, group)
        return False
    # decay_scaling other than "lr" never has a plan, so the group's weight_decay is the step's
    if family == "sgd":
        sgd = SgdHyper.from_group(group, group["weight_decay"])
        _cpu_fused.run_sgd(plan.table, plan.dtype, sgd, is_first_step=False, grad_scale=None)
    else:
        adam = AdamHyper.from_group(group, group["weight_decay"])
        _cpu_fused.run_adam(plan.table, plan.dtype, adam, grad_scale=None)
    return True


def sgd_step(opt: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Step ``group`` of a ProxSGD through its plan; ``False``: no valid plan, nothing done."""
    return _run(opt, group, "sgd")


def adam_step(opt: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Step ``group`` of a ProxAdam(W) through its plan; ``False``: no valid plan, nothing done."""
    return _run(opt, group, "adam")


def _miss(opt: torch.optim.Optimizer, group: dict[str, Any]) -> None:
    misses = _misses(opt)
    misses[id(group)] = misses.get(id(group), 0) + 1
    _plans(opt).pop(id(group), None)


def build(opt: torch.optim.Optimizer, group: dict[str, Any], family: str) -> None:
    """After a step by the full dispatch: keep a plan for ``group`` if that step took the C++
    kernel on the default path and the next one can (every param has a grad and its state), with
    the tensors fully checked now. A group whose plans keep missing, or that cannot have one (a
    dtype or layout the kernel does not serve), stops being tried: the attempt is not free."""
    if torch.compiler.is_compiling():  # traced steps take torch's paths, never a plan
        return
    plans = _plans(opt)
    if id(group) in plans or _misses(opt).get(id(group), 0) >= _MISSES_BEFORE_GIVING_UP:
        return
    plan = _new_plan(opt, group, family)
    if plan is None:
        _miss(opt, group)
    else:
        plans[id(group)] = plan


def _new_plan(opt: torch.optim.Optimizer, group: dict[str, Any], family: str) -> Plan | None:
    if (
        group.get("group_l1", 0) != 0
        or group.get("decay_scaling", "lr") != "lr"
        or group["foreach"] is not None
        or getattr(opt, "grad_scale", None) is not None
    ):
        return None
    if group["fused"] is None:  # the default path: the install-time build
        if not _cpu_kernel_installed():
            return None
    elif group["fused"] is not True or fused_backend("cpu") != "cpu":
        return None
    params = group["params"]
    grads = list(map(_GRAD, params))
    if not params or any(map(is_, grads, repeat(None))):
        return None
    differentiable = group.get("differentiable", False)
    capturable = group.get("capturable", False)
    impl = resolve_impl(
        params,
        grads,
        foreach=None,
        fused=group["fused"],
        torch_fused_ok=family == "sgd" or not isinstance(group["betas"][0], Tensor),
        differentiable=differentiable,
        capturable=capturable,
    )
    if impl != "fused" or not all(map(_IS_CPU, params)):
        return None
    states = [opt.state.get(p) for p in params]
    if any(s is None for s in states):
        return None
    keys = _state_keys(group, family)
    lists: list[list[Tensor]] = [list(params), grads]
    for name in keys:
        lst = [s.get(name) for s in states]  # type: ignore[union-attr]
        if any(t is None for t in lst):
            return None
        lists.append(lst)
    n_shaped = len(lists) - (1 if family == "adam" else 0)
    dtypes = {t.dtype for lst in lists[:n_shaped] for t in lst}
    if len(dtypes) != 1 or dtypes.pop() not in _cpu_fused._DTYPE_CODE:
        return None  # mixed dtypes (the full dispatch sends them to torch's for-loop), float64
    where = "ProxSGD fused step" if family == "sgd" else "ProxAdam fused step"
    names = ["param", "grad", *keys][:n_shaped]
    prep = _cpu_fused._prepare(where, names, lists, [True] * len(lists), n_shaped)
    if prep.keep:  # a layout the kernel reaches through copies: not cached
        return None
    table = _cpu_fused._Table(prep.table.key, prep.table.tensor.tolist())  # the plan's own copy
    return Plan(family, group, opt.state, lists, table)

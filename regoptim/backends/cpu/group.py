"""Group lasso fused into the C++ CPU kernel: the step of a param group and its group prox.

One call steps every parameter of one param group (``regoptim/backends/cpu/csrc/fused_cpu.cpp``, the same
elementwise update as :mod:`regoptim.backends.cpu.kernel`, decay and L1 included) and applies the group
prox (``regoptim/backends/cpu/csrc/group_lasso.h``, ``group_poly.h``) in the same pass over memory: blocks of consecutive groups
are updated, then thresholded while they are still in cache (``regoptim/backends/cpu/csrc/group_blocks.h``,
which says what the layouts cost: column groups and groups larger than the cache). The math is that of
:mod:`regoptim.regularizers.group_lasso`: block soft-thresholding for ProxSGD, the exact prox in the metric of
the update's own denominator for ProxAdam/ProxAdamW.

The tensors are checked as :func:`regoptim.backends.cpu.kernel.fused_prox_sgd_` checks them
(:mod:`regoptim.backends.guard`: count, dtypes, shapes, devices, step counters) before the kernel sees a
pointer. The groups are slices along each tensor's logical axis, so the kernel needs each tensor
in its logical (row-major) order: a tensor that is not contiguous, or carries a conj/neg bit,
is handed over as a contiguous copy, copied back after the step when the kernel writes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from regoptim.backends.cpu.build import load
from regoptim.backends.cpu.capability import torch_kernel_numerics
from regoptim.backends.cpu.kernel import (
    _AMSGRAD,
    _DTYPE_CODE,
    _FIRST_STEP,
    _MOMENTUM,
    _NESTEROV,
    _common_flags,
    _has_bit,
    _refresh,
    _scalar,
    _skip_step,
    _Table,
)
from regoptim.backends.guard import group_key, validate, validate_steps
from regoptim.hyper import AdamHyper, GroupLasso, SgdHyper

__all__ = ["fused_group_adam_", "fused_group_sgd_"]

_CPU = torch.device("cpu")


class _Plan:
    """A checked pointer table (rows: numels, then one row per role) and the group layout
    (``outer``, ``inner`` per tensor, ``n`` groups), plus the contiguous stand-ins of this call."""

    __slots__ = ("copies", "keep", "layout", "n", "table")

    def __init__(
        self,
        table: _Table,
        layout: Tensor,
        n: int,
        copies: list[tuple[Tensor, Tensor]],
        keep: list[Tensor],
    ) -> None:
        self.table = table
        self.layout = layout  # int64: outer per tensor, then inner per tensor
        self.n = n
        self.copies = copies
        self.keep = keep

    @property
    def outer(self) -> int:
        return self.layout.data_ptr()

    @property
    def inner(self) -> int:
        return self.layout.data_ptr() + 8 * self.table.n

    def finish(self) -> None:
        for orig, copy in self.copies:
            orig.copy_(copy)


_plans: dict[tuple, _Plan] = {}
_MAX_PLANS = 64


def _layout(where: str, params: Sequence[Tensor], axes: Sequence[int]) -> tuple[Tensor, int]:
    """``(outer..., inner...)`` per tensor and the number of groups; raises on a mismatch."""
    if len(axes) != len(params):
        raise ValueError(f"{where}: {len(axes)} group axes for {len(params)} parameters")
    outer, inner, sizes = [], [], []
    for i, (p, a) in enumerate(zip(params, axes, strict=True)):
        if not 0 <= a < p.ndim:
            raise ValueError(
                f"{where}: group axis {a} of parameter {i} is out of range for its shape "
                f"{tuple(p.shape)} (axes must be normalised to >= 0)"
            )
        shape = p.shape
        outer.append(math.prod(shape[:a]))
        inner.append(math.prod(shape[a + 1 :]))
        sizes.append(shape[a])
    if len(set(sizes)) > 1:
        listed = ", ".join(f"parameter {i}: {s}" for i, s in enumerate(sizes))
        raise ValueError(
            f"{where}: every parameter needs the same size along its group axis; got {listed}"
        )
    return torch.tensor(outer + inner, dtype=torch.int64), sizes[0] if sizes else 0


def _prepare(
    where: str,
    names: list[str],
    lists: list[list[Tensor]],
    written: list[bool],
    n_shaped: int,
    axes: tuple[int, ...],
) -> _Plan:
    """A checked :class:`_Plan` for ``lists`` (params first; the lists after the first
    ``n_shaped`` are Adam's step counters), cached per call site, group and axes while the
    :func:`~regoptim.backends.guard.group_key` of the tensors is the one it was checked for (grads that
    moved are re-pointed when they match the params). Unlike the plain step's table, every
    tensor is addressed in its logical order: non-contiguous ones (channels_last included) and
    ones with a conj/neg bit get contiguous copies, never cached."""
    key = group_key(lists)
    slot = (where, len(lists), len(lists[0]), key[0][0][0], axes)
    hit = _plans.get(slot)
    if hit is not None and hit.table.key[0] == key[0]:
        changed = [r for r in range(len(lists)) if key[r] != hit.table.key[r]]
        if not changed or _refresh(hit.table, lists, key, changed, n_shaped):
            return hit
    params = lists[0]
    validate(where, names[:n_shaped], lists[:n_shaped], _CPU)
    for steps in lists[n_shaped:]:
        validate_steps(where, params, steps, _CPU)
    layout, n = _layout(where, params, axes)
    copies: list[tuple[Tensor, Tensor]] = []
    keep: list[Tensor] = []
    rows: list[list[int]] = [[p.numel() for p in params]] + [[] for _ in lists]
    for r, lst in enumerate(lists):
        for t in lst:
            if t.is_contiguous() and not _has_bit(t):
                rows[r + 1].append(t.data_ptr())
                continue
            c = t.resolve_conj().resolve_neg().contiguous()
            rows[r + 1].append(c.data_ptr())
            keep.append(c)
            if written[r]:
                copies.append((t, c))
    plan = _Plan(_Table(key, rows), layout, n, copies, keep)
    if not keep:
        if len(_plans) >= _MAX_PLANS:
            _plans.clear()
        _plans[slot] = plan
    return plan


def _dtype_of(where: str, params: Sequence[Tensor], others: Sequence[Sequence | None]) -> int:
    dtype = params[0].dtype
    if dtype not in _DTYPE_CODE:
        raise TypeError(
            f"{where}: the fused CPU kernel's group lasso supports float32, bfloat16 and float16 "
            f"parameters, got {dtype}"
        )
    for lst in others:
        if lst is not None and len(lst) != len(params):
            raise ValueError(f"{where}: tensor lists of different lengths")
    return _DTYPE_CODE[dtype]


def _check_rc(where: str, rc: int) -> None:
    if rc == -2:
        raise MemoryError(f"{where}: could not allocate the group prox's scratch (nothing changed)")
    if rc != 0:
        raise RuntimeError(f"{where}: the fused CPU kernel returned {rc}")


def _threshold(lr: float, lasso: GroupLasso) -> float:
    return lr * float(lasso.group_l1)


# ---------------------------------------------------------------------------------------------
# Entry points


def fused_group_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    hyper: SgdHyper,
    lasso: GroupLasso,
    *,
    is_first_step: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One ProxSGD step over all parameters of one param group, then the group prox
    ``x_g <- x_g * max(0, 1 - lr*group_l1 / ||x_g||)`` (a zero group stays 0, NaN propagates).

    ``momentum_buffers``: ``None`` when ``hyper.momentum == 0``; otherwise one per parameter,
    freshly allocated (contents undefined) when ``is_first_step``. ``found_inf != 0``: nothing
    changes; ``grad_scale``: the grads are unscaled in place, as torch's fused step."""
    where = "ProxSGD fused group-lasso step"
    if not params:
        return
    dtype = _dtype_of(where, params, [grads, momentum_buffers])
    if _skip_step(found_inf):
        return
    lr = _scalar(hyper.lr)
    has_mom = hyper.momentum != 0.0
    if has_mom and momentum_buffers is None:
        raise ValueError(f"{where}: momentum != 0 needs momentum_buffers")
    lists: list[list[Tensor]] = [list(params), list(grads)]
    if has_mom:
        lists.append(list(momentum_buffers))  # type: ignore[arg-type]
    names = ["param", "grad", "momentum_buffer"]
    written = [True, grad_scale is not None, True]
    plan = _prepare(where, names, lists, written, len(lists), tuple(lasso.axes))
    flags = _MOMENTUM if has_mom else 0
    if has_mom and is_first_step:
        flags |= _FIRST_STEP
    if has_mom and hyper.nesterov:
        flags |= _NESTEROV
    scale = _scalar(grad_scale) if grad_scale is not None else None
    wd = float(hyper.weight_decay)
    flags |= _common_flags(hyper.maximize, scale, wd, hyper.decoupled_weight_decay, hyper.l1)
    decay = 1.0 - lr * wd if (wd != 0.0 and hyper.decoupled_weight_decay) else 1.0
    rows = plan.table.rows
    rc = load().regoptim_sgd_group(
        dtype, plan.table.n, rows[0], rows[1], rows[2], rows[3] if has_mom else None,
        plan.outer, plan.inner, plan.n, lr, wd, float(hyper.momentum), float(hyper.dampening),
        decay, lr * hyper.l1, 1.0 if scale is None else scale, _threshold(lr, lasso), flags,
        torch.get_num_threads(), torch_kernel_numerics().vector_width,
    )  # fmt: skip
    _check_rc(where, rc)
    plan.finish()


def fused_group_adam_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    state_steps: list[Tensor],
    hyper: AdamHyper,
    lasso: GroupLasso,
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One ProxAdam/ProxAdamW step over all parameters of one param group, then the group prox in
    the metric ``diag(d)``, ``d`` this step's denominator ``sqrt(v_hat)/sqrt(1 - beta2^t) + eps``
    (``max_exp_avg_sq`` under amsgrad): a group is zero iff ``||d z|| <= lr*group_l1``, else
    ``x_i = d_i z_i rho / (d_i rho + lr*group_l1)`` (:mod:`regoptim.regularizers.group_lasso`). A group with a
    NaN or inf in ``z`` or ``d z`` becomes NaN.

    ``state_steps``: float32 one-element tensors, incremented here (not when ``found_inf != 0``,
    which changes nothing)."""
    where = "ProxAdam fused group-lasso step"
    if not params:
        return
    others = [grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps]
    dtype = _dtype_of(where, params, others)
    if _skip_step(found_inf):
        return
    lr = _scalar(hyper.lr)
    if hyper.amsgrad and max_exp_avg_sqs is None:
        raise ValueError(f"{where}: amsgrad needs max_exp_avg_sqs")
    lists: list[list[Tensor]] = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)]
    if hyper.amsgrad:
        lists.append(list(max_exp_avg_sqs))  # type: ignore[arg-type]
    n_shaped = len(lists)
    lists.append(list(state_steps))
    names = ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    written = [True, grad_scale is not None, True, True, True][:n_shaped] + [True]
    plan = _prepare(where, names, lists, written, n_shaped, tuple(lasso.axes))
    flags = _AMSGRAD if hyper.amsgrad else 0
    scale = _scalar(grad_scale) if grad_scale is not None else None
    wd = float(hyper.weight_decay)
    flags |= _common_flags(hyper.maximize, scale, wd, hyper.decoupled_weight_decay, hyper.l1)
    decay = 1.0 - lr * wd if (wd != 0.0 and hyper.decoupled_weight_decay) else 1.0
    rows = plan.table.rows
    rc = load().regoptim_adam_group(
        dtype, plan.table.n, rows[0], rows[1], rows[2], rows[3], rows[4],
        rows[5] if hyper.amsgrad else None, rows[-1], plan.outer, plan.inner, plan.n, lr,
        float(hyper.beta1), float(hyper.beta2), float(hyper.eps), wd, decay, lr * hyper.l1,
        1.0 if scale is None else scale, _threshold(lr, lasso), flags,
        torch.get_num_threads(), torch_kernel_numerics().vector_width,
    )  # fmt: skip
    _check_rc(where, rc)
    plan.finish()

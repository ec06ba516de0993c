"""The fused CPU kernel behind ``fused=True`` on CPU tensors.

One pass over every tensor of a (dtype) group per step, every regularizer included, written in a
small C++ file (``regoptim/backends/cpu/csrc/fused_cpu.cpp``, no torch headers) that is compiled at first use
with the system C++ compiler and loaded with :mod:`ctypes`:

* build cost does not depend on the model: the entry points take tables of data pointers and
  numels for the whole group, and every hyperparameter (lr, weight decay, l1, betas, ...) is a
  runtime scalar, so a scheduler or a hand-edited ``param_group`` never triggers a rebuild;
* the shared object is cached on disk, keyed by a hash of the source, its flags and the host CPU,
  in ``$REGOPTIM_CACHE_DIR`` (else ``$XDG_CACHE_HOME/regoptim``, else ``~/.cache/regoptim``); a
  second process loads it in milliseconds, even without a compiler (:mod:`regoptim.backends.cpu.build`:
  the fallback directories, the ownership and checksum checks made before loading, the timeout);
* the work of all tensors is split evenly over ``torch.get_num_threads()`` OpenMP threads, so many
  small tensors cost no more than a few large ones.

Float32, bfloat16 and float16 storage, float32 math. With the regularizers torch's fused kernels
also have (coupled L2, no L1), float32 results are bitwise those of ``torch._fused_sgd_`` /
``torch._fused_adam_`` / ``torch._fused_adamw_`` on the CPU capability torch dispatches to
(``regoptim.backends.cpu.capability``: its vector width and whether its build has FMA). Like torch's fused
kernels, a ``grad_scale`` unscales the gradients in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from operator import attrgetter

import torch
from torch import Tensor

from regoptim.backends.cpu.build import available, build_count, build_info, load
from regoptim.backends.cpu.capability import torch_kernel_numerics
from regoptim.backends.guard import RoleKey, group_key, like_params, validate, validate_steps
from regoptim.hyper import AdamHyper, SgdHyper

__all__ = [
    "available",
    "build_count",
    "build_info",
    "fused_prox_adam_",
    "fused_prox_sgd_",
    "load",
]

# Flags shared with csrc/elementwise.h (keep in sync).
_MAXIMIZE = 1
_HAS_SCALE = 2
_COUPLED_WD = 4
_L1 = 8
_MOMENTUM = 16
_FIRST_STEP = 32
_NESTEROV = 64
_AMSGRAD = 128
_NO_FMA = 256  # torch's fused kernels on this capability round a*b+c twice

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_REAL_OF_COMPLEX = {torch.complex64: torch.float32}


# ---------------------------------------------------------------------------------------------
# Pointer tables


class _Table:
    """int64 table, one row per role: numels (real elements), then data pointers; ``key`` is the
    :func:`regoptim.backends.guard.group_key` of the tensors it was built and checked for."""

    __slots__ = ("key", "n", "rows", "tensor")

    def __init__(self, key: list[RoleKey], rows: list[list[int]]) -> None:
        self.key = key
        self.n = len(rows[0])
        self.tensor = torch.tensor(rows, dtype=torch.int64)
        base = self.tensor.data_ptr()
        self.rows = [base + 8 * self.n * r for r in range(len(rows))]


class _Prepared:
    """What one call hands the kernel: a pointer table, plus contiguous stand-ins (copied back
    after the step) for tensors the kernel cannot address directly."""

    __slots__ = ("copies", "keep", "table")

    def __init__(
        self, table: _Table, copies: list[tuple[Tensor, Tensor]], keep: list[Tensor]
    ) -> None:
        self.table = table
        self.copies = copies  # (original, contiguous copy) to copy back
        self.keep = keep  # every stand-in, alive until the kernel has run

    def finish(self) -> None:
        for orig, copy in self.copies:
            orig.copy_(copy)


_tables: dict[tuple[str, int, int, int], _Table] = {}
_MAX_TABLES = 64
_CPU = torch.device("cpu")
_is_cpu = attrgetter("is_cpu")


def _prepare(
    where: str, names: list[str], lists: list[list[Tensor]], written: list[bool], n_shaped: int
) -> _Prepared:
    """Pointer table for ``lists`` (params first; every list of the same length; the lists
    after the first ``n_shaped`` are Adam's step counters), checked before the kernel sees it.

    The table is cached per call site (``where``) and group, and reused while the
    :func:`~regoptim.backends.guard.group_key` of the tensors (pointers, sizes, strides, dtypes, conj/neg
    bits) is the one it was checked for; a role whose tensors moved (fresh grads) is re-pointed
    when it still matches the params. Anything else takes the full check, which raises naming
    the parameter index. Tensors that are not contiguous, or carry a conj/neg bit, get resolved
    contiguous copies (not cached) that ``finish()`` copies back into the ``written`` roles.
    """
    key = group_key(lists)
    slot = (where, len(lists), len(lists[0]), key[0][0][0])  # one entry per group of tensors
    hit = _tables.get(slot)
    if hit is not None and hit.key[0] == key[0]:
        changed = [r for r in range(len(lists)) if key[r] != hit.key[r]]
        if not changed:
            return _Prepared(hit, [], [])
        if _refresh(hit, lists, key, changed, n_shaped):
            return _Prepared(hit, [], [])
    params = lists[0]
    validate(where, names[:n_shaped], lists[:n_shaped], _CPU)
    for steps in lists[n_shaped:]:
        validate_steps(where, params, steps, _CPU)
    factor = 2 if params[0].is_complex() else 1
    copies: list[tuple[Tensor, Tensor]] = []
    keep: list[Tensor] = []
    # A non-contiguous param whose layout is dense (e.g. channels_last) is addressed directly
    # when every tensor of its index has the same strides: the update is elementwise, so any
    # common order of the elements will do. Otherwise non-contiguous tensors get contiguous
    # copies (the logical order of the contiguous ones).
    rows: list[list[int]] = [[p.numel() * factor for p in params]] + [[] for _ in lists]
    for i in range(len(params)):
        group = [lst[i] for lst in lists]
        shaped = group[:n_shaped]
        same = not any(map(_has_bit, shaped)) and (
            all(t.is_contiguous() for t in shaped) or _dense_same_layout(shaped)
        )
        for r, t in enumerate(group):
            if same or (t.is_contiguous() and not _has_bit(t)):
                rows[r + 1].append(t.data_ptr())
                continue
            c = t.resolve_conj().resolve_neg().contiguous()
            rows[r + 1].append(c.data_ptr())
            keep.append(c)
            if written[r]:
                copies.append((t, c))
    table = _Table(key, rows)
    if not keep:
        if len(_tables) >= _MAX_TABLES:
            _tables.clear()
        _tables[slot] = table
    return _Prepared(table, copies, keep)


def _has_bit(t: Tensor) -> bool:
    return t.is_conj() or t.is_neg()


def _dense_same_layout(tensors: list[Tensor]) -> bool:
    """All ``tensors`` have the first one's strides, and those strides lay its elements out
    densely without overlap (a permutation of a contiguous layout)."""
    first = tensors[0]
    strides = first.stride()
    if any(t.stride() != strides for t in tensors[1:]):
        return False
    dims = sorted((s, n) for s, n in zip(strides, first.shape, strict=True) if n != 1)
    expected = 1
    for s, n in dims:
        if s != expected:
            return False
        expected *= n
    return True


def _refresh(
    table: _Table,
    lists: list[list[Tensor]],
    key: list[RoleKey],
    changed: list[int],
    n_shaped: int,
) -> bool:
    """Re-point the rows of roles whose tensors moved (typically fresh grads every step) when
    they are CPU tensors with the params' sizes, strides and dtypes and no conj/neg bit (the
    cached table addresses every param directly, so such tensors line up with it); ``False``:
    rebuild from scratch, with the full check. The params are those the table was built for."""
    for r in changed:
        if r >= n_shaped or not like_params(key, r) or not all(map(_is_cpu, lists[r])):
            return False
    for r in changed:
        table.tensor[r + 1] = torch.tensor(key[r][0], dtype=torch.int64)
        table.key[r] = key[r]
    return True


def _scalar(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def _skip_step(found_inf: Tensor | None) -> bool:
    return found_inf is not None and float(found_inf.item()) != 0.0


def _check(params: Sequence[Tensor], others: Sequence[Sequence[Tensor] | None]) -> torch.dtype:
    """The storage dtype the kernel runs in (float32 for complex64); checks list lengths."""
    dtype = params[0].dtype
    real = _REAL_OF_COMPLEX.get(dtype, dtype)
    if real not in _DTYPE_CODE:
        raise TypeError(
            f"regoptim fused CPU kernel supports float32, bfloat16, float16 (and complex64) "
            f"parameters, got {dtype}"
        )
    for lst in others:
        if lst is not None and len(lst) != len(params):
            raise ValueError("regoptim fused CPU kernel: tensor lists of different lengths")
    return real


# ---------------------------------------------------------------------------------------------
# Public entry points


def fused_prox_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    hyper: SgdHyper,
    *,
    is_first_step: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One ProxSGD step over CPU tensors of one dtype (see :func:`regoptim.backends.dispatch.fused_prox_sgd_`)."""
    if not params:
        return
    dtype = _check(params, [grads, momentum_buffers])
    if _skip_step(found_inf):
        return
    lr_f = _scalar(hyper.lr)
    has_mom = hyper.momentum != 0.0
    if has_mom and momentum_buffers is None:
        raise ValueError("regoptim fused CPU kernel: momentum != 0 needs momentum_buffers")
    lists: list[list[Tensor]] = [list(params), list(grads)]
    if has_mom:
        lists.append(list(momentum_buffers))  # type: ignore[arg-type]
    complex_l1 = params[0].is_complex() and hyper.l1 != 0.0
    names = ["param", "grad", "momentum_buffer"]
    written = [True, grad_scale is not None, True]
    prep = _prepare("ProxSGD fused step", names, lists, written, len(lists))
    run_sgd(
        prep.table,
        dtype,
        replace(hyper, l1=0.0) if complex_l1 else hyper,
        is_first_step=is_first_step,
        grad_scale=_scalar(grad_scale) if grad_scale is not None else None,
    )
    prep.finish()
    if complex_l1:
        # the modulus shrink couples real and imaginary parts: one extra pass per tensor
        from regoptim.regularizers.l1 import soft_threshold_

        for p in params:
            soft_threshold_(p, lr_f * hyper.l1)


def fused_prox_adam_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    state_steps: list[Tensor],
    hyper: AdamHyper,
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One ProxAdam/ProxAdamW step over CPU tensors of one dtype (see
    :func:`regoptim.backends.dispatch.fused_prox_adam_`)."""
    if not params:
        return
    dtype = _check(params, [grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps])
    if params[0].is_complex() and hyper.l1 != 0.0:
        raise NotImplementedError(
            "regoptim fused CPU kernel: L1 on complex parameters with Adam (the modulus shrink "
            "couples the real and imaginary parts); use the torch path"
        )
    if _skip_step(found_inf):
        return
    amsgrad = hyper.amsgrad
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("regoptim fused CPU kernel: amsgrad needs max_exp_avg_sqs")
    lists: list[list[Tensor]] = [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)]
    if amsgrad:
        lists.append(list(max_exp_avg_sqs))  # type: ignore[arg-type]
    n_shaped = len(lists)
    lists.append(list(state_steps))
    names = ["param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"]
    written = [True, grad_scale is not None, True, True, True][:n_shaped] + [True]
    prep = _prepare("ProxAdam fused step", names, lists, written, n_shaped)
    run_adam(
        prep.table,
        dtype,
        hyper,
        grad_scale=_scalar(grad_scale) if grad_scale is not None else None,
    )
    prep.finish()


# ---------------------------------------------------------------------------------------------
# The kernel calls, on a checked table (also used by regoptim.backends.cpu.plan's cached default path)


def run_sgd(
    table: _Table,
    dtype: torch.dtype,
    hyper: SgdHyper,
    *,
    is_first_step: bool,
    grad_scale: float | None,
) -> None:
    """One ProxSGD step of the kernel over a checked ``table`` (rows: numels, params, grads,
    momentum buffers when ``momentum != 0``) of tensors stored in ``dtype``."""
    h = hyper
    lr = float(h.lr)
    flags = _MOMENTUM if h.momentum != 0.0 else 0
    if flags and is_first_step:
        flags |= _FIRST_STEP
    if flags and h.nesterov:
        flags |= _NESTEROV
    flags |= _common_flags(h.maximize, grad_scale, h.weight_decay, h.decoupled_weight_decay, h.l1)
    decoupled = h.weight_decay != 0.0 and h.decoupled_weight_decay
    decay = 1.0 - lr * h.weight_decay if decoupled else 1.0
    rows = table.rows
    load().regoptim_sgd(
        _DTYPE_CODE[dtype], table.n, rows[0], rows[1], rows[2], rows[3] if h.momentum else None,
        lr, float(h.weight_decay), float(h.momentum), float(h.dampening), decay, lr * h.l1,
        1.0 if grad_scale is None else grad_scale, flags, torch.get_num_threads(),
        torch_kernel_numerics().vector_width,
    )  # fmt: skip


def run_adam(
    table: _Table, dtype: torch.dtype, hyper: AdamHyper, *, grad_scale: float | None
) -> None:
    """One ProxAdam(W) step of the kernel over a checked ``table`` (rows: numels, params,
    grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs when ``amsgrad``, step counters)."""
    h = hyper
    lr = float(h.lr)
    flags = _AMSGRAD if h.amsgrad else 0
    flags |= _common_flags(h.maximize, grad_scale, h.weight_decay, h.decoupled_weight_decay, h.l1)
    decoupled = h.weight_decay != 0.0 and h.decoupled_weight_decay
    decay = 1.0 - lr * h.weight_decay if decoupled else 1.0
    rows = table.rows
    load().regoptim_adam(
        _DTYPE_CODE[dtype], table.n, rows[0], rows[1], rows[2], rows[3], rows[4],
        rows[5] if h.amsgrad else None, rows[-1], lr, float(h.beta1), float(h.beta2),
        float(h.eps), float(h.weight_decay), decay, lr * h.l1,
        1.0 if grad_scale is None else grad_scale, flags, torch.get_num_threads(),
        torch_kernel_numerics().vector_width,
    )  # fmt: skip


def _common_flags(
    maximize: bool, grad_scale: float | None, weight_decay: float, decoupled: bool, l1: float
) -> int:
    flags = _MAXIMIZE if maximize else 0
    if grad_scale is not None:
        flags |= _HAS_SCALE
    if weight_decay != 0.0 and not decoupled:
        flags |= _COUPLED_WD
    if l1 != 0.0:
        flags |= _L1
    if not torch_kernel_numerics().fma:
        flags |= _NO_FMA
    return flags

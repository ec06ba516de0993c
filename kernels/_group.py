"""Host side of the group-lasso kernels (``_group_sgd``, ``_group_adam``): layouts and tables.

A group-lasso kernel runs one program per group (slice ``i`` along its axis of every parameter of
the param group), so one launch per param group and step serves any number of tensors. Each
program loops over the tensors from device tables:

* one int64 row of ``data_ptr()`` per tensor list (params, grads, each piece of state, Adam's
  step counters), as :func:`regoptim._kernels._common.launch_plan` builds them;
* ``outers`` and ``inners``: tensor ``j`` is addressed flat from its pointer as
  ``(outer_j, n_groups, inner_j)``, so group ``i`` is its elements
  ``o * n_groups * inner_j + i * inner_j + k`` (``_jit.group_offsets``).

That flat address is the tensor's own memory order: a dense tensor whose grad and state share its
strides (channels_last, a transposed weight) is addressed in the order of its strides, with the
group axis moved along, and no copy (the group's elements are the same set; only the order of the
norm's sum changes). Anything else (a strided view, a grad whose strides differ from its param's,
a negative-bit view) goes through contiguous copies, written back after the launch for the lists
the kernel mutates. The tables are built on the host and cached on the pointers and shapes: a step
whose tensors did not move costs no host-to-device copy and no host sync.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._common import _cache_get, _cache_put, _to_device

__all__ = ["GroupPlan", "check_group_axes", "group_plan", "reject_complex"]

# Elements per loop iteration of a program: the next power of two of the largest part of a group
# in one tensor, clamped to [16, 1024], with 1 warp up to 128 elements and 4 from 512 (8 elements
# per thread at 1024, as the elementwise kernels). UNTUNED: no GPU in the session that wrote this
# (validated under TRITON_INTERPRET=1 and by compiling for sm_90 only); at most 7 variants.
MIN_BLOCK = 16
MAX_BLOCK = 1024
# A group's part of one tensor with this many elements or more is indexed in int64 (else int32,
# whose division is cheaper); offsets into the tensors are int64 either way.
WIDE_FROM = 2**31 - MAX_BLOCK


@dataclass
class GroupPlan:
    """One launch of a group kernel: grid ``(n_groups,)``, and what to copy back after it."""

    tables: list[Tensor]  # one int64 data_ptr row per tensor list, then one per scalar list
    outers: Tensor  # int64 [n_tensors]
    inners: Tensor  # int64 [n_tensors]
    n_tensors: int
    n_groups: int
    block: int
    wide: bool  # a part of a group has 2**31 - MAX_BLOCK elements or more: int64 indexing
    num_warps: int
    writeback: list[tuple[Tensor, Tensor]]  # (original, contiguous copy)
    copies: list[Tensor]  # every copy the tables point to, alive until the launch is queued

    def finish(self) -> None:
        for orig, copy in self.writeback:
            orig.copy_(copy)


def reject_complex(where: str, params: Sequence[Tensor]) -> None:
    for i, p in enumerate(params):
        if p.is_complex():
            raise TypeError(
                f"{where}: parameter {i} is {p.dtype}; complex parameters cannot be grouped"
            )


def check_group_axes(where: str, params: Sequence[Tensor], axes: Sequence[int]) -> int:
    """The number of groups: every parameter's size along its (normalised) axis, checked equal."""
    if len(axes) != len(params):
        raise ValueError(f"{where}: {len(axes)} group axes for {len(params)} parameters")
    n_groups = -1
    for i, (p, a) in enumerate(zip(params, axes, strict=True)):
        if not 0 <= a < p.ndim:
            raise ValueError(
                f"{where}: group axis {a} of parameter {i} (shape {tuple(p.shape)}) is not a "
                "normalised axis (0 <= axis < ndim)"
            )
        if n_groups < 0:
            n_groups = p.shape[a]
        elif p.shape[a] != n_groups:
            raise ValueError(
                f"{where}: parameter {i} has {p.shape[a]} slices along axis {a}, parameter 0 "
                f"{n_groups} (one slice per group)"
            )
    return max(n_groups, 0)


def _flat_layout(t: Tensor, axis: int) -> tuple[int, int] | None:
    """``(outer, inner)`` of ``t`` addressed flat in its memory order, or ``None`` if its elements
    are not one dense run."""
    if t.is_contiguous():
        return math.prod(t.shape[:axis]), math.prod(t.shape[axis + 1 :])
    order = sorted(range(t.ndim), key=lambda d: -t.stride(d))  # stable: size-1 dims stay put
    if not t.permute(order).is_contiguous():
        return None
    a = order.index(axis)
    sizes = [t.shape[d] for d in order]
    return math.prod(sizes[:a]), math.prod(sizes[a + 1 :])


_tables: OrderedDict[tuple, Tensor] = OrderedDict()


def group_plan(
    lists: Sequence[Sequence[Tensor]],
    mutated: Sequence[bool],
    axes: Sequence[int],
    n_groups: int,
    device: torch.device,
    scalars: Sequence[Sequence[Tensor]] = (),
) -> GroupPlan | None:
    """The tables of one launch over ``lists`` (params first; checked by ``check_lists``), or
    ``None`` when there is nothing to do (no groups, or only empty tensors).

    ``scalars``: lists of one-element tensors per tensor (Adam's steps), tabled after ``lists``.
    Empty tensors are dropped (their groups' parts are empty)."""
    if n_groups == 0:
        return None
    lists = [list(lst) for lst in lists]
    fast = all(t.is_contiguous() and not t.is_neg() for lst in lists for t in lst)
    kept: list[int] = []
    outers: list[int] = []
    inners: list[int] = []
    writeback: list[tuple[Tensor, Tensor]] = []
    copies: list[Tensor] = []
    for i, p in enumerate(lists[0]):
        if p.numel() == 0:
            continue
        kept.append(i)
        layout = None
        if fast:
            layout = math.prod(p.shape[: axes[i]]), math.prod(p.shape[axes[i] + 1 :])
        elif all(not lst[i].is_neg() and lst[i].stride() == p.stride() for lst in lists):
            layout = _flat_layout(p, axes[i])
        if layout is None:  # copies in C order, the mutated ones written back after the launch
            for k, lst in enumerate(lists):
                t = lst[i]
                if not t.is_contiguous() or t.is_neg():
                    c = t.resolve_neg().contiguous()
                    copies.append(c)
                    if mutated[k]:
                        writeback.append((t, c))
                    lst[i] = c
            layout = _flat_layout(lists[0][i], axes[i])
            assert layout is not None
        outers.append(layout[0])
        inners.append(layout[1])
    if not kept:
        return None
    rows = [*lists, *([lst[i] for i in kept] for lst in scalars)]
    ptrs = tuple(tuple(lst[i].data_ptr() for i in kept) for lst in rows[: len(lists)])
    ptrs += tuple(tuple(t.data_ptr() for t in lst) for lst in rows[len(lists) :])
    n = len(kept)
    key = (device, ptrs, tuple(outers), tuple(inners))
    dev = _cache_get(_tables, key)
    if dev is None:
        stride = n + (n % 2)  # 16-byte aligned rows: one specialisation for every table
        host = torch.zeros((len(ptrs) + 2, stride), dtype=torch.int64)
        for k, row in enumerate((*ptrs, outers, inners)):
            host[k, :n] = torch.tensor(row, dtype=torch.int64)
        dev = _to_device(host, device)
        _cache_put(_tables, key, dev)
    biggest = max(o * k for o, k in zip(outers, inners, strict=True))
    block = min(MAX_BLOCK, max(MIN_BLOCK, 1 << (biggest - 1).bit_length()))
    return GroupPlan(
        tables=[dev[k] for k in range(len(ptrs))],  # type: ignore[index]
        outers=dev[len(ptrs)],  # type: ignore[index]
        inners=dev[len(ptrs) + 1],  # type: ignore[index]
        n_tensors=n,
        n_groups=n_groups,
        block=block,
        wide=biggest >= WIDE_FROM,
        num_warps=max(1, min(4, block // 128)),
        writeback=writeback,
        copies=copies,
    )

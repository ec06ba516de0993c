"""Host side shared by the Triton kernels: checks, copy-in/copy-out and the multi-tensor launch plan.

Every kernel updates all tensors of a (device, dtype) group in at most two launches (one per
alignment class: the vectorised variant for tensors whose numel is a multiple of 8 and whose
pointers are 16-byte aligned, the scalar one for the rest), however many tensors there are.
The launcher gives it:

* one int64 table of ``data_ptr()`` per tensor list (params, grads, each piece of state), rows of
  one device tensor;
* ``numels`` (int64, one per tensor);
* a block map: program ``pid`` handles ``BLOCK`` elements of tensor ``block_tensor[pid]`` from
  element ``block_start[pid]`` on.

Both are built on the host once and cached (small LRU) on the tuple of pointers/numels, so a step
whose tensors did not move costs no host work beyond building that key, and no host sync. Before
that, :func:`check_lists` checks every grad and state against its param (device, dtype, shape),
again only when the key of pointers, sizes, strides, dtypes and conj/neg bits
(:mod:`regoptim.backends.guard`) differs from one that passed.

Tensors the kernels cannot address as one flat run of elements sharing a layout with the others at
the same index (non-contiguous params, a grad with other strides, conj/neg views) go through
contiguous copies that are written back after the launch (:func:`flatten_group`).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import triton.language as tl
from torch import Tensor

from regoptim.backends.guard import check_cached

__all__ = [
    "BLOCK",
    "SUPPORTED_DTYPES",
    "FlatGroup",
    "BlockMap",
    "LaunchPlan",
    "check_lists",
    "flatten_group",
    "launch_plan",
    "log_beta",
    "lr_args",
    "scalar_arg",
    "triton_dtype",
]

# Elements per program. UNTUNED: no GPU was available when this was written (CPU-only session,
# kernels validated under TRITON_INTERPRET=1). 1024 with the default num_warps=4 gives each thread
# 8 contiguous elements (vectorised 16/32-byte accesses); tune it on the target GPU. Must be even
# (complex pairs never straddle two blocks).
BLOCK = 1024

# parameter dtype -> triton element type of the (real view of the) storage
SUPPORTED_DTYPES: dict[torch.dtype, tl.dtype] = {
    torch.float32: tl.float32,
    torch.bfloat16: tl.bfloat16,
    torch.float16: tl.float16,
    torch.complex64: tl.float32,
}

_PLAN_CACHE_SIZE = 32


# ---------------------------------------------------------------------------------------------
# host side: dtype/device checks, copy-in/copy-out, launch plan
# ---------------------------------------------------------------------------------------------


def triton_dtype(dtype: torch.dtype) -> tl.dtype:
    """Triton element type of the storage of ``dtype`` params, or a clear error."""
    try:
        return SUPPORTED_DTYPES[dtype]
    except KeyError:
        supported = ", ".join(str(d).removeprefix("torch.") for d in SUPPORTED_DTYPES)
        raise TypeError(
            f"regoptim's Triton kernels take {supported} parameters, not {dtype}; "
            "use fused=False (torch path) for these parameters"
        ) from None


def _dense(t: Tensor) -> bool:
    """Non-overlapping and dense: its elements are one run of memory (any dim order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for size, stride in sorted(
        ((s, st) for s, st in zip(t.shape, t.stride(), strict=True) if s != 1), key=lambda x: x[1]
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def _flat_real(t: Tensor) -> Tensor:
    """The storage run of a dense tensor as a real tensor whose ``data_ptr``/``numel`` we pass."""
    return torch.view_as_real(t) if t.is_complex() else t


@dataclass
class FlatGroup:
    """The tensors handed to a kernel, and what to copy back after it ran."""

    lists: list[list[Tensor]]  # real views, one list per tensor list, empty tensors dropped
    kept: list[int]  # the indices (into the inputs) of the tensors in ``lists``
    writeback: list[tuple[Tensor, Tensor]]  # (original, contiguous copy) to copy back

    def finish(self) -> None:
        for orig, copy in self.writeback:
            orig.copy_(copy)


def flatten_group(lists: Sequence[Sequence[Tensor]], mutated: Sequence[bool]) -> FlatGroup:
    """Drop empty tensors and make every index addressable as one flat run shared by all lists.

    Index ``i`` is used in place when all its tensors are dense with the same strides and carry
    no conj/neg bit; otherwise each of its tensors becomes a contiguous copy (written back after
    the launch for the ``mutated`` lists).
    """
    # Fast path, the usual case: everything contiguous, no conj/neg bits. Only a couple of cheap
    # attribute reads per tensor, since this runs on the host on every step.
    if all(t.is_contiguous() and not t.is_neg() for lst in lists for t in lst) and not any(
        t.is_conj() for lst in lists for t in lst
    ):
        kept = [i for i, t in enumerate(lists[0]) if t.numel() != 0]
        if len(kept) == len(lists[0]):
            out = [list(lst) for lst in lists]
        else:
            out = [[lst[i] for i in kept] for lst in lists]
        if kept and lists[0][0].is_complex():  # one dtype per group
            out = [[torch.view_as_real(t) for t in lst] for lst in out]
        return FlatGroup(out, kept, [])

    out = [[] for _ in lists]
    writeback: list[tuple[Tensor, Tensor]] = []
    kept = []
    for i in range(len(lists[0])):
        ts = [lst[i] for lst in lists]
        if ts[0].numel() == 0:
            continue
        kept.append(i)
        strides = ts[0].stride()
        in_place = all(
            _dense(t) and t.stride() == strides and not t.is_conj() and not t.is_neg() for t in ts
        )
        for k, t in enumerate(ts):
            if not in_place and not (t.is_contiguous() and not t.is_conj() and not t.is_neg()):
                c = t.resolve_conj().resolve_neg().contiguous()
                if mutated[k]:
                    writeback.append((t, c))
                t = c
            out[k].append(_flat_real(t))
    return FlatGroup(out, kept, writeback)


@dataclass
class BlockMap:
    """One launch: program ``pid`` updates ``BLOCK`` elements of tensor ``block_tensor[pid]``
    from element ``block_start[pid]`` on."""

    block_tensor: Tensor  # int32 [n_blocks]
    block_start: Tensor  # int64 [n_blocks]
    n_blocks: int
    aligned: bool  # its tensors: numel % 8 == 0 and 16-byte data_ptrs (vectorised accesses)


@dataclass
class LaunchPlan:
    """Device tables for one step of a group: one launch per alignment class present (1 or 2)."""

    tables: list[Tensor]  # one int64 data_ptr row per tensor list
    numels: Tensor  # int64 [n_tensors]
    launches: list[BlockMap]


_numels: OrderedDict[tuple, Tensor] = OrderedDict()
_block_maps: OrderedDict[tuple, list[BlockMap]] = OrderedDict()
_ptr_tables: OrderedDict[tuple, tuple[list[Tensor], tuple[bool, ...]]] = OrderedDict()


def _cache_get(cache: OrderedDict, key: tuple) -> object | None:
    value = cache.get(key)
    if value is not None:
        cache.move_to_end(key)
    return value


def _cache_put(cache: OrderedDict, key: tuple, value: object) -> None:
    cache[key] = value
    if len(cache) > _PLAN_CACHE_SIZE:
        cache.popitem(last=False)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _build_block_map(
    numels: Sequence[int], select: list[int], aligned: bool, device: torch.device
) -> BlockMap:
    counts = torch.tensor([-(-numels[i] // BLOCK) for i in select], dtype=torch.int64)
    n_blocks = int(counts.sum())
    block_tensor = torch.repeat_interleave(torch.tensor(select, dtype=torch.int32), counts)
    first_block = torch.cumsum(counts, 0) - counts
    block_start = (
        torch.arange(n_blocks, dtype=torch.int64) - torch.repeat_interleave(first_block, counts)
    ) * BLOCK
    return BlockMap(
        _to_device(block_tensor, device), _to_device(block_start, device), n_blocks, aligned
    )


def launch_plan(
    lists: Sequence[Sequence[Tensor]],
    device: torch.device,
    scalars: Sequence[Sequence[Tensor]] = (),
) -> LaunchPlan:
    """Pointer tables and block maps for ``lists`` (real, flat-addressable, non-empty tensors).

    ``scalars``: further lists of one-element tensors per tensor (Adam's steps), tabled after
    ``lists`` but not part of the alignment check. Tensors whose numel is a multiple of 8 and
    whose pointers (in every list) are 16-byte aligned go to the vectorised launch, the others to
    the scalar one: at most two launches, whatever the number of tensors. Cached on the data
    pointers and numels; rebuilt, on the host, only when they change.
    """
    all_lists = [*lists, *scalars]
    numels = tuple(t.numel() for t in lists[0])
    ptr_key = (device, numels, tuple(tuple(t.data_ptr() for t in lst) for lst in all_lists))
    cached = _cache_get(_ptr_tables, ptr_key)
    if cached is None:
        n = len(numels)
        stride = n + (n % 2)  # keep every row 16-byte aligned (one specialisation for all groups)
        host = torch.zeros((len(all_lists), stride), dtype=torch.int64)
        for k, ptrs in enumerate(ptr_key[2]):
            host[k, :n] = torch.tensor(ptrs, dtype=torch.int64)
        dev = _to_device(host, device)
        tables = [dev[k] for k in range(len(all_lists))]
        vec_ptrs = ptr_key[2][: len(lists)]
        aligned = tuple(
            numels[i] % 8 == 0 and all(ptrs[i] % 16 == 0 for ptrs in vec_ptrs) for i in range(n)
        )
        cached = (tables, aligned)
        _cache_put(_ptr_tables, ptr_key, cached)
    tables, aligned = cached  # type: ignore[misc]

    numels_d = _cache_get(_numels, (device, numels))
    if numels_d is None:
        numels_d = _to_device(torch.tensor(numels, dtype=torch.int64), device)
        _cache_put(_numels, (device, numels), numels_d)

    map_key = (device, BLOCK, numels, aligned)
    launches = _cache_get(_block_maps, map_key)
    if launches is None:
        launches = []
        for cls in (True, False):
            select = [i for i, a in enumerate(aligned) if a == cls]
            if select:
                launches.append(_build_block_map(numels, select, cls, device))
        _cache_put(_block_maps, map_key, launches)
    return LaunchPlan(tables, numels_d, launches)  # type: ignore[arg-type]


def lr_args(lr: float | Tensor, device: torch.device) -> tuple[float, Tensor | None]:
    """``(lr as float, lr tensor)``: a tensor lr on the params' device is read in the kernel."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError(f"lr tensor must have one element, got shape {tuple(lr.shape)}")
        if lr.device == device:
            return 0.0, lr
        if lr.device.type == "cpu":
            return float(lr), None  # a host value: no device sync
        raise ValueError(f"lr tensor is on {lr.device}, the params on {device}")
    return float(lr), None


def scalar_arg(t: Tensor | None, name: str, device: torch.device) -> Tensor | None:
    """``grad_scale`` / ``found_inf``: a 1-element tensor on the params' device, or None."""
    if t is None:
        return None
    if t.numel() != 1 or t.device != device:
        raise ValueError(
            f"{name} must be a 1-element tensor on {device}, got {t.shape} on {t.device}"
        )
    return t


def log_beta(beta: float) -> float:
    """``ln(beta)`` in double on the host (-inf for beta == 0)."""
    return math.log(beta) if beta > 0 else -math.inf


def check_lists(
    where: str,
    params: Sequence[Tensor],
    steps: Sequence[Tensor] | None = None,
    **lists: Sequence[Tensor] | None,
) -> None:
    """Every list (named by its role) as long as ``params``, every tensor on the params' device
    with their dtype and its own param's shape, ``steps`` float32 counters >= 0; an error names
    the parameter index and what is wrong. Skipped while the tensors' key (pointers, sizes,
    strides, dtypes, conj/neg bits) is one that passed (:func:`regoptim.backends.guard.check_cached`)."""
    named = {"param": params, **{k: v for k, v in lists.items() if v is not None}}
    check_cached(where, list(named), list(named.values()), params[0].device, steps)

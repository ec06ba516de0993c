"""What a fused step checks about the tensors it is handed, and the cheap per-step key for it.

The fused backends cache work per group of tensors (the C++ kernel's pointer table, the Triton
launch tables). A cache entry is only as good as the check made when it was built, so every step
rebuilds a key of everything that check depended on and compares it with the cached one:

* per role (params, grads, each piece of state), one column per property: data pointers, sizes,
  strides, dtypes, and whether any tensor carries a conjugate or negative bit. Columns of C-level
  method calls (``map``) cost about half of one Python tuple per tensor; the device is implied by
  the pointer (a meta tensor's pointer is 0, CUDA and host pointers share one address space).
* a role whose key moved (fresh gradients every step) is accepted when its sizes, strides and
  dtypes are those of the params and it carries no bit; anything else takes the full check,
  :func:`validate`, which raises naming the parameter index and what is wrong.

:func:`renumbered` turns the index in such an error, relative to the sub-list a backend was
handed, into the index in the list the optimizer's step function was handed.
"""

from __future__ import annotations

import contextlib
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from itertools import repeat
from operator import attrgetter, is_

import torch
from torch import Tensor

__all__ = [
    "RoleKey",
    "bad_input",
    "check_cached",
    "eager_context",
    "eager_indices",
    "group_key",
    "like_params",
    "renumbered",
    "role_key",
    "torch_fused_split",
    "validate",
    "validate_steps",
]

_ptr = torch._C.TensorBase.data_ptr
_shape = attrgetter("shape")
_stride = torch._C.TensorBase.stride
_is_neg = torch._C.TensorBase.is_neg
_is_conj = torch._C.TensorBase.is_conj
_dtype = attrgetter("dtype")

# (data pointers, sizes, strides, dtypes, any conj/neg bit)
RoleKey = tuple[tuple[int, ...], tuple[torch.Size, ...], tuple[tuple[int, ...], ...], tuple, bool]


def role_key(tensors: Sequence[Tensor], complex_group: bool) -> RoleKey:
    """The key of one role. ``complex_group``: the params are complex, so look for conj bits
    (a real tensor never carries one; a complex tensor in a real group differs in dtype)."""
    bits = any(map(_is_neg, tensors)) or (complex_group and any(map(_is_conj, tensors)))
    return (
        tuple(map(_ptr, tensors)),
        tuple(map(_shape, tensors)),
        tuple(map(_stride, tensors)),
        tuple(map(_dtype, tensors)),
        bits,
    )


def group_key(lists: Sequence[Sequence[Tensor]]) -> list[RoleKey]:
    """One :func:`role_key` per list (params first)."""
    complex_group = bool(lists[0]) and lists[0][0].is_complex()
    return [role_key(lst, complex_group) for lst in lists]


def like_params(key: list[RoleKey], r: int) -> bool:
    """Role ``r`` has the params' sizes, strides and dtypes and no conj/neg bit."""
    k, p = key[r], key[0]
    return not k[4] and k[1] == p[1] and k[2] == p[2] and k[3] == p[3]


def bad_input(
    cls: type[Exception], where: str, index: int, role: str, problem: str, param: Tensor
) -> Exception:
    """``cls("<where>: <role> of parameter <index> <problem>")`` (``"parameter <index> ..."`` for
    the role "param"), which :func:`renumbered` can renumber."""
    whose = f"parameter {index}" if role == "param" else f"{role} of parameter {index}"
    exc = cls(f"{where}: {whose} {problem}")
    exc.regoptim_bad = (where, role, problem, param)  # type: ignore[attr-defined]
    return exc


@contextlib.contextmanager
def renumbered(params: Sequence[Tensor]) -> Iterator[None]:
    """Re-raise a :func:`bad_input` error with the parameter's index in ``params``."""
    try:
        yield
    except (ValueError, TypeError) as exc:
        info = getattr(exc, "regoptim_bad", None)
        if info is None:
            raise
        where, role, problem, param = info
        index = next((i for i, p in enumerate(params) if p is param), None)
        if index is None:
            raise
        raise bad_input(type(exc), where, index, role, problem, param) from None


def validate(
    where: str,
    names: Sequence[str],
    lists: Sequence[Sequence[Tensor]],
    device: torch.device,
    one_dtype: bool = True,
) -> None:
    """Full check of one fused call: every tensor of ``lists`` (params first, one name per list)
    on ``device``, with its param's dtype (and the first param's, ``one_dtype``) and its param's
    shape. Raises naming the parameter index and what is wrong. Extra names are ignored."""
    names = names[: len(lists)]
    params = lists[0]
    for name, lst in zip(names, lists, strict=True):
        if len(lst) != len(params):
            raise ValueError(f"{where}: {len(lst)} {name} tensors for {len(params)} parameters")
    dtype = params[0].dtype
    for i, p in enumerate(params):
        for name, lst in zip(names, lists, strict=True):
            t = lst[i]
            if t.device != device:
                raise bad_input(ValueError, where, i, name, f"is on {t.device}, not {device}", p)
            if t.dtype != p.dtype:
                raise bad_input(
                    TypeError, where, i, name, f"is {t.dtype}, its parameter {p.dtype}", p
                )
            if one_dtype and t.dtype != dtype:
                problem = f"is {t.dtype}, the first one {dtype} (one dtype per fused call)"
                raise bad_input(TypeError, where, i, name, problem, p)
            if t.shape != p.shape:
                problem = (
                    f"has {t.numel()} elements (shape {tuple(t.shape)}), its parameter "
                    f"{p.numel()} (shape {tuple(p.shape)})"
                )
                raise bad_input(ValueError, where, i, name, problem, p)


def validate_steps(
    where: str, params: Sequence[Tensor], steps: Sequence[Tensor], device: torch.device
) -> None:
    """Adam's step counters: float32 one-element tensors on the params' device, holding a
    finite count >= 0 (read on the host in one transfer: this runs when the counters were
    replaced, not per step)."""
    if len(steps) != len(params):
        raise ValueError(f"{where}: {len(steps)} step tensors for {len(params)} parameters")
    for i, (p, s) in enumerate(zip(params, steps, strict=True)):
        if s.dtype != torch.float32 or s.numel() != 1 or s.device != device:
            problem = (
                f"is {s.dtype} {tuple(s.shape)} on {s.device}; the fused kernels keep it as a "
                f"float32 one-element tensor on {device} (as torch's fused Adam)"
            )
            raise bad_input(TypeError, where, i, "step", problem, p)
    if not steps:
        return
    values = torch.cat([s.detach().reshape(1) for s in steps]).tolist()
    for i, value in enumerate(values):
        if not (math.isfinite(value) and value >= 0):
            raise bad_input(
                ValueError, where, i, "step", f"is {value}, not a count >= 0", params[i]
            )


def eager_indices(
    fused_dtypes: frozenset[torch.dtype],
    params: Sequence[Tensor],
    *others: Sequence[Tensor | None] | None,
) -> tuple[list[int], list[int]]:
    """``(eager, mixed)``: the indices a fused step hands to torch's for-loop instead, and among
    them those whose grad or state has another dtype than the param (``None`` entries: state not
    created yet). The fused kernels store one dtype per call; torch's for-loop takes a param dtype
    they do not (float64) and the mixes torch allows (a bfloat16 momentum buffer on a float32
    param, a float64 grad from ``Parameter.grad_dtype``). One dtype column per list on the usual
    path; per-index work only when something differs."""
    pd = list(map(_dtype, params))
    odd = [lst for lst in others if lst is not None and _dtypes(lst, pd) != pd]
    if not odd and set(pd) <= fused_dtypes:
        return [], []
    mixed = [i for i, d in enumerate(pd) if any(_differs(lst[i], d) for lst in odd)]
    mixed_set = set(mixed)
    eager = [i for i, d in enumerate(pd) if d not in fused_dtypes or i in mixed_set]
    return eager, mixed


def _dtypes(lst: Sequence[Tensor | None], default: list[torch.dtype]) -> list[torch.dtype]:
    if any(map(is_, lst, repeat(None))):  # not `None in lst`: Tensor.__eq__ is slow
        return [d if t is None else t.dtype for t, d in zip(lst, default, strict=True)]
    return list(map(_dtype, lst))


def _differs(t: Tensor | None, dtype: torch.dtype) -> bool:
    return t is not None and t.dtype != dtype


@contextlib.contextmanager
def eager_context(where: str, mixed: list[int]) -> Iterator[None]:
    """Name the ``mixed`` indices (grad/state dtype other than the param's, handed to torch's
    for-loop by :func:`eager_indices`) in a RuntimeError torch raises for them."""
    try:
        yield
    except RuntimeError as exc:
        if not mixed:
            raise
        raise RuntimeError(
            f"{where}: parameters {mixed} have a grad or state of another dtype than their own; "
            f"they took torch's for-loop, which raised: {exc}"
        ) from exc


_checked: OrderedDict[tuple, tuple[list[RoleKey], list[int]]] = OrderedDict()
_MAX_CHECKED = 32


def check_cached(
    where: str,
    names: Sequence[str],
    lists: Sequence[Sequence[Tensor]],
    device: torch.device,
    steps: Sequence[Tensor] | None = None,
    one_dtype: bool = True,
    key: list[RoleKey] | None = None,
) -> list[int]:
    """:func:`validate` (and :func:`validate_steps` for ``steps``), skipped while the
    :func:`group_key` of the tensors is one that passed before; a role whose tensors moved is
    accepted without the full check when it matches the params (:func:`like_params`) and sits on
    ``device``. Returns the indices where a tensor's strides differ from its param's (for kernels
    that read every tensor in its param's layout), worked out on a full check and cached.
    ``key``: the :func:`group_key` of ``lists`` (and ``steps``) when the caller has it."""
    all_lists = [*lists, steps] if steps is not None else list(lists)
    if key is None:
        key = group_key(all_lists)
    slot = (where, one_dtype, len(all_lists), len(lists[0]), key[0][0][:1])
    seen = _checked.get(slot)
    if seen is not None and seen[0][0] == key[0]:
        _checked.move_to_end(slot)
        old, strided = seen
        changed = [r for r in range(len(all_lists)) if key[r] != old[r]]
        if all(
            r < len(lists) and like_params(key, r) and all(t.device == device for t in lists[r])
            for r in changed
        ):
            for r in changed:
                old[r] = key[r]
            return strided
    validate(where, names, lists, device, one_dtype)
    if steps is not None:
        validate_steps(where, lists[0], steps, device)
    strided = [i for i, s in enumerate(key[0][2]) if any(k[2][i] != s for k in key[1 : len(lists)])]
    _checked[slot] = (key, strided)
    if len(_checked) > _MAX_CHECKED:
        _checked.popitem(last=False)
    return strided


_FLOATING = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def torch_fused_split(
    where: str,
    names: Sequence[str],
    lists: Sequence[Sequence[Tensor]],
    steps: Sequence[Tensor] | None = None,
) -> tuple[list[int], list[int]]:
    """``(eager, mixed)`` for torch's own fused CPU kernels (``torch._fused_sgd_`` /
    ``_fused_adam_``), which check devices and dtypes but read every tensor with its param's
    numel and layout: a shorter state is read and written out of bounds, a transposed one pairs
    the wrong elements. The other indices are checked (:func:`check_cached`, shapes included);
    ``eager`` lists those for torch's for-loop: grads/state of another dtype than the param
    (``mixed``, which torch's for-loop takes) and tensors whose strides differ from the param's."""
    key = group_key([*lists, steps] if steps is not None else lists)
    dtypes = key[0][3]
    if all(k[3] == dtypes for k in key[1 : len(lists)]) and set(dtypes) <= _FLOATING:
        device = lists[0][0].device
        return check_cached(where, names, lists, device, steps, one_dtype=False, key=key), []
    eager, mixed = eager_indices(_FLOATING, lists[0], *lists[1:])
    eager_set = set(eager)
    keep = [i for i in range(len(lists[0])) if i not in eager_set] if eager else None
    sub = [[lst[i] for i in keep] for lst in lists] if keep is not None else lists
    sub_steps = [steps[i] for i in keep] if keep is not None and steps is not None else steps
    if not sub[0]:
        return eager, mixed
    strided = check_cached(where, names, sub, sub[0][0].device, sub_steps, one_dtype=False)
    if strided:
        eager = sorted([*eager, *(keep[j] if keep is not None else j for j in strided)])
    return eager, mixed

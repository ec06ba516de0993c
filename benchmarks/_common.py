"""Shared by the pytest-benchmark suite and ``benchmarks/run.py``: the hyperparameters, the table of
implementations, the size presets, the parameter lists and the bytes-moved model. The timers and
the interleaved runner are in ``benchmarks/_runner.py``, the machine description and the
bandwidth ceiling in ``benchmarks/_machine.py``.

Bytes-moved model
-----------------
The effective bandwidth of an optimizer step is ``bytes_per_step / time``, where ``bytes_per_step``
is the traffic of an ideal *one-pass* update of the family, the same number for every
implementation in a family (so an implementation that makes extra passes over memory shows up as a
lower effective GB/s, never as more bytes):

* SGD with momentum: reads ``p, g, b`` and writes ``p, b``: 5 tensors of the parameter's dtype per
  parameter (3 without momentum: reads ``p, g``, writes ``p``).
* Adam/AdamW: reads ``p, g, m, v`` and writes ``p, m, v``: 7 tensors per parameter (9 with
  amsgrad: also reads and writes ``max_v``).

Decoupled weight decay and the L1 prox add no traffic to a one-pass update (they are arithmetic on
values already loaded), so the model is the same with or without regularizers. Step counters,
learning rates and other scalars are ignored. State tensors have the parameter's dtype, as in
torch.optim.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

import regoptim

# --- hyperparameters of the two families (issue 4) ---------------------------------------------

LR = 1e-3
SGD_MOMENTUM = 0.9
SGD_WEIGHT_DECAY = 1e-4
ADAMW_WEIGHT_DECAY = 1e-2  # torch.optim.AdamW's default
L1 = 1e-5

FAMILIES = ("sgd", "adamw")
FAMILY_TITLES = {
    "sgd": f"SGD momentum {SGD_MOMENTUM}, weight_decay {SGD_WEIGHT_DECAY:g}",
    "adamw": f"AdamW weight_decay {ADAMW_WEIGHT_DECAY:g}",
}
BASELINE = "torch-fused"


def _sgd(params: list[Tensor], **kw: Any) -> Optimizer:
    return torch.optim.SGD(
        params, lr=LR, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY, **kw
    )


def _prox_sgd(params: list[Tensor], l1: float, **kw: Any) -> Optimizer:
    return regoptim.ProxSGD(
        params, lr=LR, momentum=SGD_MOMENTUM, weight_decay=SGD_WEIGHT_DECAY, l1=l1, **kw
    )


def _adamw(params: list[Tensor], **kw: Any) -> Optimizer:
    return torch.optim.AdamW(params, lr=LR, weight_decay=ADAMW_WEIGHT_DECAY, **kw)


def _prox_adamw(params: list[Tensor], l1: float, **kw: Any) -> Optimizer:
    return regoptim.ProxAdamW(params, lr=LR, weight_decay=ADAMW_WEIGHT_DECAY, l1=l1, **kw)


def _regoptim_fused_unavailable(device: torch.device) -> str | None:
    from regoptim.backends.dispatch import fused_unavailable_reason

    return fused_unavailable_reason(device.type)


@dataclass(frozen=True)
class Impl:
    """One implementation of one family's step."""

    key: str  # e.g. "torch-fused"
    label: str  # short description for tables
    make: Callable[[list[Tensor]], Optimizer]
    unavailable: Callable[[torch.device], str | None] = lambda device: None


IMPL_KEYS = (  # every implementation the table knows; the baseline first
    "torch-fused",
    "regoptim-default",
    "regoptim-default-noreg",
    "regoptim-fused",
    "torch-loop",
    "torch-foreach",
)

# The rows of the goals, per family: ratios to torch's fused step without regularizers
# (same momentum / weight decay, no L1), for regoptim's default path with L1 and weight decay,
# its default path with L1 off, its fused=True path, and torch's own default implementation
# (the for-loop on CPU, foreach on CUDA).
DEFAULT_IMPLS = {
    "cpu": IMPL_KEYS[:5],
    "cuda": IMPL_KEYS[:4] + ("torch-foreach",),
}

IMPLS: dict[str, dict[str, Impl]] = {
    "sgd": {
        "torch-loop": Impl(
            "torch-loop",
            "torch.optim.SGD(foreach=False) (CPU default)",
            lambda ps: _sgd(ps, foreach=False),
        ),
        "torch-foreach": Impl(
            "torch-foreach", "torch.optim.SGD(foreach=True)", lambda ps: _sgd(ps, foreach=True)
        ),
        "torch-fused": Impl(
            "torch-fused",
            "torch.optim.SGD(fused=True), the baseline",
            lambda ps: _sgd(ps, fused=True),
        ),
        "regoptim-default": Impl(
            "regoptim-default", f"ProxSGD(l1={L1:g}) default path", lambda ps: _prox_sgd(ps, L1)
        ),
        "regoptim-default-noreg": Impl(
            "regoptim-default-noreg",
            "ProxSGD(l1=0) default path: L1 off, weight decay as torch",
            lambda ps: _prox_sgd(ps, 0.0),
        ),
        "regoptim-fused": Impl(
            "regoptim-fused",
            f"ProxSGD(l1={L1:g}, fused=True)",
            lambda ps: _prox_sgd(ps, L1, fused=True),
            _regoptim_fused_unavailable,
        ),
    },
    "adamw": {
        "torch-loop": Impl(
            "torch-loop",
            "torch.optim.AdamW(foreach=False) (CPU default)",
            lambda ps: _adamw(ps, foreach=False),
        ),
        "torch-foreach": Impl(
            "torch-foreach",
            "torch.optim.AdamW(foreach=True)",
            lambda ps: _adamw(ps, foreach=True),
        ),
        "torch-fused": Impl(
            "torch-fused",
            "torch.optim.AdamW(fused=True), the baseline",
            lambda ps: _adamw(ps, fused=True),
        ),
        "regoptim-default": Impl(
            "regoptim-default",
            f"ProxAdamW(l1={L1:g}) default path",
            lambda ps: _prox_adamw(ps, L1),
        ),
        "regoptim-default-noreg": Impl(
            "regoptim-default-noreg",
            "ProxAdamW(l1=0) default path: L1 off, weight decay as torch",
            lambda ps: _prox_adamw(ps, 0.0),
        ),
        "regoptim-fused": Impl(
            "regoptim-fused",
            f"ProxAdamW(l1={L1:g}, fused=True)",
            lambda ps: _prox_adamw(ps, L1, fused=True),
            _regoptim_fused_unavailable,
        ),
    },
}


# --- sizes ---------------------------------------------------------------------------------------

_SUFFIX = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "B": 2**30}


def parse_count(text: str) -> int:
    """``"16M"`` -> 16 * 2**20, ``"1B"``/``"1G"`` -> 2**30, ``"4096"`` -> 4096 (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGB]?)\s*", text.upper())
    if not m:
        raise ValueError(f"not a count: {text!r} (use e.g. 4096, 64K, 16M, 1B)")
    return int(float(m.group(1)) * _SUFFIX[m.group(2)])


def parse_list(text: str | Iterable[str], parse: Callable[[str], Any] = str) -> list[Any]:
    items = text.split(",") if isinstance(text, str) else [t for s in text for t in s.split(",")]
    return [parse(t.strip()) for t in items if t.strip()]


def format_count(n: int) -> str:
    """``16777216`` -> ``16M``; counts that are no whole binary unit print as they are: ``20000``."""
    for suffix, unit in (("B", 2**30), ("M", 2**20), ("K", 2**10)):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{suffix}"
    if n >= 2**20:
        return f"{n / 2**20:.1f}M"
    return str(n)


def parse_case(text: str) -> tuple[int, int]:
    """``"16M/1024"`` -> (16 * 2**20 params, 1024 tensors); ``"400000/400"``: 400 x 1000."""
    numel, sep, tensors = text.partition("/")
    if not sep:
        raise ValueError(f"not a case: {text!r} (use TOTAL/TENSORS, e.g. 16M/64 or 20000/4)")
    return parse_count(numel), int(tensors)


# Size presets, TOTAL/TENSORS. The small CPU cases are the small models: 4 x 5000,
# 100 x 100 and 400 x 1000 elements (tensors x elements each); they stay in cache between steps,
# so their us/step measures the per-step and per-tensor overhead, not memory bandwidth.
CPU_LARGE = "16M/4,16M/64,16M/1024"
CPU_SMALL = "20000/4,10000/100,400000/400"
PRESETS = {
    "cpu": f"{CPU_LARGE},{CPU_SMALL}",
    "cpu-large": CPU_LARGE,
    "cpu-small": CPU_SMALL,
    "cuda": ",".join(f"{n}/{t}" for n in ("1M", "10M", "100M", "1B") for t in (100, 500)),
    "smoke": "16K/1,16K/4,2000/10",
}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} (choose from {', '.join(DTYPES)})") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# --- parameters and gradients ----------------------------------------------------------------


def split_sizes(numel: int, tensors: int) -> list[int]:
    """``numel`` elements in ``tensors`` 1-D tensors of (nearly) equal size."""
    if not 1 <= tensors <= numel:
        raise ValueError(f"cannot split {numel} elements into {tensors} tensors")
    base, rest = divmod(numel, tensors)
    return [base + (i < rest) for i in range(tensors)]


def make_params(
    numel: int, tensors: int, dtype: torch.dtype, device: torch.device | str, seed: int = 0
) -> list[Tensor]:
    """Leaf parameters (``numel`` elements in ``tensors`` tensors) with ``.grad`` allocated."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for n in split_sizes(numel, tensors):
        p = torch.empty(n, dtype=dtype, device=device)
        p.uniform_(-1.0, 1.0, generator=gen)
        p.requires_grad_(True)
        p.grad = torch.empty_like(p)
        params.append(p)
    regen_grads(params, gen)
    return params


def regen_grads(params: list[Tensor], gen: torch.Generator | None = None) -> None:
    """Fresh gradient values (outside the timed region): the step reads gradients that were just
    written, as after a backward pass."""
    with torch.no_grad():
        for p in params:
            p.grad.uniform_(-1.0, 1.0, generator=gen)  # type: ignore[union-attr]


def state_tensors_per_param(family: str) -> int:
    return {"sgd": 1, "adamw": 2}[family]


def bytes_per_step(family: str, numel: int, dtype: torch.dtype) -> int:
    """Traffic of an ideal one-pass step (see the module docstring)."""
    per_param = {"sgd": 5, "adamw": 7}[family]
    return per_param * numel * torch.empty((), dtype=dtype).element_size()


def case_bytes(family: str, numel: int, dtype: torch.dtype, n_impls: int) -> int:
    """Memory a case holds: params + grads, plus one state per live implementation."""
    size = torch.empty((), dtype=dtype).element_size()
    return numel * size * (2 + state_tensors_per_param(family) * n_impls)

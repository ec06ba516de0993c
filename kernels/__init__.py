"""regoptim's fused Triton kernels (installed as ``regoptim._kernels``).

One kernel per family (ProxSGD; ProxAdam/ProxAdamW) updates every parameter of a (device, dtype)
group in at most two launches (16-byte-aligned tensors get a vectorised variant) and one
pass over memory. They run compiled on CUDA tensors, or on CPU tensors
in Triton's interpreter when ``TRITON_INTERPRET=1`` is set before this package's kernels are first
used (that is how CI validates them).

Group lasso (``group_l1 > 0``) has its own kernels, one launch per param group and step: one
program per group updates its slices in every tensor, reduces the group's norm and applies the
group prox (``fused_group_sgd_``, ``fused_group_adam_``). Both kinds call the family's
per-element update from ``_update`` (one ``@triton.jit`` device function per family).

This module imports without triton; :func:`available` says whether the kernels can run, and the
step functions import the kernels on first use.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

__all__ = [
    "available",
    "fused_group_adam_",
    "fused_group_sgd_",
    "fused_prox_adam_",
    "fused_prox_sgd_",
]


def available() -> str | None:
    """``None`` if the Triton kernels can run here, else a message saying what ``fused=True`` needs.

    They can run when triton imports and either a CUDA device is present or ``TRITON_INTERPRET=1``
    (CPU tensors in Triton's interpreter).
    """
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except ImportError as exc:
        return (
            "fused=True needs Triton for regoptim's fused kernels "
            f"(pip install 'regoptim[triton]'): {exc}"
        )
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return (
        "fused=True runs regoptim's Triton kernels on CUDA tensors, or on CPU tensors in Triton's "
        "interpreter with TRITON_INTERPRET=1; neither is available here (use fused=None)"
    )


# The step functions, each from the module that holds its kernel, imported on first use (PEP 562):
# importing this package needs no triton. Each backend's functions share one signature, the
# contract of regoptim.backends.dispatch.fused_prox_sgd_ / fused_prox_adam_ and of
# regoptim.backends.group_step (fused_group_sgd_ / fused_group_adam_).
_LAZY = {
    "fused_prox_sgd_": "_sgd",
    "fused_prox_adam_": "_adam",
    "fused_group_sgd_": "_group_sgd",
    "fused_group_adam_": "_group_adam",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    fn = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = fn
    return fn

"""The one tolerance table: every comparison against the float64 reference reads from here.

The bounds are per dtype of the *parameter* (the dtype the update is stored in) and apply to a
few steps of an update whose inputs are O(1). float64 is the reference's own precision: the torch
path differs from it only by the order of operations. float32 allows a few ulps of drift over the
steps. bfloat16 and float16 store every intermediate (parameter, momentum, moments) rounded to
8 and 11 significant bits; their bounds are a few units of that rounding (bfloat16 eps 7.8e-3,
float16 eps 9.8e-4), not a blanket "close enough".
"""

from __future__ import annotations

import torch

TOL: dict[torch.dtype, dict[str, float]] = {
    torch.float64: {"rtol": 1e-12, "atol": 1e-12},
    torch.float32: {"rtol": 1e-5, "atol": 1e-6},
    torch.bfloat16: {"rtol": 2e-2, "atol": 2e-2},
    torch.float16: {"rtol": 3e-3, "atol": 3e-3},
    torch.complex128: {"rtol": 1e-12, "atol": 1e-12},
    torch.complex64: {"rtol": 1e-5, "atol": 1e-6},
}


def tol(dtype: torch.dtype) -> dict[str, float]:
    return TOL[dtype]


def assert_close_to_ref(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """Compare ``actual`` (stored in ``dtype``) with a float64/complex128 reference."""
    ref_dtype = torch.complex128 if expected.is_complex() else torch.float64
    torch.testing.assert_close(
        actual.detach().to(ref_dtype), expected.to(ref_dtype), **TOL[dtype], equal_nan=True
    )


def assert_close_normwise(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """``actual`` within ``rtol`` of ``expected`` relative to ``expected``'s largest magnitude:
    for outputs of products whose summation order may differ (a layer of another inner size),
    where rounding scales with the largest terms rather than with each entry."""
    rtol = TOL[dtype]["rtol"]
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * max(scale, 1.0))

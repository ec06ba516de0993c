"""Property tests of the proximal operators (regoptim.regularizers.l1) and their reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from regoptim.reference import soft_threshold_ref
from regoptim.regularizers.l1 import soft_threshold, soft_threshold_

finite = st.floats(allow_nan=False, allow_infinity=False, width=64, min_value=-1e6, max_value=1e6)
thresholds = st.floats(min_value=0.0, max_value=1e3, allow_nan=False, width=64)
vectors = st.lists(finite, min_size=1, max_size=64)


@settings(max_examples=300, deadline=None)
@given(vectors, thresholds)
def test_soft_threshold_properties(xs, t):
    x = torch.tensor(xs, dtype=torch.float64)
    y = soft_threshold(x, t)
    # never flips a sign
    assert bool(((y == 0) | (torch.sign(y) == torch.sign(x))).all())
    # zero iff |x| <= t
    assert torch.equal(y == 0, x.abs() <= t)
    # shrinks |x| by exactly min(|x|, t): |y| is the float64 rounding of |x| - min(|x|, t)
    for xi, yi in zip(xs, y.tolist(), strict=True):
        assert abs(yi) == max(abs(xi) - t, 0.0) or (abs(xi) <= t and yi == 0.0)
    # identical to the reference transcription
    assert torch.equal(y, soft_threshold_ref(x, t))


@settings(max_examples=100, deadline=None)
@given(vectors)
def test_identity_at_zero_threshold(xs):
    x = torch.tensor(xs, dtype=torch.float64)
    assert torch.equal(soft_threshold(x, 0.0), x)
    assert torch.equal(soft_threshold(x, torch.zeros_like(x)), x)
    z = x.clone()
    soft_threshold_(z, 0.0)
    assert torch.equal(z, x)


@settings(max_examples=200, deadline=None)
@given(vectors, st.lists(thresholds, min_size=64, max_size=64))
def test_per_element_threshold(xs, ts):
    x = torch.tensor(xs, dtype=torch.float64)
    t = torch.tensor(ts[: len(xs)], dtype=torch.float64)
    y = soft_threshold(x, t)
    assert torch.equal(y, soft_threshold_ref(x, t))
    assert torch.equal(y == 0, x.abs() <= t)


@settings(max_examples=200, deadline=None)
@given(vectors, vectors, thresholds)
def test_complex_shrinks_modulus_keeps_phase(re, im, t):
    n = min(len(re), len(im))
    x = torch.complex(torch.tensor(re[:n]), torch.tensor(im[:n])).to(torch.complex128)
    y = soft_threshold(x, t)
    mod = x.abs()
    assert torch.equal(y == 0, mod <= t)
    keep = mod > t
    torch.testing.assert_close(y.abs()[keep], (mod - t)[keep], rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(torch.angle(y[keep]), torch.angle(x[keep]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y, soft_threshold_ref(x, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_low_precision_exact_zeros_and_inplace(dtype):
    x = torch.tensor([-2.0, -0.5, -0.25, 0.0, 0.25, 0.5, 2.0], dtype=dtype)
    y = soft_threshold(x, 0.5)
    assert y.dtype == dtype
    assert y.tolist() == [-1.5, 0.0, 0.0, 0.0, 0.0, 0.0, 1.5]
    z = x.clone()
    assert soft_threshold_(z, 0.5) is z
    assert torch.equal(z, y)


def test_nan_propagates_and_is_never_zeroed():
    x = torch.tensor([float("nan"), 1.0, float("inf"), -float("inf")])
    y = soft_threshold(x, 0.5)
    assert math.isnan(y[0]) and y[1] == 0.5
    assert y[2] == float("inf") and y[3] == -float("inf")
    c = soft_threshold(torch.tensor([complex(float("nan"), 0.0)]), 0.5)
    assert torch.isnan(c.real).all()


def test_bad_threshold():
    with pytest.raises(ValueError, match="threshold must be >= 0, got -1"):
        soft_threshold(torch.ones(2), -1.0)
    with pytest.raises(ValueError, match="nan"):
        soft_threshold(torch.ones(2), float("nan"))

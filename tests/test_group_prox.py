"""The group prox on its own: the float64 reference against a generic minimiser of the prox
objective, and the eager forms (regoptim.regularizers.group_lasso) against the reference per dtype."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from tolerances import assert_close_to_ref

from regoptim.reference import group_prox_ref
from regoptim.regularizers import group_lasso as group_prox
from regoptim.regularizers.l1 import soft_threshold


def _objective(x, y, d, lr, lam, l1):
    """lam*||x|| + l1*||x||_1 + sum_i d_i (x_i - y_i)^2 / (2 lr), the prox's objective."""
    return lam * np.linalg.norm(x) + l1 * np.abs(x).sum() + (d * (x - y) ** 2).sum() / (2 * lr)


def _prox_ref(y, d, lr, lam, l1):
    """The composition the optimizers apply: L1 soft-threshold by lr*l1/d, then the group prox."""
    z = soft_threshold(torch.from_numpy(y), torch.from_numpy(lr * l1 / d))
    (x,) = group_prox_ref([z], [0], lr=lr, group_l1=lam, denominators=[torch.from_numpy(d)[None]])
    return x.numpy()


_METHODS = [
    ("Powell", {"xtol": 1e-12, "ftol": 1e-15, "maxiter": 200000, "maxfev": 200000}),
    ("Nelder-Mead", {"xatol": 1e-12, "fatol": 1e-15, "maxiter": 200000, "maxfev": 200000}),
]


def _minimise(y, d, lr, lam, l1, starts):
    best = None
    for x0 in starts:
        for method, options in _METHODS:
            res = minimize(_objective, x0, args=(y, d, lr, lam, l1), method=method, options=options)
            if best is None or res.fun < best.fun:
                best = res
    return best


@pytest.mark.parametrize("l1", [0.0, 0.3], ids=["group", "sparse-group"])
@pytest.mark.parametrize("seed", range(6))
def test_reference_minimises_the_prox_objective(seed, l1):
    rng = np.random.default_rng(seed)
    n = 2 + seed % 3
    y = rng.standard_normal(n)
    d = np.exp(rng.standard_normal(n))  # Adam's per-element metric
    lr = 0.7
    z = np.sign(y) * np.maximum(np.abs(y) - lr * l1 / d, 0)
    edge = np.linalg.norm(d * z) / lr  # the lam at which the group becomes zero
    for lam in (0.3 * edge, 0.999 * edge, 1.001 * edge, 2 * edge):
        x = _prox_ref(y[None], d, lr, lam, l1)[0]
        assert (not x.any()) == (lam >= edge)  # zero exactly when ||d z|| <= lr*lam
        best = _minimise(y, d, lr, lam, l1, [y, np.zeros(n), x + 1e-3])
        fx = _objective(x, y, d, lr, lam, l1)
        assert fx <= best.fun + 1e-12, (fx, best.fun)
        # strong convexity (modulus min(d)/lr): the minimiser is near x
        assert (
            np.linalg.norm(best.x - x)
            <= np.sqrt(2 * lr * max(best.fun - fx, 1e-16) / d.min()) + 1e-5
        )


def test_zero_condition_is_exact_on_the_edge():
    d = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    z = torch.tensor([[0.5, -0.25, 2.0]], dtype=torch.float64)
    edge = float(torch.linalg.vector_norm(d * z))
    (at,) = group_prox_ref([z], [0], lr=1.0, group_l1=edge, denominators=[d])
    (above,) = group_prox_ref([z], [0], lr=1.0, group_l1=edge * (1 - 1e-9), denominators=[d])
    assert not at.any() and above.abs().min() > 0


def _groups(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes, axes = [(6, 4), (6,), (3, 6, 2)], [0, 0, 1]
    ts = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    ts[0][2] = 0.0
    ts[1][2] = 0.0
    ts[2][:, 2] = 0.0  # group 2 is zero across all three tensors
    ds = [torch.exp(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
    return [t.to(dtype) for t in ts], ds, axes


DTYPES = [torch.float64, torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_soft_threshold_matches_reference(dtype):
    ts, _, axes = _groups(dtype)
    expected = group_prox_ref(ts, axes, lr=0.5, group_l1=4.0)
    group_prox.group_soft_threshold_(ts, axes, 0.5 * 4.0)
    for t, e in zip(ts, expected, strict=True):
        assert_close_to_ref(t, e, dtype)
    zero_groups = [
        i
        for i in range(6)
        if not any(e.select(a, i).any() for e, a in zip(expected, axes, strict=True))
    ]
    assert 2 in zero_groups and 0 < len(zero_groups) < 6  # some groups zeroed, not all
    for i in range(6):
        assert all(
            (t.select(a, i) == 0).all() == (i in zero_groups) for t, a in zip(ts, axes, strict=True)
        )
    assert not any(t.isnan().any() for t in ts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("host_checks", [True, False], ids=["until-converged", "fixed-iters"])
@pytest.mark.parametrize("block", [None, 20], ids=["one-block", "blocks-of-one-group"])
def test_diag_group_prox_matches_reference(dtype, host_checks, block, monkeypatch):
    if block is not None:  # 20 elements: one group (11 elements) per CPU block
        monkeypatch.setattr(group_prox, "_BLOCK_NUMEL", block)
    ts, ds, axes = _groups(dtype)
    expected = group_prox_ref(ts, axes, lr=0.5, group_l1=3.0, denominators=ds)
    group_prox.group_prox_diag_(
        ts,
        [d.to(torch.float32 if dtype != torch.float64 else dtype) for d in ds],
        axes,
        1.5,
        host_checks=host_checks,
    )
    for t, e in zip(ts, expected, strict=True):
        assert_close_to_ref(t, e, dtype)
    n_zero = sum(
        all(not e.select(a, i).any() for e, a in zip(expected, axes, strict=True)) for i in range(6)
    )
    assert 1 <= n_zero < 6
    for i in range(6):
        ref_zero = all(not e.select(a, i).any() for e, a in zip(expected, axes, strict=True))
        assert all(
            bool((t.select(a, i) == 0).all()) == ref_zero for t, a in zip(ts, axes, strict=True)
        )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("spread", [1, 4, 12])
@pytest.mark.parametrize("edge", [0.01, 0.5, 0.99])
def test_newton_converges_in_few_iterations(dtype, spread, edge, monkeypatch):
    """d = exp(spread * N(0, 1)) clamped to [1e-8, 1e8], groups of 50, c at a fraction ``edge``
    of the median ||d z||: 8 iterations reach the converged root (4 ulps), so FIXED_ITERS (30,
    the count without host checks) does; with equal d, one iteration lands on it."""
    g = torch.Generator().manual_seed(spread)
    z = torch.randn(500, 50, generator=g, dtype=torch.float64).to(dtype)
    d = torch.exp(spread * torch.randn(500, 50, generator=g, dtype=torch.float64)).clamp(1e-8, 1e8)
    d = d.to(dtype)
    a = d * z
    c = edge * float(torch.linalg.vector_norm(a, dim=1).median())
    alive = torch.linalg.vector_norm(a, dim=1) > c
    hi = torch.linalg.vector_norm(z, dim=1)
    converged = group_prox._solve_rho(a, d, c, alive, hi, True)
    assert group_prox.FIXED_ITERS >= 8
    monkeypatch.setattr(group_prox, "FIXED_ITERS", 8)
    few = group_prox._solve_rho(a, d, c, alive, hi, False)
    torch.testing.assert_close(few, converged, rtol=4 * torch.finfo(dtype).eps, atol=0)
    h = ((a / (d * converged[:, None] + c)) ** 2).sum(dim=1)  # h(rho) = 1 at the root
    torch.testing.assert_close(
        h[alive], torch.ones_like(h[alive]), rtol=0, atol=50 * torch.finfo(dtype).eps
    )
    monkeypatch.setattr(group_prox, "FIXED_ITERS", 1)
    flat = torch.full_like(d, 0.3)
    norm = torch.linalg.vector_norm(flat * z, dim=1)
    c = edge * float(norm.median())
    one = group_prox._solve_rho(flat * z, flat, c, norm > c, hi, False)
    exact = ((norm - c) / 0.3).clamp_min(0)  # (||a|| - c) / d, up to its cancellation
    assert ((one - exact).abs() <= 8 * torch.finfo(dtype).eps * norm / 0.3).all()


def test_nan_propagates_and_zero_group_gives_no_nan():
    t = torch.tensor([[0.0, 0.0], [float("nan"), 1.0], [3.0, 4.0]])
    group_prox.group_prox_diag_([t], [torch.ones_like(t)], [0], 1.0)
    assert (t[0] == 0).all() and t[1].isnan().any() and not t[2].isnan().any()
    u = torch.tensor([[0.0, 0.0], [float("nan"), 1.0], [3.0, 4.0]])
    group_prox.group_soft_threshold_([u], [0], 1.0)
    assert (u[0] == 0).all() and u[1].isnan().any()
    torch.testing.assert_close(u[2], torch.tensor([2.4, 3.2]))


def test_mixed_dtypes_accumulate_in_float64():
    """A group spanning a float32 and a float64 tensor: norms in float64 (the float64 tensor keeps
    float64 accuracy), each stored in its own dtype."""
    b = torch.tensor([4.0, 0.1], dtype=torch.float32)
    w = torch.tensor([[3.0, 1 / 3], [1e-9, 0.0]], dtype=torch.float64)
    expected = group_prox_ref([b, w], [0, 0], lr=1.0, group_l1=1.0)
    group_prox.group_soft_threshold_([b, w], [0, 0], 1.0)
    assert_close_to_ref(b, expected[0], torch.float32)
    assert_close_to_ref(w, expected[1], torch.float64)
    assert b.dtype == torch.float32 and w[1, 0] == 0

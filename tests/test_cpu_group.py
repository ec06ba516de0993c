"""Group lasso fused into the C++ CPU kernel (regoptim.backends.cpu.group) against the float64 reference:
the step (regoptim.reference.sgd_step / adam_step) then the group prox (group_prox_ref, with
adam_denominator_ref's metric for Adam), over layouts, flags, dtypes, threads; AMP protocol;
malformed inputs. Tolerances from ``tests/tolerances.py``.

Groups are built with a margin around the threshold: "dead" groups (params and grads scaled by
1e-3) end well below it, "alive" ones well above, so the zero pattern is not a coin toss.
"""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from regoptim import reference as ref
from regoptim.backends.cpu import group as cg
from regoptim.backends.cpu import kernel as cf
from regoptim.hyper import AdamHyper, GroupLasso, SgdHyper

sys.path.insert(0, str(Path(__file__).parent))
from tolerances import assert_close_to_ref  # noqa: E402

pytestmark = pytest.mark.skipif(cf.available() is not None, reason=str(cf.available()))

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# name -> (shapes, axes)
LAYOUTS = {
    "linear-rows+bias": ([(32, 1023), (32,)], [0, 0]),
    "linear-columns": ([(40, 33)], [1]),
    "conv-filters+bias+bn": ([(16, 3, 3, 3), (16,), (16,), (16,)], [0, 0, 0, 0]),
    "conv-in-channels+bn": ([(8, 16, 3, 3), (16,), (16,)], [1, 0, 0]),
    "mlp-hidden-neuron": ([(24, 10), (24,), (5, 24)], [0, 0, 1]),
    "single-group": ([(1, 4097)], [0]),
    "groups-of-1": ([(257,)], [0]),
    "rows-1-1023-1025-4097": ([(12, 1), (12, 1023), (12, 1025), (12, 4097)], [0, 0, 0, 0]),
}


def _group_numel(shapes, axes):
    return sum(math.prod(s) // s[a] for s, a in zip(shapes, axes, strict=True))


def _problem(shapes, axes, dtype=torch.float32, steps=3, seed=0, dead_every=3):
    """Params and per-step grads; every ``dead_every``-th group scaled by 1e-3 (params and grads),
    so it ends far below the threshold, the others far above."""
    gen = torch.Generator().manual_seed(seed)
    n = shapes[0][axes[0]]
    scale = torch.ones(n, dtype=torch.float64)
    scale[::dead_every] = 1e-3

    def one(shape, a):
        t = torch.randn(shape, generator=gen, dtype=torch.float64)
        view = [1] * len(shape)
        view[a] = n
        return t * scale.view(view)

    params = [one(s, a).to(dtype) for s, a in zip(shapes, axes, strict=True)]
    grads = [[one(s, a).to(dtype) for s, a in zip(shapes, axes, strict=True)] for _ in range(steps)]
    return params, grads


def _sgd_hyper(lr, hp):
    return SgdHyper(
        lr=lr,
        weight_decay=hp.get("weight_decay", 0.0),
        momentum=hp.get("momentum", 0.0),
        dampening=hp.get("dampening", 0.0),
        nesterov=hp.get("nesterov", False),
        maximize=hp.get("maximize", False),
        decoupled_weight_decay=hp.get("decoupled_weight_decay", False),
        l1=hp.get("l1", 0.0),
    )


def _adam_hyper(lr, hp):
    betas = hp.get("betas", (0.9, 0.999))
    return AdamHyper(
        lr=lr,
        beta1=betas[0],
        beta2=betas[1],
        eps=hp.get("eps", 1e-8),
        weight_decay=hp.get("weight_decay", 0.0),
        decoupled_weight_decay=hp.get("decoupled_weight_decay", False),
        amsgrad=hp.get("amsgrad", False),
        maximize=hp.get("maximize", False),
        l1=hp.get("l1", 0.0),
    )


def run_sgd(params, grads_per_step, axes, *, lr=0.1, group_l1=None, kernel_lr=None, **hp):
    """Steps the kernel on ``params`` in place; returns the float64 reference. ``group_l1``
    default: a threshold of 0.1 * sqrt(group size) (dead groups ~1e-3 of that size)."""
    if group_l1 is None:
        group_l1 = 0.1 * math.sqrt(_group_numel([p.shape for p in params], axes)) / lr
    refs = [p.detach().double() for p in params]
    states = [{} for _ in params]
    bufs = [torch.empty_like(p) for p in params] if hp.get("momentum", 0.0) else None
    lasso = GroupLasso(group_l1=group_l1, axes=tuple(axes))
    hyper = _sgd_hyper(lr if kernel_lr is None else kernel_lr, hp)
    for step, grads in enumerate(grads_per_step):
        cg.fused_group_sgd_(
            params, [g.clone() for g in grads], bufs, hyper, lasso,
            is_first_step=step == 0, grad_scale=None, found_inf=None,
        )  # fmt: skip
        refs = [
            ref.sgd_step(r, g, s, lr=lr, **hp) for r, g, s in zip(refs, grads, states, strict=True)
        ]
        refs = ref.group_prox_ref(refs, list(axes), lr=lr, group_l1=group_l1)
    return refs


def run_adam(params, grads_per_step, axes, *, lr=0.01, group_l1=None, **hp):
    if group_l1 is None:
        group_l1 = 0.1 * math.sqrt(_group_numel([p.shape for p in params], axes)) / lr
    refs = [p.detach().double() for p in params]
    states = [{} for _ in params]
    amsgrad = hp.get("amsgrad", False)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    vmax = [torch.zeros_like(p) for p in params] if amsgrad else None
    steps = [torch.tensor(0.0) for _ in params]
    lasso = GroupLasso(group_l1=group_l1, axes=tuple(axes))
    hyper = _adam_hyper(lr, hp)
    betas, eps = hp.get("betas", (0.9, 0.999)), hp.get("eps", 1e-8)
    for grads in grads_per_step:
        cg.fused_group_adam_(
            params, [g.clone() for g in grads], m, v, vmax, steps, hyper, lasso,
            grad_scale=None, found_inf=None,
        )  # fmt: skip
        refs = [
            ref.adam_step(r, g, s, lr=lr, **hp) for r, g, s in zip(refs, grads, states, strict=True)
        ]
        ds = [ref.adam_denominator_ref(s, betas=betas, eps=eps, amsgrad=amsgrad) for s in states]
        refs = ref.group_prox_ref(refs, list(axes), lr=lr, group_l1=group_l1, denominators=ds)
    assert all(s.item() == len(grads_per_step) for s in steps)
    return refs


def _zero_groups(tensors, axes):
    """Per group: every element of the group is 0."""
    n = tensors[0].shape[axes[0]]
    nz = torch.zeros(n, dtype=torch.bool)
    for t, a in zip(tensors, axes, strict=True):
        nz |= (t.movedim(a, 0).reshape(n, -1) != 0).any(dim=1)
    return ~nz


def _check(params, refs, axes, dtype):
    for p, r in zip(params, refs, strict=True):
        assert_close_to_ref(p, r, dtype)
    assert torch.equal(_zero_groups(params, axes), _zero_groups(refs, axes))


# ---------------------------------------------------------------------------------------------
# layouts x dtypes


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sgd_layouts_match_reference(layout, dtype):
    shapes, axes = LAYOUTS[layout]
    params, grads = _problem(shapes, axes, dtype)
    refs = run_sgd(params, grads, axes, momentum=0.9, weight_decay=1e-2)
    _check(params, refs, axes, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_adam_layouts_match_reference(layout, dtype):
    shapes, axes = LAYOUTS[layout]
    params, grads = _problem(shapes, axes, dtype)
    refs = run_adam(params, grads, axes, weight_decay=1e-2, decoupled_weight_decay=True)
    _check(params, refs, axes, dtype)


def test_both_zero_and_alive_groups_occur():
    """The margins above leave dead and alive groups in every layout (so the zero-pattern check
    in _check compares something)."""
    for shapes, axes in LAYOUTS.values():
        params, grads = _problem(shapes, axes)
        refs = run_sgd(params, grads, axes, momentum=0.9)
        zero = _zero_groups(refs, axes)
        n = shapes[0][axes[0]]
        assert zero.any() and (n == 1 or not zero.all()), (shapes, axes)


# ---------------------------------------------------------------------------------------------
# every flag, float32

SGD_CASES = [
    dict(
        momentum=mom,
        nesterov=nest,
        dampening=damp,
        weight_decay=wd,
        decoupled_weight_decay=dec,
        l1=l1,
        maximize=mx,
    )  # fmt: skip
    for mom, nest, damp, wd, dec, l1, mx in itertools.product(
        [0.0, 0.9], [False, True], [0.0, 0.5], [0.0, 0.1], [False, True], [0.0, 0.05], [False, True]
    )
    if not (nest and (mom == 0.0 or damp != 0.0))
    and not (mom == 0.0 and damp != 0.0)
    and not (wd == 0.0 and dec)
]


@pytest.mark.parametrize(
    "hp", SGD_CASES, ids=lambda hp: "-".join(f"{k}={v}" for k, v in hp.items())
)
def test_sgd_flags_match_reference(hp):
    shapes, axes = LAYOUTS["mlp-hidden-neuron"]
    params, grads = _problem(shapes, axes, steps=4)
    refs = run_sgd(params, grads, axes, **hp)
    _check(params, refs, axes, torch.float32)


ADAM_CASES = [
    dict(weight_decay=wd, decoupled_weight_decay=dec, amsgrad=ams, l1=l1, maximize=mx)
    for wd, dec, ams, l1, mx in itertools.product(
        [0.0, 0.1], [False, True], [False, True], [0.0, 0.05], [False, True]
    )
    if not (wd == 0.0 and dec)
] + [dict(betas=(0.3, 0.9), l1=0.05, weight_decay=0.1, amsgrad=True)]  # lerp's other branch


@pytest.mark.parametrize(
    "hp", ADAM_CASES, ids=lambda hp: "-".join(f"{k}={v}" for k, v in hp.items())
)
def test_adam_flags_match_reference(hp):
    shapes, axes = LAYOUTS["mlp-hidden-neuron"]
    params, grads = _problem(shapes, axes, steps=4)
    refs = run_adam(params, grads, axes, **hp)
    _check(params, refs, axes, torch.float32)


@pytest.mark.parametrize(
    "hp", ADAM_CASES, ids=lambda hp: "-".join(f"{k}={v}" for k, v in hp.items())
)
def test_adam_flags_on_the_polynomial_path(hp):
    """Every flag with a threshold small enough that most groups take the polynomial path
    (csrc/group_poly.h), rows long enough that their moments come from the update span."""
    shapes, axes = LAYOUTS["linear-rows+bias"]
    params, grads = _problem(shapes, axes, steps=3, dead_every=1000)
    refs = run_adam(params, grads, axes, group_l1=1e-3, **hp)
    _check(params, refs, axes, torch.float32)


def test_adam_widely_spread_denominators():
    """d spread over orders of magnitude within a group (Newton's hard case), thresholds from
    barely alive to strongly shrunk."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 300, generator=gen)
    g = torch.randn(48, 300, generator=gen) * torch.exp(4 * torch.randn(48, 300, generator=gen))
    refs = run_adam([w], [[g], [g * 0.5]], [0], group_l1=40.0)
    assert_close_to_ref(w, refs[0], torch.float32)
    assert not _zero_groups(refs, [0]).all()


def test_adam_constant_denominators_and_small_threshold():
    """Newton's start ||z|| (1 - c/||d z||) is the root when d is constant over a group (|g| the
    same in every element: the first evaluation's x is the result) and nearly so for a small
    threshold (the benchmark's case); and a group whose d spans two values far apart."""
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(24, 515, generator=gen)
    sign = torch.randint(0, 2, (24, 515), generator=gen) * 2.0 - 1.0
    g = sign * torch.rand(24, 1, generator=gen).add(0.1)  # constant |g| per row
    g[20:, ::2] *= 1e3  # rows 20-23: two denominators 1e3 apart
    for group_l1 in (1e-3, 2.0, 30.0):
        params = [w.clone()]
        refs = run_adam(params, [[g], [g * 0.5]], [0], group_l1=group_l1)
        assert_close_to_ref(params[0], refs[0], torch.float32)
        assert torch.equal(_zero_groups(params, [0]), _zero_groups(refs, [0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cols", [300, 1500])
@pytest.mark.parametrize("spread", ["log-normal", "constant", "two-valued"])
def test_adam_polynomial_path_around_its_bound(spread, cols, dtype):
    """The kernel solves a group without a division when c * max t <= ||z|| / 256 (t = 1 / d;
    csrc/group_poly.h, kPolyDelta): rows here put that ratio from 2^-12 to 2^-6, on both sides
    of the bound, with d spread over decades, constant, or two values 1e3 apart. After one Adam
    step d = |g| + eps and z = p - lr * g / d, so a row's ratio is set by its min |g| and ||p||.
    Rows of 300 take their moments from a pass over the group, rows of 1500 from the update span
    (group_blocks.h, kMomentsInSpan), in two chunks."""
    gen = torch.Generator().manual_seed(11)
    rows, lr, group_l1 = 64, 1e-3, 1.0  # c = 1e-3
    if spread == "log-normal":
        mag = torch.exp(2.0 * torch.randn(rows, cols, generator=gen, dtype=torch.float64))
    elif spread == "constant":
        mag = torch.rand(rows, 1, generator=gen, dtype=torch.float64).add(0.5).expand(rows, cols)
    else:
        mag = torch.where(torch.rand(rows, cols, generator=gen) < 0.5, 1.0, 1e-3).double()
    g = mag * (torch.randint(0, 2, (rows, cols), generator=gen) * 2.0 - 1.0)
    ratio = 2.0 ** torch.linspace(-12.0, -6.0, rows, dtype=torch.float64)
    tmax = 1.0 / mag.min(dim=1).values
    w = torch.randn(rows, cols, generator=gen, dtype=torch.float64)
    w *= (lr * group_l1 * tmax / ratio / w.norm(dim=1)).unsqueeze(1)
    params = [w.to(dtype)]
    refs = run_adam(params, [[g.to(dtype)]], [0], lr=lr, group_l1=group_l1)
    z_norm = refs[0].norm(dim=1)  # ~ ||z|| (the shrink is below 1.6%)
    achieved = lr * group_l1 * tmax / z_norm
    assert (achieved < 2.0**-8.5).sum() > 10 and (achieved > 2.0**-7.5).sum() > 10
    assert_close_to_ref(params[0], refs[0], dtype)
    assert not _zero_groups(refs, [0]).any()


def test_adam_polynomial_path_math_in_float64():
    """The polynomial path's math (csrc/group_poly.h: rho from M_0..M_2 by its second-order
    series, x_i = z_i (1 - e_i + e_i^2 - e_i^3)) in float64, at and below its bound
    c * max t <= ||z|| / 256, against the exact root rho^2 = sum z^2 / (1 + c t / rho)^2 found
    by scipy's brentq: x within 2^-30 (relative) of the exact prox, far below float32 rounding;
    a bound 4x looser (1/64) would not be."""
    from scipy.optimize import brentq

    rng = np.random.default_rng(0)

    def worst(delta, trials=400):
        err = 0.0
        for trial in range(trials):
            n = int(rng.integers(1, 300))
            z = rng.standard_normal(n) * np.exp(rng.standard_normal(n) * rng.uniform(0, 3))
            t = [
                np.exp(rng.standard_normal(n) * 3),
                np.ones(n),
                np.where(rng.random(n) < 0.5, 1.0, 1e-6),
                np.where(rng.random(n) < 0.05, 1.0, rng.random(n) * 1e-3),
            ][trial % 4]
            r0 = float(np.linalg.norm(z))
            c = delta * r0 / t.max() * rng.uniform(0.5, 1.0)
            root = brentq(
                lambda r, z=z, c=c, t=t: np.sum(z**2 / (1 + c * t / r) ** 2) - r**2,
                r0 * (1 - 2 * delta), r0, xtol=1e-300, rtol=1e-15,
            )  # fmt: skip
            m0, m1, m2 = np.sum(z**2), np.sum(z**2 * t), np.sum(z**2 * t**2)
            k, u1, u2 = c / r0, m1 / m0, m2 / m0
            rho = r0 * (1 + k * (k * 1.5 * (u2 - u1 * u1) - u1))
            e = c * t / rho
            x = z * (1 + e * (e * (1 - e) - 1))
            exact = z / (1 + c * t / root)
            err = max(err, float(np.max(np.abs(x - exact) / np.abs(exact))))
        return err

    assert worst(1 / 256) < 2.0**-30
    assert worst(1 / 64) > 2.0**-26


# ---------------------------------------------------------------------------------------------
# special values, AMP, lr as a tensor, threads


@pytest.mark.parametrize("family", ["sgd", "adam"])
def test_zero_group_stays_zero_and_nan_propagates(family):
    w = torch.randn(4, 50)
    gw = torch.randn(4, 50)
    w[1] = 0.0
    gw[1] = 0.0
    gw[2, 7] = float("nan")
    run = run_sgd if family == "sgd" else run_adam
    refs = run([w], [[gw]], [0], momentum=0.9) if family == "sgd" else run([w], [[gw]], [0])
    assert (w[1] == 0).all() and not w[1].isnan().any()
    assert w[2].isnan().all()  # the whole group, as the reference
    assert not w[[0, 3]].isnan().any()
    assert_close_to_ref(w[[0, 3]], refs[0][[0, 3]], torch.float32)


@pytest.mark.parametrize("family", ["sgd", "adam"])
@pytest.mark.parametrize("group_l1", [10.0, 1e-4], ids=["general", "polynomial"])
def test_grad_scale_and_found_inf(family, group_l1):
    """The AMP protocol; the scaled step runs the kernel's all-runtime spans, the unscaled one its
    lean spans: bitwise the same (for Adam with group_l1 1e-4 on its polynomial path, the
    moments from both spans)."""
    shapes, axes = LAYOUTS["linear-rows+bias"]
    params, grads = _problem(shapes, axes, steps=1)
    lasso = GroupLasso(group_l1=group_l1, axes=tuple(axes))
    scaled = [g * 1024.0 for g in grads[0]]
    expect = [p.clone() for p in params]
    if family == "sgd":
        hyper = _sgd_hyper(0.1, dict(momentum=0.9))
        bufs = [torch.empty_like(p) for p in params]
        # found_inf: nothing changes, grads not unscaled
        before = [g.clone() for g in scaled]
        cg.fused_group_sgd_(params, scaled, bufs, hyper, lasso, is_first_step=True,
                            grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(1.0))  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(params, expect, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(scaled, before, strict=True))
        cg.fused_group_sgd_(params, scaled, bufs, hyper, lasso, is_first_step=True,
                            grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))  # fmt: skip
        bufs2 = [torch.empty_like(p) for p in expect]
        cg.fused_group_sgd_(expect, [g.clone() for g in grads[0]], bufs2, hyper, lasso,
                            is_first_step=True, grad_scale=None, found_inf=None)  # fmt: skip
    else:
        hyper = _adam_hyper(0.01, {})
        state = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        steps = [torch.tensor(0.0) for _ in params]
        cg.fused_group_adam_(params, scaled, *state, None, steps, hyper, lasso,
                             grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(1.0))  # fmt: skip
        assert all(s.item() == 0 for s in steps)
        assert all(torch.equal(a, b) for a, b in zip(params, expect, strict=True))
        cg.fused_group_adam_(params, scaled, *state, None, steps, hyper, lasso,
                             grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0))  # fmt: skip
        state2 = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        steps2 = [torch.tensor(0.0) for _ in params]
        cg.fused_group_adam_(expect, [g.clone() for g in grads[0]], *state2, None, steps2,
                             hyper, lasso, grad_scale=None, found_inf=None)  # fmt: skip
        assert all(s.item() == 1 for s in steps)
    for g, g0 in zip(scaled, grads[0], strict=True):  # unscaled in place (1024: exact)
        assert torch.equal(g, g0)
    for a, b in zip(params, expect, strict=True):
        assert torch.equal(a, b)


def test_lr_as_tensor():
    shapes, axes = LAYOUTS["conv-filters+bias+bn"]
    params, grads = _problem(shapes, axes)
    refs = run_sgd(params, grads, axes, lr=0.1, kernel_lr=torch.tensor(0.1), momentum=0.9)
    _check(params, refs, axes, torch.float32)


@pytest.mark.parametrize("family", ["sgd", "adam"])
def test_one_and_two_threads_give_identical_results(family):
    """Large enough for the kernel to use 2 threads (>= 32K elements each); every group is
    computed by one thread in the same order whatever the split, so the results are bitwise equal."""
    shapes, axes = [(64, 1025), (64,), (7, 64)], [0, 0, 1]
    results = []
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            params, grads = _problem(shapes, axes, steps=2)
            run = run_sgd if family == "sgd" else run_adam
            refs = (
                run(params, grads, axes, momentum=0.9)
                if family == "sgd"
                else run(params, grads, axes)
            )
            _check(params, refs, axes, torch.float32)
            results.append(params)
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_lr_zero_changes_nothing_but_the_state():
    shapes, axes = LAYOUTS["linear-rows+bias"]
    params, grads = _problem(shapes, axes, steps=1)
    before = [p.clone() for p in params]
    run_sgd(params, grads, axes, lr=0.1, group_l1=1.0, kernel_lr=0.0, momentum=0.9)
    assert all(torch.equal(a, b) for a, b in zip(params, before, strict=True))


# ---------------------------------------------------------------------------------------------
# layouts the kernel cannot address directly, malformed inputs


def _sgd_call(params, grads, bufs, axes, first=True):
    cg.fused_group_sgd_(
        params, grads, bufs, _sgd_hyper(0.1, dict(momentum=0.9)),
        GroupLasso(group_l1=3.0, axes=tuple(axes)), is_first_step=first, grad_scale=None,
        found_inf=None,
    )  # fmt: skip


@pytest.mark.parametrize("which", ["param", "grad", "buf", "channels_last"])
def test_non_contiguous_tensors_are_copied_in_and_out(which):
    gen = torch.Generator().manual_seed(0)
    if which == "channels_last":
        base = [torch.randn(8, 3, 5, 5, generator=gen), torch.randn(8, generator=gen)]
    else:
        base = [torch.randn(16, 40, generator=gen), torch.randn(16, generator=gen)]
    grads = [torch.randn(p.shape, generator=gen) for p in base]
    axes = [0, 0]
    expect = [p.clone() for p in base]
    _sgd_call(expect, [g.clone() for g in grads], [torch.empty_like(p) for p in base], axes)
    _sgd_call(expect, [g.clone() for g in grads], [torch.zeros_like(p) for p in base], axes, False)

    def odd(t):
        if which == "channels_last" and t.ndim == 4:
            return t.contiguous(memory_format=torch.channels_last)
        return t.t().contiguous().t() if t.ndim == 2 else t

    params = [p.clone() for p in base]
    bufs = [torch.empty_like(p) for p in base]
    if which in ("param", "channels_last"):
        params = [odd(p) for p in params]
    if which == "buf":
        bufs = [odd(b) for b in bufs]
    g1 = [odd(g.clone()) if which == "grad" else g.clone() for g in grads]
    _sgd_call(params, g1, bufs, axes)
    zeros = [odd(torch.zeros_like(p)) if which == "buf" else torch.zeros_like(p) for p in base]
    _sgd_call(params, [g.clone() for g in grads], zeros, axes, False)
    for a, b in zip(params, expect, strict=True):
        assert torch.equal(a, b)


def test_malformed_inputs_raise_naming_the_parameter():
    w, b = torch.randn(8, 5), torch.randn(8)
    gw, gb = torch.randn(8, 5), torch.randn(8)
    bufs = [torch.zeros(8, 5), torch.zeros(8)]
    with pytest.raises(ValueError, match="momentum_buffer of parameter 1 has 7 elements"):
        _sgd_call([w, b], [gw, gb], [bufs[0], torch.zeros(7)], [0, 0], first=False)
    with pytest.raises(ValueError, match="grad of parameter 0 has 39 elements"):
        _sgd_call([w, b], [torch.randn(39), gb], bufs, [0, 0])
    with pytest.raises(TypeError, match="grad of parameter 1 is torch.float64"):
        _sgd_call([w, b], [gw, gb.double()], bufs, [0, 0])
    with pytest.raises(ValueError, match="grad of parameter 0 is on meta"):
        _sgd_call([w, b], [gw.to("meta"), gb], bufs, [0, 0])
    with pytest.raises(ValueError, match="same size along its group axis"):
        _sgd_call([w, torch.randn(5)], [gw, torch.randn(5)], [bufs[0], torch.zeros(5)], [0, 0])
    with pytest.raises(ValueError, match="2 group axes for 1 parameters"):
        _sgd_call([w], [gw], [bufs[0]], [0, 0])
    with pytest.raises(TypeError, match="float64"):
        _sgd_call([w.double()], [gw.double()], [bufs[0].double()], [0])
    steps = [torch.tensor(0.0), torch.tensor(0, dtype=torch.int64)]
    state = [[torch.zeros_like(w), torch.zeros_like(b)] for _ in range(2)]
    with pytest.raises(TypeError, match="step of parameter 1"):
        cg.fused_group_adam_([w, b], [gw, gb], *state, None, steps, _adam_hyper(0.01, {}),
                             GroupLasso(group_l1=1.0, axes=(0, 0)), grad_scale=None,
                             found_inf=None)  # fmt: skip
    with pytest.raises(ValueError, match="exp_avg_sq of parameter 0 has 4 elements"):
        cg.fused_group_adam_([w, b], [gw, gb], state[0], [torch.zeros(4), state[1][1]], None,
                             [torch.tensor(0.0)] * 2, _adam_hyper(0.01, {}),
                             GroupLasso(group_l1=1.0, axes=(0, 0)), grad_scale=None,
                             found_inf=None)  # fmt: skip


def test_headers_are_part_of_the_build_cache_key_and_the_package(tmp_path, monkeypatch):
    from regoptim.backends.cpu import build as cb

    assert {"group_lasso.h", "group_poly.h", "group_blocks.h", "spans.h", "elementwise.h"} <= {
        h.name for h in cb._HEADERS
    }
    flags = cb._FLAG_SETS[0]
    before = cb._entry_name(flags)
    changed = tmp_path / cb._HEADERS[-1].name
    changed.write_bytes(cb._HEADERS[-1].read_bytes() + b"// changed\n")
    monkeypatch.setattr(cb, "_HEADERS", [*cb._HEADERS[:-1], changed])
    assert cb._entry_name(flags) != before
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert '"csrc/*.h"' in pyproject

"""Group lasso in the Triton kernels (``fused_group_sgd_``, ``fused_group_adam_``) against the
float64 reference: each step is ``sgd_step``/``adam_step`` per parameter, then ``group_prox_ref``
(with ``adam_denominator_ref`` for Adam's metric).

CPU tensors run the kernels in Triton's interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``
before triton is imported; each kernel keeps an interpreted and a compiled variant), CUDA tensors
compiled (``-m cuda``, where a GPU is present). The interpreter runs a program in milliseconds,
so the tensors are small. The parameters are built so that every group is either well above or
well below the threshold (norms 2 sqrt(m) or 1e-3 sqrt(m), gradients of magnitude >= 0.5 or 1e-3
times that): which groups end exactly zero is then decided with margin, not by rounding.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from regoptim._kernels import fused_group_adam_, fused_group_sgd_  # noqa: E402
from tolerances import assert_close_to_ref  # noqa: E402

from regoptim.hyper import AdamHyper, GroupLasso, SgdHyper  # noqa: E402
from regoptim.reference import (  # noqa: E402
    adam_denominator_ref,
    adam_step,
    group_prox_ref,
    sgd_step,
)

NO_CUDA = not torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(NO_CUDA, reason="no CUDA")]),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
LRS = [0.1, 0.05, 0.02]  # the learning rate changes every step (Adam: a tenth of it)
N_STEPS = 3

# name: (shapes, group axes); every parameter has the same size along its axis
LAYOUTS: dict[str, tuple[list[tuple[int, ...]], list[int]]] = {
    "rows+bias": ([(6, 33), (6,)], [0, 0]),
    "columns": ([(9, 6)], [1]),
    "neuron_in_out": ([(6, 5), (6,), (4, 6)], [0, 0, 1]),  # row, bias entry, next layer's column
    "conv_filters+bn": ([(6, 3, 3, 3), (6,), (6,), (6,)], [0, 0, 0, 0]),
    "conv_in_channels+bn": ([(4, 6, 3, 3), (6,), (6,)], [1, 0, 0]),
    "single_group": ([(1, 40), (1,)], [0, 0]),
    "one_element_groups": ([(7,)], [0]),
    "rows_1": ([(5, 1)], [0]),
    "rows_33": ([(4, 33)], [0]),
    "rows_1025": ([(2, 1025)], [0]),  # a part of a group spans two 1024-element blocks
}


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


# ------------------------------------------------------------------------------------------------
# data: groups alive or dead with margin; drivers against the reference
# ------------------------------------------------------------------------------------------------


def _along(v: torch.Tensor, t: torch.Tensor, axis: int) -> torch.Tensor:
    shape = [1] * t.ndim
    shape[axis] = -1
    return v.view(shape)


def _group_norms(ts: list[torch.Tensor], axes: list[int]) -> torch.Tensor:
    return sum(
        t.movedim(a, 0).reshape(t.shape[a], -1).square().sum(1)
        for t, a in zip(ts, axes, strict=True)
    )


def _group_size(shapes: list[tuple[int, ...]], axes: list[int]) -> int:
    return sum(math.prod(s) // s[a] for s, a in zip(shapes, axes, strict=True))


def _make(
    shapes: list[tuple[int, ...]], axes: list[int], dead: torch.Tensor, seed: int
) -> list[torch.Tensor]:
    """float64 params whose group ``i`` has norm ``2 sqrt(m)`` (``1e-3 sqrt(m)`` where dead)."""
    g = torch.Generator().manual_seed(seed)
    ps = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    m = _group_size(shapes, axes)
    target = torch.where(dead, 1e-3, 2.0) * math.sqrt(m)
    scale = target / _group_norms(ps, axes).sqrt()
    return [p * _along(scale, p, a) for p, a in zip(ps, axes, strict=True)]


def _grads(
    shapes: list[tuple[int, ...]], axes: list[int], dead: torch.Tensor, seed: int
) -> list[torch.Tensor]:
    """float64 grads of magnitude >= 0.5 (1e-3 times that in dead groups)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for s, a in zip(shapes, axes, strict=True):
        r = torch.randn(s, generator=g, dtype=torch.float64)
        r = torch.sign(r) * (0.5 + r.abs())
        out.append(r * _along(torch.where(dead, 1e-3, 1.0), r, a))
    return out


def _dead_mask(n: int, pattern: str) -> torch.Tensor:
    if pattern == "alive":
        return torch.zeros(n, dtype=torch.bool)
    return torch.arange(n) % 2 == 0  # "mixed": every other group dies


def _lr(value: float, lr_tensor: bool, device: str) -> float | torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device) if lr_tensor else value


def _assert_zero_groups(params: list[torch.Tensor], axes: list[int], dead: torch.Tensor) -> None:
    """Dead groups are exactly zero in every tensor, alive ones are not."""
    zero = torch.stack(
        [
            torch.stack([(t.select(a, i) == 0).all() for t, a in zip(params, axes, strict=True)])
            for i in range(dead.numel())
        ]
    ).all(dim=1)
    assert torch.equal(zero.cpu(), dead), (zero, dead)


def run_sgd(
    layout: str | tuple[list[tuple[int, ...]], list[int]],
    dtype: torch.dtype,
    device: str,
    *,
    dead: str = "mixed",
    lr_tensor: bool = False,
    steps: int = N_STEPS,
    **flags: Any,
) -> list[torch.Tensor]:
    shapes, axes = LAYOUTS[layout] if isinstance(layout, str) else layout
    n = shapes[0][axes[0]]
    mask = _dead_mask(n, dead)
    hyper = dict(
        weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False,
        decoupled_weight_decay=False, l1=0.0,
    )  # fmt: skip
    hyper.update(flags)
    group_l1 = 0.5 * math.sqrt(_group_size(shapes, axes))  # threshold 0.05 sqrt(m) at lr 0.1
    ref = _make(shapes, axes, mask, 0)
    params = [p.to(dtype).to(device) for p in ref]
    ref = [p.to(dtype).to(torch.float64) for p in ref]  # the same start
    ref_state: list[dict[str, Any]] = [{} for _ in params]
    bufs = None
    for step in range(steps):
        grads64 = _grads(shapes, axes, mask, 100 + step)
        grads = [g.to(dtype).to(device) for g in grads64]
        if hyper["momentum"] != 0 and step == 0:
            bufs = [torch.full_like(p, float("nan")) for p in params]  # garbage contents
        rec = SgdHyper(lr=_lr(LRS[step], lr_tensor, device), **hyper)
        fused_group_sgd_(
            params, grads, bufs, rec, GroupLasso(group_l1, tuple(axes)), is_first_step=step == 0,
            grad_scale=None, found_inf=None,
        )  # fmt: skip
        ref = [
            sgd_step(r, g.cpu(), s, lr=LRS[step], **hyper)
            for r, g, s in zip(ref, grads, ref_state, strict=True)
        ]
        ref = group_prox_ref(ref, axes, lr=LRS[step], group_l1=group_l1)
    for i, p in enumerate(params):
        assert_close_to_ref(p.cpu(), ref[i], dtype)
        if bufs is not None:
            assert_close_to_ref(bufs[i].cpu(), ref_state[i]["momentum_buffer"], dtype)
    _assert_zero_groups(params, axes, mask)
    return params


def _adam_state(params: list[torch.Tensor], amsgrad: bool) -> dict[str, Any]:
    return {
        "exp_avgs": [torch.zeros_like(p) for p in params],
        "exp_avg_sqs": [torch.zeros_like(p) for p in params],
        "max_exp_avg_sqs": [torch.zeros_like(p) for p in params] if amsgrad else None,
        "state_steps": [torch.zeros((), dtype=torch.float32, device=p.device) for p in params],
    }


ADAM_DEFAULTS = dict(
    beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, decoupled_weight_decay=False,
    amsgrad=False, maximize=False, l1=0.0,
)  # fmt: skip


def run_adam(
    layout: str | tuple[list[tuple[int, ...]], list[int]],
    dtype: torch.dtype,
    device: str,
    *,
    dead: str = "mixed",
    lr_tensor: bool = False,
    steps: int = N_STEPS,
    grad_spread: float = 0.0,
    **flags: Any,
) -> list[torch.Tensor]:
    shapes, axes = LAYOUTS[layout] if isinstance(layout, str) else layout
    n = shapes[0][axes[0]]
    mask = _dead_mask(n, dead)
    hyper = {**ADAM_DEFAULTS, **flags}
    group_l1 = 5.0 * math.sqrt(_group_size(shapes, axes))  # threshold 0.05 sqrt(m) at lr 0.01
    ref = _make(shapes, axes, mask, 0)
    params = [p.to(dtype).to(device) for p in ref]
    ref = [p.to(dtype).to(torch.float64) for p in ref]
    state = _adam_state(params, hyper["amsgrad"])
    ref_state: list[dict[str, Any]] = [{} for _ in params]
    betas = (hyper["beta1"], hyper["beta2"])
    ref_hyper = {k: v for k, v in hyper.items() if k not in ("beta1", "beta2")}
    spread = torch.Generator().manual_seed(7)
    for step in range(steps):
        lr = LRS[step] * 0.1
        grads64 = _grads(shapes, axes, mask, 100 + step)
        if grad_spread:  # d spread over orders of magnitude within a group: Newton iterates
            grads64 = [
                g * torch.exp(grad_spread * torch.randn(g.shape, generator=spread, dtype=g.dtype))
                for g in grads64
            ]
        grads = [g.to(dtype).to(device) for g in grads64]
        rec = AdamHyper(lr=_lr(lr, lr_tensor, device), **hyper)
        fused_group_adam_(
            params, grads, **state, hyper=rec, lasso=GroupLasso(group_l1, tuple(axes)),
            grad_scale=None, found_inf=None,
        )  # fmt: skip
        ref = [
            adam_step(r, g.cpu(), s, lr=lr, betas=betas, **ref_hyper)
            for r, g, s in zip(ref, grads, ref_state, strict=True)
        ]
        ds = [
            adam_denominator_ref(s, betas=betas, eps=hyper["eps"], amsgrad=hyper["amsgrad"])
            for s in ref_state
        ]
        ref = group_prox_ref(ref, axes, lr=lr, group_l1=group_l1, denominators=ds)
    for i, p in enumerate(params):
        assert_close_to_ref(p.cpu(), ref[i], dtype)
        assert state["state_steps"][i].item() == steps
        assert_close_to_ref(state["exp_avgs"][i].cpu(), ref_state[i]["exp_avg"], dtype)
        assert_close_to_ref(state["exp_avg_sqs"][i].cpu(), ref_state[i]["exp_avg_sq"], dtype)
        if hyper["amsgrad"]:
            assert_close_to_ref(
                state["max_exp_avg_sqs"][i].cpu(), ref_state[i]["max_exp_avg_sq"], dtype
            )
    _assert_zero_groups(params, axes, mask)
    return params


# ------------------------------------------------------------------------------------------------
# layouts x dtypes, then the flags (float32, one layout spanning three tensors)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sgd_layouts_dtypes(device, layout, dtype):
    run_sgd(layout, dtype, device, momentum=0.9, nesterov=True, weight_decay=0.1, l1=0.05)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_adam_layouts_dtypes(device, layout, dtype):
    run_adam(layout, dtype, device, weight_decay=0.1, decoupled_weight_decay=True, l1=0.5)


SGD_MOMENTUM = {
    "plain": dict(momentum=0.0),
    "momentum": dict(momentum=0.9, dampening=0.1),
    "nesterov": dict(momentum=0.9, nesterov=True),
}
WD = {
    "nowd": dict(weight_decay=0.0),
    "l2": dict(weight_decay=0.1),
    "decoupled": dict(weight_decay=0.1, decoupled_weight_decay=True),
}


@pytest.mark.parametrize("l1", [0.0, 0.05], ids=["nol1", "l1"])
@pytest.mark.parametrize("wd", WD.values(), ids=WD.keys())
@pytest.mark.parametrize("mom", SGD_MOMENTUM.values(), ids=SGD_MOMENTUM.keys())
def test_sgd_flags(device, mom, wd, l1):
    run_sgd("neuron_in_out", torch.float32, device, l1=l1, **mom, **wd)


def test_sgd_maximize_lr_tensor(device):
    run_sgd(
        "neuron_in_out", torch.float32, device, maximize=True, lr_tensor=True, momentum=0.9,
        weight_decay=0.1, decoupled_weight_decay=True, l1=0.05,
    )  # fmt: skip


@pytest.mark.parametrize("l1", [0.0, 0.5], ids=["nol1", "l1"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("wd", WD.values(), ids=WD.keys())
def test_adam_flags(device, wd, amsgrad, l1):
    run_adam("neuron_in_out", torch.float32, device, amsgrad=amsgrad, l1=l1, **wd)


def test_adam_maximize_lr_tensor(device):
    run_adam(
        "neuron_in_out", torch.float32, device, maximize=True, lr_tensor=True, amsgrad=True,
        weight_decay=0.1, l1=0.5,
    )  # fmt: skip


# not float16: it stores v = (1 - beta2) g^2, subnormal below 6e-5 (|g| < 0.25), where it loses
# digits (the format's range, not the kernel's doing)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_adam_spread_denominators(device, dtype):
    """d over ~4 orders of magnitude within each group: the Newton iteration takes several steps
    (equal d would converge in one), and still matches the reference's bisection."""
    run_adam("rows+bias", dtype, device, dead="alive", grad_spread=2.0, amsgrad=True, l1=0.5)


# ------------------------------------------------------------------------------------------------
# zero groups, NaN, the AMP protocol
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lr", [0.1, 0.0], ids=["lr", "lr0"])
@pytest.mark.parametrize("family", ["sgd", "adam"])
def test_zero_group_stays_zero(device, family, lr):
    """A group at exactly 0 with zero gradients stays exactly 0 (no 0/0), also at lr = 0."""
    shapes, axes = LAYOUTS["neuron_in_out"]
    params = [torch.randn(s, device=device) for s in shapes]
    grads = [torch.randn(s, device=device) for s in shapes]
    for ts in (params, grads):
        for t, a in zip(ts, axes, strict=True):
            t.select(a, 2).zero_()
    lasso = GroupLasso(1.0, tuple(axes))
    bufs = [torch.empty_like(p) for p in params]
    state = _adam_state(params, True)
    for step in range(2):
        if family == "sgd":
            rec = SgdHyper(lr, 0.0, 0.9, 0.0, False, False, False, 0.1)
            fused_group_sgd_(params, grads, bufs, rec, lasso, is_first_step=step == 0,
                             grad_scale=None, found_inf=None)  # fmt: skip
        else:
            rec = AdamHyper(lr, 0.9, 0.999, 1e-8, 0.1, True, True, False, 0.1)
            fused_group_adam_(params, grads, **state, hyper=rec, lasso=lasso, grad_scale=None,
                              found_inf=None)  # fmt: skip
    for t, a in zip(params, axes, strict=True):
        assert not t.isnan().any()
        assert (t.select(a, 2) == 0).all()
        assert (t.select(a, 1) != 0).any()


@pytest.mark.parametrize("family", ["sgd", "adam"])
def test_nan_propagates(device, family):
    """A NaN in a group stays NaN (the eager prox's behaviour); the other groups are unaffected:
    equal to a run where that group held a finite value."""
    shapes, axes = LAYOUTS["rows+bias"]
    results = []
    for poison in (False, True):
        params = [p.float().to(device) for p in _make(shapes, axes, _dead_mask(6, "mixed"), 0)]
        if poison:
            params[0][3, 5] = float("nan")
        grads = [g.float().to(device) for g in _grads(shapes, axes, _dead_mask(6, "mixed"), 1)]
        if family == "sgd":
            rec = SgdHyper(0.1, 0.1, 0.0, 0.0, False, False, False, 0.05)
            fused_group_sgd_(params, grads, None, rec, GroupLasso(3.0, (0, 0)),
                             is_first_step=True, grad_scale=None, found_inf=None)  # fmt: skip
        else:
            rec = AdamHyper(0.01, 0.9, 0.999, 1e-8, 0.0, False, False, False, 0.5)
            fused_group_adam_(params, grads, **_adam_state(params, False), hyper=rec,
                              lasso=GroupLasso(30.0, (0, 0)), grad_scale=None,
                              found_inf=None)  # fmt: skip
        results.append(params)
    clean, poisoned = results
    assert poisoned[0][3].isnan().any()
    others = [i for i in range(6) if i != 3]
    for c, p in zip(clean, poisoned, strict=True):
        assert torch.equal(c[others], p[others])
    assert (clean[0][0] == 0).all() and (clean[0][1] != 0).any()  # the prox did act


def _snapshot(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.clone() for t in tensors]


def _assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


def _amp_step(family: str, device: str, grad_scale: float | None, found_inf: float | None,
              steps: int = 2) -> list[torch.Tensor]:  # fmt: skip
    shapes, axes = LAYOUTS["conv_in_channels+bn"]
    mask = _dead_mask(6, "mixed")
    params = [p.float().to(device) for p in _make(shapes, axes, mask, 0)]
    scale = 1.0 if grad_scale is None else grad_scale
    gs = None if grad_scale is None else torch.tensor(grad_scale, device=device)
    fi = None if found_inf is None else torch.tensor(found_inf, device=device)
    lasso = GroupLasso(2.0, tuple(axes))
    if family == "sgd":
        bufs = [torch.full_like(p, 7.0) for p in params]
        for step in range(steps):
            grads = [(g * scale).float().to(device) for g in _grads(shapes, axes, mask, step)]
            rec = SgdHyper(_lr(0.1, True, device), 0.1, 0.9, 0.0, True, True, False, 0.05)
            fused_group_sgd_(params, grads, bufs, rec, lasso, is_first_step=step == 0,
                             grad_scale=gs, found_inf=fi)  # fmt: skip
        return params + bufs
    state = _adam_state(params, True)
    for t in state["state_steps"]:
        t.fill_(4.0)
    for step in range(steps):
        grads = [(g * scale).float().to(device) for g in _grads(shapes, axes, mask, step)]
        rec = AdamHyper(0.01, 0.9, 0.999, 1e-8, 0.1, False, True, False, 0.5)
        fused_group_adam_(params, grads, **state, hyper=rec, lasso=GroupLasso(20.0, tuple(axes)),
                          grad_scale=gs, found_inf=fi)  # fmt: skip
    return params + [t for lst in state.values() for t in lst]


@pytest.mark.parametrize("family", ["sgd", "adam"])
def test_found_inf_skips_everything(device, family):
    before = _amp_step(family, device, None, None, steps=0)
    after = _amp_step(family, device, 2.0, 1.0)
    _assert_bitwise(after, before)  # params, buffers, moments and step counts untouched


@pytest.mark.parametrize("family", ["sgd", "adam"])
def test_grad_scale_unscales(device, family):
    """Gradients scaled by a power of two and unscaled in the kernel: bitwise the unscaled run."""
    plain = _amp_step(family, device, None, None)
    scaled = _amp_step(family, device, 1024.0, 0.0)
    _assert_bitwise(scaled, plain)
    assert (plain[0].select(1, 0) == 0).all() and (plain[0].select(1, 1) != 0).any()  # prox ran

"""The fused C++ CPU kernel (regoptim.backends.cpu.kernel): float64 reference, torch bitwise, AMP protocol,
build cache, layouts.

Every comparison with the reference reads its tolerance from ``tests/tolerances.py``.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from regoptim import reference as ref
from regoptim.backends.cpu import build as cb
from regoptim.backends.cpu import kernel as cf
from tests._helpers import adam_backend_step, assert_torch_fused_parity, sgd_backend_step

sys.path.insert(0, str(Path(__file__).parent))
from tolerances import assert_close_to_ref  # noqa: E402

pytestmark = pytest.mark.skipif(cf.available() is not None, reason=str(cf.available()))

SIZES = [0, 1, 7, 1023, 1025, 4097]


def _randn(shape, dtype=torch.float32, gen=None):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


# ---------------------------------------------------------------------------------------------
# drivers: run the kernel and the float64 reference side by side


def _run_sgd(params, grads_per_step, *, lr=0.1, **hp):
    """Steps the kernel on ``params`` in place; returns the float64 reference parameters."""
    refs = [p.detach().to(torch.complex128 if p.is_complex() else torch.float64) for p in params]
    states = [{} for _ in params]
    bufs = [torch.empty_like(p) for p in params] if hp.get("momentum", 0.0) else None
    for step, grads in enumerate(grads_per_step):
        sgd_backend_step(
            cf.fused_prox_sgd_,
            params,
            [g.clone() for g in grads],
            bufs,
            lr=lr,
            weight_decay=hp.get("weight_decay", 0.0),
            momentum=hp.get("momentum", 0.0),
            dampening=hp.get("dampening", 0.0),
            nesterov=hp.get("nesterov", False),
            maximize=hp.get("maximize", False),
            decoupled_weight_decay=hp.get("decoupled_weight_decay", False),
            l1=hp.get("l1", 0.0),
            is_first_step=step == 0,
            grad_scale=None,
            found_inf=None,
        )
        for i, g in enumerate(grads):
            refs[i] = ref.sgd_step(refs[i], g, states[i], lr=lr, **hp)
    return refs


def _run_adam(params, grads_per_step, *, lr=0.01, **hp):
    refs = [p.detach().to(torch.complex128 if p.is_complex() else torch.float64) for p in params]
    states = [{} for _ in params]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    amsgrad = hp.get("amsgrad", False)
    vmax = [torch.zeros_like(p) for p in params] if amsgrad else None
    steps = [torch.tensor(0.0) for _ in params]
    betas = hp.get("betas", (0.9, 0.999))
    for grads in grads_per_step:
        adam_backend_step(
            cf.fused_prox_adam_,
            params,
            [g.clone() for g in grads],
            m,
            v,
            vmax,
            steps,
            lr=lr,
            beta1=betas[0],
            beta2=betas[1],
            eps=hp.get("eps", 1e-8),
            weight_decay=hp.get("weight_decay", 0.0),
            decoupled_weight_decay=hp.get("decoupled_weight_decay", False),
            amsgrad=amsgrad,
            l1=hp.get("l1", 0.0),
            maximize=hp.get("maximize", False),
            grad_scale=None,
            found_inf=None,
        )
        for i, g in enumerate(grads):
            refs[i] = ref.adam_step(refs[i], g, states[i], lr=lr, **hp)
    assert all(s.item() == len(grads_per_step) for s in steps)
    return refs


def _problem(sizes, dtype=torch.float32, steps=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [_randn(n, dtype, gen) for n in sizes]
    grads = [[_randn(n, dtype, gen) for n in sizes] for _ in range(steps)]
    return params, grads


def _check(params, refs, dtype):
    for p, r in zip(params, refs, strict=True):
        assert_close_to_ref(p, r, dtype)


# ---------------------------------------------------------------------------------------------
# every flag combination against the float64 reference (float32)

SGD_CASES = [
    dict(
        momentum=mom,
        nesterov=nest,
        dampening=damp,
        weight_decay=wd,
        decoupled_weight_decay=dec,
        l1=l1,
        maximize=mx,
    )
    for mom, nest, damp, wd, dec, l1, mx in itertools.product(
        [0.0, 0.9], [False, True], [0.0, 0.5], [0.0, 0.1], [False, True], [0.0, 0.5], [False, True]
    )
    if not (nest and (mom == 0.0 or damp != 0.0))
    and not (mom == 0.0 and damp != 0.0)
    and not (wd == 0.0 and dec)
]


@pytest.mark.parametrize(
    "hp", SGD_CASES, ids=lambda hp: "-".join(f"{k}={v}" for k, v in hp.items())
)
def test_sgd_flags_match_reference(hp):
    params, grads = _problem([33, 4097], steps=4)
    refs = _run_sgd(params, grads, **hp)
    _check(params, refs, torch.float32)
    if hp["l1"]:  # the prox makes exact zeros where the reference has them
        for p, r in zip(params, refs, strict=True):
            assert torch.equal(p == 0, r == 0)


ADAM_CASES = [
    dict(weight_decay=wd, decoupled_weight_decay=dec, amsgrad=ams, l1=l1, maximize=mx, betas=b)
    for wd, dec, ams, l1, mx, b in itertools.product(
        [0.0, 0.1], [False, True], [False, True], [0.0, 1.0], [False, True], [(0.9, 0.999)]
    )
    if not (wd == 0.0 and dec)
] + [dict(betas=(0.3, 0.9), l1=1.0, weight_decay=0.1, amsgrad=True)]  # lerp's other branch


@pytest.mark.parametrize(
    "hp", ADAM_CASES, ids=lambda hp: "-".join(f"{k}={v}" for k, v in hp.items())
)
def test_adam_flags_match_reference(hp):
    params, grads = _problem([33, 4097], steps=4)
    refs = _run_adam(params, grads, **hp)
    _check(params, refs, torch.float32)


# ---------------------------------------------------------------------------------------------
# dtypes, sizes, many tensors


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_and_awkward_sizes(dtype):
    params, grads = _problem(SIZES, dtype, steps=3)
    p2 = [p.clone() for p in params]
    refs = _run_sgd(
        params, grads, momentum=0.9, nesterov=True, weight_decay=0.1, l1=0.05, maximize=True
    )
    _check(params, refs, dtype)
    refs = _run_adam(p2, grads, weight_decay=0.1, decoupled_weight_decay=True, l1=0.5)
    _check(p2, refs, dtype)


def test_bf16_fp16_rounding_matches_torch():
    """The kernel's float32 -> bfloat16/float16 stores round like torch's casts (to nearest
    even; NaN, inf, overflow and subnormals included): a step that changes nothing but the
    storage round trip (lr = 0, grads 0) leaves values as torch's casts do."""
    vals = torch.tensor(
        [0.0, -0.0, 1.0, -2.5, 1e-8, 6e-5, 7e-8, 65504.0, 65520.0, 1e38, 3.4e38]
        + [float("inf"), float("-inf"), float("nan")],
        dtype=torch.float32,
    )
    vals = torch.cat([vals, torch.randn(4096) * 10.0 ** torch.randint(-9, 9, (4096,))])
    for dtype in (torch.bfloat16, torch.float16):
        p = vals.to(dtype)
        expected = p.clone()
        b = (vals * 3).to(dtype)
        sgd_backend_step(cf.fused_prox_sgd_,
            [p], [torch.zeros_like(p)], [b], lr=0.0, weight_decay=0.0, momentum=0.0,
            dampening=0.0, nesterov=False, maximize=False, decoupled_weight_decay=False,
            l1=0.0, is_first_step=False, grad_scale=None, found_inf=None,
        )  # fmt: skip
        nan = expected.isnan()
        assert torch.equal(p.isnan(), nan)
        assert torch.equal(p[~nan].view(torch.int16), expected[~nan].view(torch.int16))
        # momentum buffer update b <- 1 * b + 0 (mu = 1): b's round trip through float32
        b0 = b.clone()
        sgd_backend_step(cf.fused_prox_sgd_,
            [p], [torch.zeros_like(p)], [b], lr=0.0, weight_decay=0.0, momentum=1.0,
            dampening=0.0, nesterov=False, maximize=False, decoupled_weight_decay=False,
            l1=0.0, is_first_step=False, grad_scale=None, found_inf=None,
        )  # fmt: skip
        finite = b0.isfinite()
        assert torch.equal(b[finite], b0[finite])
        # a real rounding: p <- p + 1 * g in float32, stored as torch's cast of the float32 sum
        g = torch.randn(4096 + 14).to(dtype)
        p = vals.to(dtype)
        expected = (p.float() + g.float()).to(dtype)
        sgd_backend_step(cf.fused_prox_sgd_,
            [p], [g], None, lr=-1.0, weight_decay=0.0, momentum=0.0, dampening=0.0,
            nesterov=False, maximize=False, decoupled_weight_decay=False, l1=0.0,
            is_first_step=False, grad_scale=None, found_inf=None,
        )  # fmt: skip
        same = (p == expected) | (p.isnan() & expected.isnan())
        assert bool(same.all()), (dtype, p[~same], expected[~same])


def test_many_tiny_tensors_and_thread_split():
    """249 tensors (tiny ones and ones split across threads): reference, and bitwise the same
    result with 1 thread as with several."""
    gen = torch.Generator().manual_seed(1)
    sizes = [int(n) for n in torch.randint(0, 40, (240,), generator=gen)]
    sizes += [int(n) for n in torch.randint(10_000, 20_000, (9,), generator=gen)]
    params, grads = _problem(sizes, steps=2)
    p_single = [p.clone() for p in params]
    refs = _run_adam(params, grads, l1=0.5, weight_decay=0.1, decoupled_weight_decay=True)
    _check(params, refs, torch.float32)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        _run_adam(p_single, grads, l1=0.5, weight_decay=0.1, decoupled_weight_decay=True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(params, p_single, strict=True):
        assert torch.equal(a, b)
    p_sgd = [p.clone() for p in p_single]
    refs = _run_sgd(p_sgd, grads, momentum=0.9, weight_decay=0.1, l1=0.5)
    _check(p_sgd, refs, torch.float32)


# ---------------------------------------------------------------------------------------------
# bitwise equal to torch's fused CPU kernels where the math is the same, on the capability torch
# dispatches to (tests/test_capabilities.py reruns these under every capability the CPU has).
# Compared after every step, then re-synced, so that on a capability where regoptim promises only
# one ulp (see regoptim.backends.cpu.capability) the bound is per step.

_PARITY_SIZES = [1, 7, 15, 33, 1023, 4097, 70_001]  # tails of 8- and 16-lane vectors differ


def _assert_parity_and_sync(theirs, mine):
    for a, b in zip(mine, theirs, strict=True):
        assert_torch_fused_parity(a, b)
        a.copy_(b)


@pytest.mark.parametrize("nesterov,dampening", [(False, 0.0), (True, 0.0), (False, 0.3)])
@pytest.mark.parametrize("maximize", [False, True])
def test_sgd_bitwise_torch_fused(nesterov, dampening, maximize):
    params, grads = _problem(_PARITY_SIZES, steps=4)
    mine = [p.clone() for p in params]
    b_t = [torch.empty_like(p) for p in params]
    b_m = [torch.empty_like(p) for p in params]
    hp = dict(weight_decay=1e-2, momentum=0.9, dampening=dampening, nesterov=nesterov)
    for step, g in enumerate(grads):
        scale = torch.tensor(1024.0) if step == 2 else None
        g_t = [x.clone() * (1024 if scale else 1) for x in g]
        g_m = [x.clone() * (1024 if scale else 1) for x in g]
        torch._fused_sgd_(
            params, g_t, b_t, lr=0.1, maximize=maximize, is_first_step=step == 0,
            grad_scale=scale, **hp,
        )  # fmt: skip
        sgd_backend_step(cf.fused_prox_sgd_,
            mine, g_m, b_m, lr=0.1, maximize=maximize, is_first_step=step == 0,
            decoupled_weight_decay=False, l1=0.0, grad_scale=scale, found_inf=None, **hp,
        )  # fmt: skip
        for a, b in zip(g_t, g_m, strict=True):  # grads unscaled in place, as torch
            assert torch.equal(a, b)
        _assert_parity_and_sync(params + b_t, mine + b_m)


@pytest.mark.parametrize("adamw", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("beta1", [0.9, 0.3])
def test_adam_bitwise_torch_fused(adamw, amsgrad, beta1):
    params, grads = _problem(_PARITY_SIZES, steps=4)
    mine = [p.clone() for p in params]
    st_t = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    st_m = [[torch.zeros_like(p) for p in params] for _ in range(3)]
    steps_t = [torch.tensor(0.0) for _ in params]
    steps_m = [torch.tensor(0.0) for _ in params]
    fn = torch._fused_adamw_ if adamw else torch._fused_adam_
    for g in grads:
        torch._foreach_add_(steps_t, 1)
        fn(
            params, [x.clone() for x in g], st_t[0], st_t[1], st_t[2] if amsgrad else [],
            steps_t, lr=1e-2, beta1=beta1, beta2=0.999, weight_decay=1e-2, eps=1e-8,
            amsgrad=amsgrad, maximize=False,
        )  # fmt: skip
        adam_backend_step(cf.fused_prox_adam_,
            mine, [x.clone() for x in g], st_m[0], st_m[1], st_m[2] if amsgrad else None,
            steps_m, lr=1e-2, beta1=beta1, beta2=0.999, eps=1e-8, weight_decay=1e-2,
            decoupled_weight_decay=adamw, amsgrad=amsgrad, l1=0.0, maximize=False,
            grad_scale=None, found_inf=None,
        )  # fmt: skip
        _assert_parity_and_sync(params + sum(st_t, []), mine + sum(st_m, []))
    assert [s.item() for s in steps_t] == [s.item() for s in steps_m]


# ---------------------------------------------------------------------------------------------
# AMP protocol


def _sgd_call(params, grads, bufs, **kw):
    base = dict(
        lr=0.1, weight_decay=0.1, momentum=0.9, dampening=0.0, nesterov=False, maximize=False,
        decoupled_weight_decay=True, l1=0.05, is_first_step=False, grad_scale=None,
        found_inf=None,
    )  # fmt: skip
    base.update(kw)
    sgd_backend_step(cf.fused_prox_sgd_, params, grads, bufs, **base)


def test_found_inf_skips_everything():
    params, grads = _problem([5, 1025], steps=1)
    grads = grads[0]
    bufs = [torch.randn_like(p) for p in params]
    before = [t.clone() for t in params + grads + bufs]
    _sgd_call(params, grads, bufs, grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0))
    for a, b in zip(before, params + grads + bufs, strict=True):
        assert torch.equal(a, b)

    m = [torch.randn_like(p) for p in params]
    v = [torch.rand_like(p) for p in params]
    steps = [torch.tensor(3.0) for _ in params]
    before = [t.clone() for t in params + grads + m + v + steps]
    adam_backend_step(cf.fused_prox_adam_,
        params, grads, m, v, None, steps, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
        weight_decay=0.1, decoupled_weight_decay=True, amsgrad=False, l1=0.05, maximize=False,
        grad_scale=torch.tensor(8.0), found_inf=torch.tensor(1.0),
    )  # fmt: skip
    for a, b in zip(before, params + grads + m + v + steps, strict=True):
        assert torch.equal(a, b)


def test_grad_scale_unscales():
    params, grads = _problem([5, 1025], steps=1)
    grads = grads[0]
    p_plain = [p.clone() for p in params]
    b_plain = [torch.randn_like(p) for p in params]
    b_scaled = [b.clone() for b in b_plain]
    _sgd_call(p_plain, [g.clone() for g in grads], b_plain)
    scaled = [g * 1024.0 for g in grads]  # a power of two: unscaling is exact
    _sgd_call(
        params, scaled, b_scaled, grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0)
    )
    for a, b in zip(params + b_scaled + scaled, p_plain + b_plain + grads, strict=True):
        assert torch.equal(a, b)  # the grads are unscaled in place, as torch's fused kernels do


# ---------------------------------------------------------------------------------------------
# build: once per process, no rebuild when hyperparameters change, disk cache


def test_no_rebuild_over_100_steps_under_a_scheduler(monkeypatch):
    """ProxSGD / ProxAdamW(fused=True) through the optimizers: 100 steps each under an LR
    scheduler, with l1 and weight_decay edited by hand every 10 steps: no rebuild, no reload."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # fused=True on CPU -> this kernel
    import regoptim

    params = [torch.nn.Parameter(torch.randn(n)) for n in (32, 7, 1025)]
    opts = [
        regoptim.ProxSGD(params, lr=0.1, momentum=0.9, weight_decay=1e-3, l1=1e-4, fused=True),
        regoptim.ProxAdamW(params, lr=1e-2, weight_decay=1e-2, l1=1e-4, fused=True),
    ]
    cf.load()
    builds = cf.build_count()
    lib = cb._lib
    for opt in opts:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=100)
        for step in range(100):
            for p in params:
                p.grad = torch.randn_like(p)
            if step % 10 == 9:
                for group in opt.param_groups:
                    group["l1"] = group["l1"] * 1.5
                    group["weight_decay"] = group["weight_decay"] * 0.5
            opt.step()
            sched.step()
        assert opt.param_groups[0]["lr"] != sched.base_lrs[0]
    assert cf.build_count() == builds
    assert cb._lib is lib
    assert all(torch.isfinite(p).all() for p in params)
    assert all(opts[1].state[p]["step"].item() == 100 for p in params)


_CHILD = """
import time, torch
t0 = time.perf_counter()
from regoptim.backends.cpu import kernel as cf
p = [torch.randn(100)]
from regoptim.hyper import SgdHyper
cf.fused_prox_sgd_(p, [torch.randn(100)], None, SgdHyper(lr=0.1, l1=0.1),
    is_first_step=True, grad_scale=None, found_inf=None)
print(cf.build_info()["source"], cf.build_count(), time.perf_counter() - t0, sep="|")
"""


def _child(cache_dir: str) -> tuple[str, int, float]:
    # the JIT build and its cache, not the install-time build (tests/test_default_cpu_path.py)
    env = dict(os.environ, REGOPTIM_CACHE_DIR=cache_dir, REGOPTIM_NO_PREBUILT="1")
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], capture_output=True, text=True, env=env, timeout=300
    )
    assert out.returncode == 0, out.stderr
    source, count, seconds = out.stdout.strip().split("|")
    return source, int(count), float(seconds)


def test_second_process_loads_from_disk_cache():
    directory = str(cb._cache_dir())
    assert _child(directory)[0] in ("compiled", "disk cache")  # built into the cache, or was
    source, count, seconds = _child(directory)
    assert (source, count) == ("disk cache", 0)
    assert seconds < 5.0


@pytest.mark.slow
def test_fresh_cache_builds_once_then_loads(tmp_path):
    t0 = time.perf_counter()
    source, count, _ = _child(str(tmp_path))
    build = time.perf_counter() - t0
    assert (source, count) == ("compiled", 1)
    assert build < 60.0
    source, count, seconds = _child(str(tmp_path))
    assert (source, count) == ("disk cache", 0)
    assert seconds < 5.0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0].endswith(".json") and names[1].endswith(".so")


def test_no_compiler_message(monkeypatch, tmp_path):
    monkeypatch.setenv("REGOPTIM_NO_PREBUILT", "1")
    monkeypatch.setattr(cb, "_lib", None)
    monkeypatch.setattr(cb, "_compiler", lambda: None)
    monkeypatch.setenv("REGOPTIM_CACHE_DIR", str(tmp_path))  # no cached build either
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    msg = cf.available()
    assert msg is not None and "C++ compiler" in msg
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler"):
        cf.load()


# ---------------------------------------------------------------------------------------------
# layouts and complex


def test_non_contiguous_params_and_grads():
    gen = torch.Generator().manual_seed(3)
    base = _randn((64, 48), gen=gen)
    params = [base.t(), _randn((40, 30), gen=gen)[:, ::2], _randn(100, gen=gen)]
    grads = [
        [_randn((48, 64), gen=gen), _randn((15, 40), gen=gen).t(), _randn(200, gen=gen)[::2]]
        for _ in range(3)
    ]
    assert not params[0].is_contiguous() and not grads[0][1].is_contiguous()
    p_sgd = [p.clone().t().contiguous().t() if p.dim() == 2 else p.clone() for p in params]
    refs = _run_sgd(p_sgd, grads, momentum=0.9, weight_decay=0.1, l1=0.05)
    _check(p_sgd, refs, torch.float32)
    refs = _run_adam(params, grads, weight_decay=0.1, l1=0.05, amsgrad=True)
    _check(params, refs, torch.float32)
    assert params[0].data_ptr() == base.data_ptr()  # updated in place, through the view


def test_complex():
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(33, dtype=torch.complex64, generator=gen) for _ in range(2)]
    grads = [[torch.randn(33, dtype=torch.complex64, generator=gen) for _ in range(2)]]
    grads *= 3
    p2 = [p.clone() for p in params]
    refs = _run_sgd(params, grads, momentum=0.9, weight_decay=0.1, l1=0.5)
    _check(params, refs, torch.complex64)
    refs = _run_adam(p2, grads, weight_decay=0.1)
    _check(p2, refs, torch.complex64)
    with pytest.raises(NotImplementedError):
        _run_adam(p2, grads, l1=0.5)


def test_lr_as_tensor_and_empty_list():
    params, grads = _problem([9], steps=1)
    p2 = [p.clone() for p in params]
    _sgd_call(params, grads[0], [torch.zeros(9)], lr=torch.tensor([0.1]))
    _sgd_call(p2, grads[0], [torch.zeros(9)], lr=0.1)
    assert torch.equal(params[0], p2[0])
    _sgd_call([], [], None)


def test_fresh_grads_every_step_reuse_the_table():
    """New grad tensors each step (zero_grad(set_to_none=True)): pointer rows are refreshed;
    a non-contiguous or mis-sized grad on a later step is still caught."""
    params, grads = _problem([64, 3, 1025], steps=4)
    grads[2][0] = _randn(128)[::2]  # non-contiguous on the third step
    refs = _run_sgd(params, grads, momentum=0.9, weight_decay=0.1, l1=0.05)
    _check(params, refs, torch.float32)
    with pytest.raises(ValueError, match="shape"):
        _sgd_call(params, [torch.randn(64), torch.randn(3), torch.randn(1024)], None, momentum=0.0)


def test_channels_last_is_addressed_in_place():
    """A dense non-contiguous layout shared by param, grad and state (channels_last) needs no
    copies; a grad in another layout is still matched element by element."""
    gen = torch.Generator().manual_seed(5)
    shape = (3, 8, 5, 7)
    cl = torch.channels_last
    params = [_randn(shape, gen=gen).contiguous(memory_format=cl) for _ in range(2)]
    grads = [
        [_randn(shape, gen=gen).contiguous(memory_format=cl), _randn(shape, gen=gen)]
        for _ in range(3)
    ]
    prep = cf._prepare("probe", ["param", "grad"], [params, grads[0][:1] * 2], [True, False], 2)
    assert prep.keep == [] and prep.table.rows  # no copies for the shared layout
    refs = _run_sgd(params, grads, momentum=0.9, weight_decay=0.1, l1=0.05)
    _check(params, refs, torch.float32)
    assert all(p.is_contiguous(memory_format=cl) for p in params)

"""The Triton kernels (regoptim._kernels) against the float64 reference.

Every test runs on CPU tensors, where the kernels run in Triton's interpreter (whatever
``TRITON_INTERPRET`` says: each kernel keeps an interpreted and a compiled variant), and again on
CUDA tensors, compiled, where a GPU is present (``-m cuda``). The interpreter costs a few ms per
program (one program per 1024 elements of each tensor), so sizes stay small.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from regoptim._kernels import available, fused_prox_adam_, fused_prox_sgd_  # noqa: E402
from tolerances import TOL, assert_close_to_ref  # noqa: E402

from regoptim.reference import adam_step, sgd_step  # noqa: E402
from tests._helpers import adam_backend_step, sgd_backend_step  # noqa: E402

NO_CUDA = not torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(NO_CUDA, reason="no CUDA")]),
]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [0, 1, 1023, 1025, 4097]
LRS = [0.1, 0.05, 0.02]  # the learning rate changes every step
N_STEPS = 3


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


# ------------------------------------------------------------------------------------------------
# drivers: run N_STEPS kernel steps and reference steps side by side, compare params and state
# ------------------------------------------------------------------------------------------------


def _make(sizes: list[int], dtype: torch.dtype, device: str, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64).to(dtype).to(device) for n in sizes]


def _lr(value: float, lr_tensor: bool, device: str) -> float | torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device) if lr_tensor else value


def run_sgd(
    sizes: list[int],
    dtype: torch.dtype,
    device: str,
    *,
    lr_tensor: bool = False,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    maximize: bool = False,
    decoupled_weight_decay: bool = False,
    l1: float = 0.0,
    seed: int = 0,
    steps: int = N_STEPS,
) -> None:
    params = _make(sizes, dtype, device, seed)
    ref = [p.to(torch.float64).cpu() for p in params]
    ref_state: list[dict[str, Any]] = [{} for _ in params]
    bufs = None
    for step in range(steps):
        grads = _make(sizes, dtype, device, seed + 100 + step)
        first = step == 0
        if momentum != 0 and first:
            bufs = [torch.full_like(p, float("nan")) for p in params]  # garbage contents
        hyper = dict(
            weight_decay=weight_decay,
            momentum=momentum,
            dampening=dampening,
            nesterov=nesterov,
            maximize=maximize,
            decoupled_weight_decay=decoupled_weight_decay,
            l1=l1,
        )
        sgd_backend_step(
            fused_prox_sgd_,
            params,
            grads,
            bufs,
            lr=_lr(LRS[step], lr_tensor, device),
            is_first_step=first,
            grad_scale=None,
            found_inf=None,
            **hyper,
        )
        for i in range(len(params)):
            ref[i] = sgd_step(ref[i], grads[i].cpu(), ref_state[i], lr=LRS[step], **hyper)
    for i, p in enumerate(params):
        assert_close_to_ref(p.cpu(), ref[i], dtype)
        if momentum != 0:
            assert_close_to_ref(bufs[i].cpu(), ref_state[i]["momentum_buffer"], dtype)


def _adam_state(params: list[torch.Tensor], amsgrad: bool) -> dict[str, Any]:
    return {
        "exp_avgs": [torch.zeros_like(p) for p in params],
        "exp_avg_sqs": [torch.zeros_like(p) for p in params],
        "max_exp_avg_sqs": [torch.zeros_like(p) for p in params] if amsgrad else None,
        "state_steps": [torch.zeros((), dtype=torch.float32, device=p.device) for p in params],
    }


def run_adam(
    sizes: list[int],
    dtype: torch.dtype,
    device: str,
    *,
    lr_tensor: bool = False,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    amsgrad: bool = False,
    l1: float = 0.0,
    maximize: bool = False,
    seed: int = 0,
    lr_scale: float = 0.1,
    steps: int = N_STEPS,
) -> None:
    params = _make(sizes, dtype, device, seed)
    state = _adam_state(params, amsgrad)
    ref = [p.to(torch.float64).cpu() for p in params]
    ref_state: list[dict[str, Any]] = [{} for _ in params]
    betas = (0.9, 0.999)
    for step in range(steps):
        grads = _make(sizes, dtype, device, seed + 100 + step)
        lr = LRS[step] * lr_scale
        hyper = dict(
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            amsgrad=amsgrad,
            l1=l1,
            maximize=maximize,
        )
        adam_backend_step(
            fused_prox_adam_,
            params,
            grads,
            **state,
            lr=_lr(lr, lr_tensor, device),
            beta1=betas[0],
            beta2=betas[1],
            eps=1e-8,
            grad_scale=None,
            found_inf=None,
            **hyper,
        )
        for i in range(len(params)):
            ref[i] = adam_step(
                ref[i], grads[i].cpu(), ref_state[i], lr=lr, betas=betas, eps=1e-8, **hyper
            )
    for i, p in enumerate(params):
        assert_close_to_ref(p.cpu(), ref[i], dtype)
        assert state["state_steps"][i].item() == steps
        assert_close_to_ref(state["exp_avgs"][i].cpu(), ref_state[i]["exp_avg"], dtype)
        assert_close_to_ref(state["exp_avg_sqs"][i].cpu(), ref_state[i]["exp_avg_sq"], dtype)
        if amsgrad:
            assert_close_to_ref(
                state["max_exp_avg_sqs"][i].cpu(), ref_state[i]["max_exp_avg_sq"], dtype
            )


# ------------------------------------------------------------------------------------------------
# every flag combination (float32, one group of awkward sizes), then dtypes x sizes
# ------------------------------------------------------------------------------------------------

FLAG_SIZES = [1, 1025]  # 3 programs: a 1-element tensor and one crossing a block boundary

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
L1 = {"nol1": 0.0, "l1": 0.5}


@pytest.mark.parametrize("lr_tensor", [False, True], ids=["lrfloat", "lrtensor"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("l1", L1.values(), ids=L1.keys())
@pytest.mark.parametrize("wd", WD.values(), ids=WD.keys())
@pytest.mark.parametrize("mom", SGD_MOMENTUM.values(), ids=SGD_MOMENTUM.keys())
def test_sgd_flags(device, mom, wd, l1, maximize, lr_tensor):
    run_sgd(
        FLAG_SIZES,
        torch.float32,
        device,
        lr_tensor=lr_tensor,
        maximize=maximize,
        l1=l1,
        **mom,
        **wd,
    )


@pytest.mark.parametrize("lr_tensor", [False, True], ids=["lrfloat", "lrtensor"])
@pytest.mark.parametrize("maximize", [False, True], ids=["min", "max"])
@pytest.mark.parametrize("l1", [0.0, 2.0], ids=["nol1", "l1"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("wd", WD.values(), ids=WD.keys())
def test_adam_flags(device, wd, amsgrad, l1, maximize, lr_tensor):
    run_adam(
        FLAG_SIZES,
        torch.float32,
        device,
        lr_tensor=lr_tensor,
        amsgrad=amsgrad,
        l1=l1,
        maximize=maximize,
        **wd,
    )


SGD_REPRESENTATIVE = {
    "nesterov_l2_l1": dict(momentum=0.9, nesterov=True, weight_decay=0.1, l1=0.5),
    "momentum_decoupled_l1_max": dict(
        momentum=0.9, dampening=0.1, weight_decay=0.1, decoupled_weight_decay=True, l1=0.5,
        maximize=True, lr_tensor=True,
    ),
}  # fmt: skip
ADAM_REPRESENTATIVE = {
    "adamw_l1": dict(weight_decay=0.1, decoupled_weight_decay=True, l1=2.0),
    "amsgrad_l2_l1_max": dict(
        weight_decay=0.1, amsgrad=True, l1=2.0, maximize=True, lr_tensor=True
    ),
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", SGD_REPRESENTATIVE.values(), ids=SGD_REPRESENTATIVE.keys())
def test_sgd_dtypes_sizes(device, flags, dtype, size):
    run_sgd([size], dtype, device, **flags)


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("flags", ADAM_REPRESENTATIVE.values(), ids=ADAM_REPRESENTATIVE.keys())
def test_adam_dtypes_sizes(device, flags, dtype, size):
    run_adam([size], dtype, device, **flags)


def _many_sizes(n: int = 220) -> list[int]:
    g = torch.Generator().manual_seed(7)
    sizes = torch.randint(0, 24, (n,), generator=g).tolist()  # includes empty tensors
    return [*sizes, 1025]  # and one that spans two programs


def _expected_grids(sizes: list[int]) -> list[int]:
    """Programs of the vectorised launch (numel % 8 == 0; fresh storage is 16-byte aligned),
    then of the scalar launch; empty tensors have none."""
    aligned = sum(-(-n // 1024) for n in sizes if n % 8 == 0)
    scalar = sum(-(-n // 1024) for n in sizes if n % 8 != 0)
    return [g for g in (aligned, scalar) if g]


def _record_grids(monkeypatch: pytest.MonkeyPatch, dual: Any, device: str) -> list[int]:
    """Record the grid of every launch of the ``device`` variant of a kernel (``kernel[grid]``)."""
    kernel = dual.for_device(device)
    grids: list[int] = []
    original = type(kernel).__getitem__

    def getitem(self: Any, grid: Any) -> Any:
        if self is kernel:
            grids.append(grid[0])
        return original(self, grid)

    monkeypatch.setattr(type(kernel), "__getitem__", getitem)
    return grids


# The interpreter runs one program in a few ms, so these use two steps (221 tensors, 211 programs
# per launch): the second step exercises the existing-state path.


def test_sgd_many_tensors_one_launch(device, monkeypatch):
    from regoptim._kernels import _sgd

    sizes = _many_sizes()
    grids = _record_grids(monkeypatch, _sgd._prox_sgd_kernel, device)
    run_sgd(sizes, torch.float32, device, steps=2, **SGD_REPRESENTATIVE["nesterov_l2_l1"])
    assert grids == _expected_grids(sizes) * 2  # two launches per step for all 221 tensors


def test_adam_many_tensors_one_launch(device, monkeypatch):
    from regoptim._kernels import _adam

    sizes = _many_sizes()
    grids = _record_grids(monkeypatch, _adam._prox_adam_kernel, device)
    run_adam(sizes, torch.bfloat16, device, steps=2, **ADAM_REPRESENTATIVE["adamw_l1"])
    assert grids == _expected_grids(sizes) * 2


TORCH_SGD = {
    "plain": dict(momentum=0.0, weight_decay=0.0),
    "momentum_dampening_l2": dict(momentum=0.9, dampening=0.1, weight_decay=0.1),
    "nesterov_l2_max": dict(momentum=0.9, nesterov=True, weight_decay=0.1, maximize=True),
}
TORCH_ADAM = {
    "adam_l2_amsgrad": (torch.optim.Adam, dict(weight_decay=0.1, amsgrad=True)),
    "adamw_max": (torch.optim.AdamW, dict(weight_decay=0.1, maximize=True)),
}


@pytest.mark.parametrize("flags", TORCH_SGD.values(), ids=TORCH_SGD.keys())
def test_sgd_equals_torch_optim_float32(device, flags):
    """With l1 = 0 and coupled decay the kernel is torch.optim.SGD (float32 table bounds)."""
    sizes = [5, 1025]
    params = _make(sizes, torch.float32, device, 0)
    theirs = [p.clone().requires_grad_() for p in params]
    opt = torch.optim.SGD(theirs, lr=0.1, foreach=False, **flags)
    bufs = [torch.empty_like(p) for p in params] if flags["momentum"] else None
    for step in range(4):
        grads = _make(sizes, torch.float32, device, step + 1)
        for t, g in zip(theirs, grads, strict=True):
            t.grad = g.clone()
        opt.step()
        sgd_backend_step(fused_prox_sgd_,
            params, grads, bufs, lr=0.1, dampening=flags.get("dampening", 0.0),
            nesterov=flags.get("nesterov", False), maximize=flags.get("maximize", False),
            momentum=flags["momentum"], weight_decay=flags["weight_decay"],
            decoupled_weight_decay=False, l1=0.0, is_first_step=step == 0, grad_scale=None,
            found_inf=None,
        )  # fmt: skip
    for p, t in zip(params, theirs, strict=True):
        torch.testing.assert_close(p, t.detach(), **TOL[torch.float32])


@pytest.mark.parametrize("case", TORCH_ADAM.values(), ids=TORCH_ADAM.keys())
def test_adam_equals_torch_optim_float32(device, case):
    """With l1 = 0 the kernel is torch.optim.Adam / AdamW (float32 table bounds)."""
    cls, flags = case
    sizes = [5, 1025]
    params = _make(sizes, torch.float32, device, 0)
    theirs = [p.clone().requires_grad_() for p in params]
    opt = cls(theirs, lr=1e-2, foreach=False, **flags)
    state = _adam_state(params, flags.get("amsgrad", False))
    for step in range(4):
        grads = _make(sizes, torch.float32, device, step + 1)
        for t, g in zip(theirs, grads, strict=True):
            t.grad = g.clone()
        opt.step()
        adam_backend_step(fused_prox_adam_,
            params, grads, **state, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
            weight_decay=flags["weight_decay"], decoupled_weight_decay=cls is torch.optim.AdamW,
            amsgrad=flags.get("amsgrad", False), l1=0.0, maximize=flags.get("maximize", False),
            grad_scale=None, found_inf=None,
        )  # fmt: skip
    for p, t in zip(params, theirs, strict=True):
        torch.testing.assert_close(p, t.detach(), **TOL[torch.float32])
    for i, t in enumerate(theirs):
        torch.testing.assert_close(
            state["exp_avg_sqs"][i], opt.state[t]["exp_avg_sq"], **TOL[torch.float32]
        )


# ------------------------------------------------------------------------------------------------
# AMP protocol: found_inf skips everything, grad_scale unscales
# ------------------------------------------------------------------------------------------------


def _snapshot(tensors: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
    return [None if t is None else t.clone() for t in tensors]


def _assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("first_step", [True, False], ids=["first", "later"])
def test_sgd_found_inf_skips_everything(device, first_step):
    sizes = [3, 1025, 0]
    params = _make(sizes, torch.float32, device, 0)
    grads = _make(sizes, torch.float32, device, 1)
    bufs = [torch.full_like(p, 7.0) for p in params]
    before = _snapshot(params + bufs)
    sgd_backend_step(fused_prox_sgd_,
        params, grads, bufs, lr=_lr(0.1, True, device), weight_decay=0.1, momentum=0.9,
        dampening=0.0, nesterov=True, maximize=False, decoupled_weight_decay=True, l1=0.5,
        is_first_step=first_step, grad_scale=torch.tensor(2.0, device=device),
        found_inf=torch.tensor(1.0, device=device),
    )  # fmt: skip
    _assert_bitwise(params + bufs, before)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_adam_found_inf_skips_everything(device, amsgrad):
    sizes = [3, 1025, 0]
    params = _make(sizes, torch.float32, device, 0)
    grads = _make(sizes, torch.float32, device, 1)
    state = _adam_state(params, amsgrad)
    for t in state["state_steps"]:
        t.fill_(4.0)
    for lst in (state["exp_avgs"], state["exp_avg_sqs"], state["max_exp_avg_sqs"] or []):
        for t in lst:
            t.fill_(0.5)
    flat_state = [t for lst in state.values() if lst is not None for t in lst]
    before = _snapshot(params + flat_state)
    adam_backend_step(fused_prox_adam_,
        params, grads, **state, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
        decoupled_weight_decay=True, amsgrad=amsgrad, l1=2.0, maximize=False,
        grad_scale=torch.tensor(2.0, device=device), found_inf=torch.tensor(1.0, device=device),
    )  # fmt: skip
    _assert_bitwise(params + flat_state, before)


def test_sgd_grad_scale_unscales(device):
    sizes = [5, 1025]
    scale = 1024.0  # a power of two: scaling and unscaling are exact, the results bitwise equal
    results = []
    for grad_scale, found_inf in [(None, None), (scale, 0.0)]:
        params = _make(sizes, torch.float32, device, 0)
        grads = _make(sizes, torch.float32, device, 1)
        if grad_scale is not None:
            grads = [g * grad_scale for g in grads]
        bufs = [torch.empty_like(p) for p in params]
        for first in (True, False):
            sgd_backend_step(fused_prox_sgd_,
                params, grads, bufs, lr=0.1, weight_decay=0.1, momentum=0.9, dampening=0.0,
                nesterov=False, maximize=True, decoupled_weight_decay=False, l1=0.5,
                is_first_step=first,
                grad_scale=None if grad_scale is None else torch.tensor(grad_scale, device=device),
                found_inf=None if found_inf is None else torch.tensor(found_inf, device=device),
            )  # fmt: skip
        results.append(params + bufs)
    _assert_bitwise(results[0], results[1])


def test_adam_grad_scale_unscales(device):
    sizes = [5, 1025]
    scale = 1024.0
    results = []
    for grad_scale, found_inf in [(None, None), (scale, 0.0)]:
        params = _make(sizes, torch.float32, device, 0)
        grads = _make(sizes, torch.float32, device, 1)
        if grad_scale is not None:
            grads = [g * grad_scale for g in grads]
        state = _adam_state(params, True)
        for _ in range(2):
            adam_backend_step(fused_prox_adam_,
                params, grads, **state, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8,
                weight_decay=0.1, decoupled_weight_decay=False, amsgrad=True, l1=2.0,
                maximize=False,
                grad_scale=None if grad_scale is None else torch.tensor(grad_scale, device=device),
                found_inf=None if found_inf is None else torch.tensor(found_inf, device=device),
            )  # fmt: skip
        results.append(params + [t for lst in state.values() for t in lst])
    _assert_bitwise(results[0], results[1])


# ------------------------------------------------------------------------------------------------
# no recompilation when lr (or any other runtime hyper-parameter) changes
# ------------------------------------------------------------------------------------------------


class _SpecializationRecorder:
    """The compile-cache key every launch of a kernel maps to.

    Compiled (CUDA): the JITFunction's own per-device kernel cache; a new entry is a compilation.
    Interpreted (CPU): the interpreter compiles nothing, so the key is computed with the
    JITFunction machinery Triton uses to look its cache up (the binder from the kernel's
    signature, then ``compute_cache_key``) on the exact arguments of each launch, caught with a
    pre-run hook. Runtime floats are annotated ``tl.float32`` and hence not specialised on; the
    recorded keys show it.
    """

    def __init__(self, kernel: Any) -> None:
        from triton.runtime.interpreter import InterpretedFunction

        self.kernel = kernel
        self.interpreted = isinstance(kernel, InterpretedFunction)
        self.keys: list[str] = []
        if self.interpreted:
            from triton.backends.compiler import BaseBackend
            from triton.runtime.jit import (
                JITFunction,
                compute_cache_key,
                create_function_from_signature,
            )

            options = {
                k: v
                for k, v in kernel.kwargs.items()
                if k in ("do_not_specialize", "do_not_specialize_on_alignment")
            }
            jit = JITFunction(kernel.fn, **options)
            binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)

            def hook(*args: Any, **kwargs: Any) -> None:
                _, specialization, options = binder(*args, **kwargs)
                self.keys.append(compute_cache_key({}, specialization, options))

            self._hook = hook
            kernel.add_pre_run_hook(hook)

    def compilations(self) -> int:
        if self.interpreted:
            return len(set(self.keys))
        return sum(len(cache[0]) for cache in self.kernel.device_caches.values())

    def close(self) -> None:
        if self.interpreted:
            self.kernel.pre_run_hooks.remove(self._hook)


@pytest.fixture
def sgd_recorder(device):
    from regoptim._kernels import _sgd

    rec = _SpecializationRecorder(_sgd._prox_sgd_kernel.for_device(device))
    yield rec
    rec.close()


@pytest.fixture
def adam_recorder(device):
    from regoptim._kernels import _adam

    rec = _SpecializationRecorder(_adam._prox_adam_kernel.for_device(device))
    yield rec
    rec.close()


def test_sgd_changing_lr_does_not_recompile(device, sgd_recorder):
    params = _make([5, 1025], torch.float32, device, 0)
    bufs = [torch.empty_like(p) for p in params]
    lr = torch.tensor(0.1, device=device)
    kw = dict(
        momentum=0.9, dampening=0.0, nesterov=False, maximize=False,
        decoupled_weight_decay=True, grad_scale=None, found_inf=None,
    )  # fmt: skip
    sgd_backend_step(fused_prox_sgd_,params, _make([5, 1025], torch.float32, device, 1), bufs, lr=lr,
                    weight_decay=0.1, l1=0.5, is_first_step=True, **kw)  # fmt: skip
    baseline = sgd_recorder.compilations()
    for step in range(1, 5):
        lr.fill_(0.1 / (step + 1))  # an LR schedule on the device tensor
        grads = _make([5, 1025], torch.float32, device, step + 1)
        # the runtime values move too: weight decay and l1 (nonzero) change every step
        sgd_backend_step(fused_prox_sgd_,params, grads, bufs, lr=lr, weight_decay=0.1 * step, l1=0.5 / step,
                        is_first_step=False, **kw)  # fmt: skip
    steady = sgd_recorder.compilations()
    for step in range(3):  # a float lr schedule
        grads = _make([5, 1025], torch.float32, device, step + 10)
        sgd_backend_step(fused_prox_sgd_,params, grads, bufs, lr=0.3 / (step + 1), weight_decay=0.1, l1=0.5,
                        is_first_step=False, **kw)  # fmt: skip
    float_steady = sgd_recorder.compilations()
    schedule = torch.tensor([0.1, 0.05, 0.02], device=device)
    for step in range(3):  # lr as views into a schedule tensor: 4-byte offsets, no new variant
        grads = _make([5, 1025], torch.float32, device, step + 20)
        sgd_backend_step(fused_prox_sgd_,params, grads, bufs, lr=schedule[step], weight_decay=0.1, l1=0.5,
                        is_first_step=False, **kw)  # fmt: skip
    # the first step and the float-lr path are constexpr variants: one compile each, then none
    assert steady == baseline + 1
    assert float_steady == steady + 1
    assert sgd_recorder.compilations() == float_steady
    if sgd_recorder.interpreted:
        assert len(sgd_recorder.keys) == 1 + 4 + 3 + 3
        assert len(set(sgd_recorder.keys[1:5] + sgd_recorder.keys[8:])) == 1
        assert len(set(sgd_recorder.keys[5:8])) == 1


def test_adam_changing_lr_does_not_recompile(device, adam_recorder):
    sizes = [5, 1025]
    params = _make(sizes, torch.float32, device, 0)
    state = _adam_state(params, False)
    lr = torch.tensor(1e-3, device=device)
    for step in range(5):
        lr.fill_(1e-3 * (step + 1))
        adam_backend_step(fused_prox_adam_,
            params, _make(sizes, torch.float32, device, step + 1), **state, lr=lr,
            beta1=0.9 - 0.01 * step, beta2=0.999, eps=1e-8 * (step + 1), weight_decay=0.01 * (step + 1),
            decoupled_weight_decay=True, amsgrad=False, l1=1.0 + step, maximize=False,
            grad_scale=None, found_inf=None,
        )  # fmt: skip
    assert adam_recorder.compilations() == 1
    if adam_recorder.interpreted:
        assert len(adam_recorder.keys) == 5


def test_recorder_sees_constexpr_changes(device, sgd_recorder):
    """The compile counter is not vacuous: flipping a constexpr flag is a new specialisation."""
    params = _make([5], torch.float32, device, 0)
    for maximize in (False, True):
        sgd_backend_step(fused_prox_sgd_,
            params, _make([5], torch.float32, device, 1), None, lr=0.1, weight_decay=0.0,
            momentum=0.0, dampening=0.0, nesterov=False, maximize=maximize,
            decoupled_weight_decay=False, l1=0.0, is_first_step=False, grad_scale=None,
            found_inf=None,
        )  # fmt: skip
    assert sgd_recorder.compilations() == 2


# ------------------------------------------------------------------------------------------------
# layouts the kernels cannot address directly, complex parameters, the launch-table cache
# ------------------------------------------------------------------------------------------------


def _layout_cases(device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    base = rnd(6, 10)
    cl = rnd(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    return [
        (rnd(7, 9).t(), rnd(9, 7)),  # transposed param, contiguous grad: copy-in/out
        (base[:, ::2], rnd(6, 5)),  # strided (non-dense) param
        (cl, rnd(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)),  # same dense layout
        (cl.clone(memory_format=torch.channels_last), rnd(2, 3, 4, 5)),  # grad has other strides
        (rnd(1025), rnd(2050)[::2]),  # non-contiguous grad
        (rnd(4), rnd(4)),  # an ordinary one alongside
    ]


def test_sgd_noncontiguous_layouts(device):
    cases = _layout_cases(device)
    params = [p for p, _ in cases]
    grads = [g for _, g in cases]
    storages = [p.data_ptr() for p in params]
    ref_state: list[dict[str, Any]] = [{} for _ in params]
    ref = [p.to(torch.float64).cpu() for p in params]
    bufs = [torch.empty_like(p) for p in params]  # preserve_format: same layout as the params
    for step in range(2):
        sgd_backend_step(fused_prox_sgd_,
            params, grads, bufs, lr=0.1, weight_decay=0.1, momentum=0.9, dampening=0.0,
            nesterov=True, maximize=False, decoupled_weight_decay=False, l1=0.5,
            is_first_step=step == 0, grad_scale=None, found_inf=None,
        )  # fmt: skip
        for i in range(len(params)):
            ref[i] = sgd_step(ref[i], grads[i].cpu(), ref_state[i], lr=0.1, momentum=0.9,
                              weight_decay=0.1, nesterov=True, l1=0.5)  # fmt: skip
    assert [p.data_ptr() for p in params] == storages  # updated in place, in their storage
    for i, p in enumerate(params):
        assert_close_to_ref(p.cpu(), ref[i], torch.float32)
        assert_close_to_ref(bufs[i].cpu(), ref_state[i]["momentum_buffer"], torch.float32)
    assert torch.equal(cases[1][0], params[1])  # the strided view wrote into its base
    assert cases[1][0]._base is not None


def test_adam_noncontiguous_layouts(device):
    cases = _layout_cases(device)
    params = [p for p, _ in cases]
    grads = [g for _, g in cases]
    state = _adam_state(params, True)
    state["exp_avgs"] = [torch.zeros_like(p) for p in params]
    ref_state: list[dict[str, Any]] = [{} for _ in params]
    ref = [p.to(torch.float64).cpu() for p in params]
    for _ in range(2):
        adam_backend_step(fused_prox_adam_,
            params, grads, **state, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
            decoupled_weight_decay=True, amsgrad=True, l1=2.0, maximize=False, grad_scale=None,
            found_inf=None,
        )  # fmt: skip
        for i in range(len(params)):
            ref[i] = adam_step(ref[i], grads[i].cpu(), ref_state[i], lr=0.01, weight_decay=0.1,
                               decoupled_weight_decay=True, amsgrad=True, l1=2.0)  # fmt: skip
    for i, p in enumerate(params):
        assert_close_to_ref(p.cpu(), ref[i], torch.float32)
        assert_close_to_ref(
            state["exp_avg_sqs"][i].cpu(), ref_state[i]["exp_avg_sq"], torch.float32
        )


@pytest.mark.parametrize("l1", [0.0, 0.5], ids=["nol1", "l1"])
def test_sgd_complex(device, l1):
    sizes = [3, 1025]
    g = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=g, dtype=torch.complex64).to(device) for n in sizes]
    ref = [p.to(torch.complex128).cpu() for p in params]
    ref_state: list[dict[str, Any]] = [{} for _ in params]
    bufs = [torch.empty_like(p) for p in params]
    for step in range(N_STEPS):
        grads = [torch.randn(n, generator=g, dtype=torch.complex64).to(device) for n in sizes]
        grads[0] = grads[0].conj()  # a conj-bit view: copied in (resolved) before the launch
        sgd_backend_step(fused_prox_sgd_,
            params, grads, bufs, lr=0.1, weight_decay=0.1, momentum=0.9, dampening=0.0,
            nesterov=False, maximize=True, decoupled_weight_decay=True, l1=l1,
            is_first_step=step == 0, grad_scale=None, found_inf=None,
        )  # fmt: skip
        for i in range(len(params)):
            ref[i] = sgd_step(ref[i], grads[i].cpu(), ref_state[i], lr=0.1, momentum=0.9,
                              weight_decay=0.1, decoupled_weight_decay=True, l1=l1,
                              maximize=True)  # fmt: skip
    for i, p in enumerate(params):
        assert_close_to_ref(p.cpu(), ref[i], torch.complex64)
    if l1:
        assert any((p == 0).any() for p in params)  # the modulus shrink zeroed some entries


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_adam_complex_l1(device, amsgrad):
    sizes = [3, 1025]
    g = torch.Generator().manual_seed(6)
    params = [torch.randn(n, generator=g, dtype=torch.complex64).to(device) for n in sizes]
    state = _adam_state(params, amsgrad)
    ref = [p.to(torch.complex128).cpu() for p in params]
    ref_state: list[dict[str, Any]] = [{} for _ in params]
    for _ in range(N_STEPS):
        grads = [torch.randn(n, generator=g, dtype=torch.complex64).to(device) for n in sizes]
        adam_backend_step(fused_prox_adam_,
            params, grads, **state, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
            decoupled_weight_decay=False, amsgrad=amsgrad, l1=20.0, maximize=False,
            grad_scale=None, found_inf=None,
        )  # fmt: skip
        for i in range(len(params)):
            ref[i] = adam_step(ref[i], grads[i].cpu(), ref_state[i], lr=0.01, weight_decay=0.1,
                               amsgrad=amsgrad, l1=20.0)  # fmt: skip
    for i, p in enumerate(params):
        assert_close_to_ref(p.cpu(), ref[i], torch.complex64)
        assert_close_to_ref(
            state["exp_avg_sqs"][i].cpu(), ref_state[i]["exp_avg_sq"], torch.complex64
        )
    assert any((p == 0).any() for p in params)


def test_launch_tables_are_cached_until_pointers_change(device):
    from regoptim._kernels import _common

    sizes = [5, 1025, 0, 7]
    params = _make(sizes, torch.float32, device, 0)
    grads = _make(sizes, torch.float32, device, 1)
    flat = _common.flatten_group([params, grads], [True, False])
    assert flat.kept == [0, 1, 3]  # the empty tensor is skipped
    plan1 = _common.launch_plan(flat.lists, torch.device(device))
    plan2 = _common.launch_plan(flat.lists, torch.device(device))
    assert plan1.tables[0] is plan2.tables[0] and plan1.launches is plan2.launches
    (launch,) = plan1.launches  # no numel is a multiple of 8: one (scalar) launch
    assert not launch.aligned and launch.n_blocks == 1 + 2 + 1
    assert launch.block_tensor.tolist() == [0, 1, 1, 2]
    assert launch.block_start.tolist() == [0, 0, 1024, 0]
    assert plan1.tables[1].tolist()[:3] == [g.data_ptr() for g in flat.lists[1]]
    new_grads = [g.clone() for g in flat.lists[1]]  # fresh gradients: new pointers, same numels
    plan3 = _common.launch_plan([flat.lists[0], new_grads], torch.device(device))
    assert plan3.tables[1] is not plan1.tables[1]
    assert plan3.tables[1].tolist()[:3] == [g.data_ptr() for g in new_grads]
    assert plan3.launches is plan1.launches  # same numels and alignment: same block maps
    mixed = _make([8, 5, 1024], torch.float32, device, 2)
    plan4 = _common.launch_plan([mixed, mixed], torch.device(device))
    assert [(m.aligned, m.block_tensor.tolist()) for m in plan4.launches] == [
        (True, [0, 2]),
        (False, [1]),
    ]


# ------------------------------------------------------------------------------------------------
# custom ops and torch.compile
# ------------------------------------------------------------------------------------------------


def test_custom_ops_are_registered():
    import regoptim._kernels._adam  # noqa: F401
    import regoptim._kernels._sgd  # noqa: F401

    sgd_schema = str(torch.ops.regoptim.fused_prox_sgd_.default._schema)
    adam_schema = str(torch.ops.regoptim.fused_prox_adam_.default._schema)
    assert "Tensor(a0!)[] params" in sgd_schema and "momentum_buffers" in sgd_schema
    for name in ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"):
        assert f"!)[] {name}" in adam_schema, (name, adam_schema)
    assert "!)[] grads" not in sgd_schema and "!)[] grads" not in adam_schema


def test_custom_ops_pass_opcheck(device):
    """torch's own checks: declared mutations, fake-tensor and AOT-dispatch behaviour."""
    import regoptim._kernels._adam  # noqa: F401
    import regoptim._kernels._sgd  # noqa: F401

    params = _make([5, 1025], torch.float32, device, 0)
    grads = _make([5, 1025], torch.float32, device, 1)
    bufs = _make([5, 1025], torch.float32, device, 2)
    lr = torch.tensor(0.1, device=device)
    sgd_args = (
        params,
        grads,
        bufs,
        0.0,
        lr,
        0.1,
        0.9,
        0.0,
        True,
        False,
        True,
        0.5,
        False,
        None,
        None,
    )
    torch.library.opcheck(torch.ops.regoptim.fused_prox_sgd_.default, sgd_args)
    state = _adam_state(params, True)
    one, zero = torch.tensor(1.0, device=device), torch.tensor(0.0, device=device)
    adam_args = (
        params, grads, state["exp_avgs"], state["exp_avg_sqs"], state["max_exp_avg_sqs"],
        state["state_steps"], 0.01, None, 0.9, 0.999, 1e-8, 0.1, True, True, 2.0, False, one, zero,
    )  # fmt: skip
    torch.library.opcheck(torch.ops.regoptim.fused_prox_adam_.default, adam_args)


def test_torch_compile_sgd_step(device):
    sizes = [5, 1025]

    def train_step(params, grads, bufs, lr):
        sgd_backend_step(fused_prox_sgd_,
            params, grads, bufs, lr=lr, weight_decay=0.1, momentum=0.9, dampening=0.0,
            nesterov=True, maximize=False, decoupled_weight_decay=True, l1=0.5,
            is_first_step=False, grad_scale=None, found_inf=None,
        )  # fmt: skip

    compiled = torch.compile(train_step, backend="aot_eager", fullgraph=True)
    outs = []
    for fn in (train_step, compiled):
        params = _make(sizes, torch.float32, device, 0)
        bufs = _make(sizes, torch.float32, device, 2)
        lr = torch.tensor(0.1, device=device)
        for step in range(2):
            lr.fill_(0.1 / (step + 1))
            fn(params, _make(sizes, torch.float32, device, step + 3), bufs, lr)
        outs.append(params + bufs)
    _assert_bitwise(outs[0], outs[1])


def test_torch_compile_adam_step(device):
    sizes = [5, 1025]

    def train_step(params, grads, state, lr):
        adam_backend_step(fused_prox_adam_,
            params, grads, **state, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
            decoupled_weight_decay=True, amsgrad=True, l1=2.0, maximize=False, grad_scale=None,
            found_inf=None,
        )  # fmt: skip

    compiled = torch.compile(train_step, backend="aot_eager", fullgraph=True)
    outs = []
    for fn in (train_step, compiled):
        params = _make(sizes, torch.float32, device, 0)
        state = _adam_state(params, True)
        for step in range(2):
            fn(params, _make(sizes, torch.float32, device, step + 3), state, 1e-2)
        outs.append(params + [t for lst in state.values() for t in lst])
    _assert_bitwise(outs[0], outs[1])


# ------------------------------------------------------------------------------------------------
# the compiled variant: the exact launches made on CPU compile to a cubin for an H100 (sm_90)
# ------------------------------------------------------------------------------------------------


def _capture_launch(dual: Any, step: Any) -> tuple[tuple, dict]:
    """The (args, kwargs) of the launch ``step()`` makes with the interpreted variant."""
    kernel = dual.for_device("cpu")
    seen: list[tuple[tuple, dict]] = []

    def hook(*args: Any, **kwargs: Any) -> None:
        seen.append((args, kwargs))

    kernel.add_pre_run_hook(hook)
    try:
        step()
    finally:
        kernel.pre_run_hooks.remove(hook)
    assert len(seen) == 1
    return seen[0]


def _compile_for_sm90(dual: Any, args: tuple, kwargs: dict) -> Any:
    """Compile the JITFunction variant for sm_90 as its own launch would (no GPU needed)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = dual.variant(False)
    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kwargs = {**kwargs, "enable_fp_fusion": True}
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(
        backend, kwargs, bound, specialization, options
    )
    src = ASTSource(jit, signature, constexprs, attrs)
    return triton.compile(src, target=target, options=options.__dict__)


def _sgd_compile_step(dtype: torch.dtype, sizes: tuple = (5, 1025), **flags: Any) -> Any:
    def step() -> None:
        params = [torch.randn(n).to(dtype) for n in sizes]
        amp = flags.pop("amp", False)
        sgd_backend_step(fused_prox_sgd_,
            params, [torch.randn_like(p) for p in params],
            [torch.zeros_like(p) for p in params] if flags["momentum"] else None,
            lr=torch.tensor(0.1) if flags.pop("lr_tensor", False) else 0.1, dampening=0.0,
            grad_scale=torch.tensor(2.0) if amp else None,
            found_inf=torch.tensor(0.0) if amp else None, **flags,
        )  # fmt: skip

    return step


def _adam_compile_step(dtype: torch.dtype, sizes: tuple = (5, 1025), **flags: Any) -> Any:
    def step() -> None:
        params = [torch.randn(n).to(dtype) for n in sizes]
        amp = flags.pop("amp", False)
        adam_backend_step(fused_prox_adam_,
            params, [torch.randn_like(p) for p in params], **_adam_state(params, flags["amsgrad"]),
            lr=torch.tensor(0.01) if flags.pop("lr_tensor", False) else 0.01, beta1=0.9,
            beta2=0.999, eps=1e-8, grad_scale=torch.tensor(2.0) if amp else None,
            found_inf=torch.tensor(0.0) if amp else None, **flags,
        )  # fmt: skip

    return step


_SGD_ALL = dict(
    weight_decay=0.1, momentum=0.9, nesterov=True, maximize=True, decoupled_weight_decay=False,
    l1=0.5, is_first_step=False, lr_tensor=True, amp=True,
)  # fmt: skip
_SGD_MIN = dict(
    weight_decay=0.0, momentum=0.0, nesterov=False, maximize=False, decoupled_weight_decay=False,
    l1=0.0, is_first_step=False,
)  # fmt: skip
_ADAM_ALL = dict(
    weight_decay=0.1, decoupled_weight_decay=False, amsgrad=True, l1=2.0, maximize=True,
    lr_tensor=True, amp=True,
)  # fmt: skip
_ADAMW = dict(weight_decay=0.1, decoupled_weight_decay=True, amsgrad=False, l1=2.0, maximize=False)
COMPILE_CASES = {
    "sgd-all-bf16": ("sgd", torch.bfloat16, _SGD_ALL),
    "sgd-min-fp16": ("sgd", torch.float16, _SGD_MIN),
    "sgd-first-decoupled-complex-l1": (
        "sgd", torch.complex64, {**_SGD_MIN, "momentum": 0.9, "is_first_step": True,
                                 "weight_decay": 0.1, "decoupled_weight_decay": True, "l1": 0.5},
    ),
    "adam-all-bf16": ("adam", torch.bfloat16, _ADAM_ALL),
    "adamw-l1-fp32": ("adam", torch.float32, _ADAMW),
    "adam-complex-l1": ("adam", torch.complex64, {**_ADAMW, "amsgrad": True}),
    # numels % 8 == 0 and 16-byte aligned storage: the ALIGNED variant, vectorised accesses
    "sgd-all-bf16-aligned": ("sgd", torch.bfloat16, {**_SGD_ALL, "sizes": (8, 1024)}),
    "adamw-l1-fp32-aligned": ("adam", torch.float32, {**_ADAMW, "sizes": (8, 1024)}),
}  # fmt: skip


def _ptxas_missing() -> str | None:
    try:
        import triton

        triton.knobs.nvidia.ptxas.path  # noqa: B018 - raises where no ptxas is bundled or set
    except Exception as exc:  # no NVIDIA backend or no ptxas in this triton build
        return f"Triton's NVIDIA backend cannot build cubins here: {exc}"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_ptxas_missing() is not None, reason=str(_ptxas_missing()))
@pytest.mark.parametrize("case", COMPILE_CASES.values(), ids=COMPILE_CASES.keys())
def test_compiled_variant_builds_for_sm90(case):
    """Without a GPU: Triton's NVIDIA backend lowers the real launch to PTX and a cubin (ptxas)."""
    from regoptim._kernels import _adam, _sgd

    family, dtype, flags = case
    if family == "sgd":
        dual, step = _sgd._prox_sgd_kernel, _sgd_compile_step(dtype, **flags)
    else:
        dual, step = _adam._prox_adam_kernel, _adam_compile_step(dtype, **flags)
    args, kwargs = _capture_launch(dual, step)
    compiled = _compile_for_sm90(dual, args, kwargs)
    assert compiled.asm["cubin"]
    ptx = compiled.asm["ptx"]
    assert ".target sm_90" in ptx
    assert "local" not in ptx.split(".entry", 1)[1]  # no spills to local memory
    # 16-byte accesses exactly when the launcher could prove alignment (else scalar ones)
    vectorised = "ld.global.v4.b32" in ptx and "st.global.v4.b32" in ptx
    assert vectorised == ("sizes" in flags), ptx.count("ld.global")


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset-view"])
def test_aligned_variant(device, offset):
    """numels % 8 == 0 and 16-byte pointers select the vectorised variant; a view that is not
    16-byte aligned (one float past its storage start) falls back, and both are exact."""
    from regoptim._kernels import _common

    sizes = [8, 1024, 2048]
    bases = _make([n + offset for n in sizes], torch.float32, device, 0)
    params = [b[offset:] for b in bases]
    grads = _make(sizes, torch.float32, device, 1)
    flat = _common.flatten_group([params, grads], [True, False])
    launches = _common.launch_plan(flat.lists, torch.device(device)).launches
    assert [m.aligned for m in launches] == [offset == 0]
    ref_state: list[dict[str, Any]] = [{} for _ in params]
    ref = [p.to(torch.float64).cpu() for p in params]
    for _ in range(2):
        sgd_backend_step(fused_prox_sgd_,
            params, grads, None, lr=0.1, weight_decay=0.1, momentum=0.0, dampening=0.0,
            nesterov=False, maximize=False, decoupled_weight_decay=True, l1=0.5,
            is_first_step=False, grad_scale=None, found_inf=None,
        )  # fmt: skip
        for i in range(len(params)):
            ref[i] = sgd_step(ref[i], grads[i].cpu(), ref_state[i], lr=0.1, weight_decay=0.1,
                              decoupled_weight_decay=True, l1=0.5)  # fmt: skip
    for p, r in zip(params, ref, strict=True):
        assert_close_to_ref(p.cpu(), r, torch.float32)


# ------------------------------------------------------------------------------------------------
# errors and availability
# ------------------------------------------------------------------------------------------------


def test_available(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert available() is None  # triton imports (else this module is skipped): the interpreter
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if NO_CUDA:
        assert "TRITON_INTERPRET=1" in available()
    else:
        assert available() is None


def test_cpu_and_cuda_variants_are_separate():
    """Compiled and interpreted variants of one kernel, each calling its own helpers' variant."""
    from regoptim._kernels import _jit, _sgd
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    cpu = _sgd._prox_sgd_kernel.for_device("cpu")
    cuda = _sgd._prox_sgd_kernel.for_device("cuda")
    assert isinstance(cpu, InterpretedFunction) and isinstance(cuda, JITFunction)
    assert isinstance(cpu.fn.__globals__["block_offsets"], InterpretedFunction)
    assert isinstance(cuda.fn.__globals__["block_offsets"], JITFunction)
    assert _sgd._prox_sgd_kernel.for_device("cpu") is cpu  # built once
    assert _jit.block_offsets.variant(False) is cuda.fn.__globals__["block_offsets"]
    with pytest.raises(RuntimeError, match="device type 'mps'"):
        _sgd._prox_sgd_kernel.for_device("mps")


def test_unsupported_dtype_is_a_clear_error(device):
    p = [torch.zeros(3, dtype=torch.float64, device=device)]
    with pytest.raises(TypeError, match="fused=False"):
        sgd_backend_step(fused_prox_sgd_,
            p, [torch.ones_like(p[0])], None, lr=0.1, weight_decay=0.0, momentum=0.0,
            dampening=0.0, nesterov=False, maximize=False, decoupled_weight_decay=False, l1=0.0,
            is_first_step=False, grad_scale=None, found_inf=None,
        )  # fmt: skip


def test_mismatched_lists_are_a_clear_error(device):
    p = [torch.zeros(3, device=device)]
    with pytest.raises(TypeError, match="grad of parameter 0 is torch.float16, its parameter"):
        sgd_backend_step(fused_prox_sgd_,
            p, [torch.ones(3, dtype=torch.float16, device=device)], None, lr=0.1,
            weight_decay=0.0, momentum=0.0, dampening=0.0, nesterov=False, maximize=False,
            decoupled_weight_decay=False, l1=0.0, is_first_step=False, grad_scale=None,
            found_inf=None,
        )  # fmt: skip


@pytest.mark.cuda
@pytest.mark.skipif(NO_CUDA, reason="no CUDA")
def test_cuda_steady_state_step_needs_no_host_sync():
    """After the first step (tables built and cached), a step never synchronises with the host."""
    sizes = [5, 1025, 4097]
    params = _make(sizes, torch.float32, "cuda", 0)
    grads = _make(sizes, torch.float32, "cuda", 1)
    state = _adam_state(params, True)
    bufs = [torch.empty_like(p) for p in params]
    lr = torch.tensor(1e-3, device="cuda")
    found_inf, grad_scale = torch.zeros((), device="cuda"), torch.ones((), device="cuda")

    def steps(first: bool) -> None:
        sgd_backend_step(fused_prox_sgd_,
            params, grads, bufs, lr=lr, weight_decay=0.1, momentum=0.9, dampening=0.0,
            nesterov=True, maximize=False, decoupled_weight_decay=True, l1=0.5,
            is_first_step=first, grad_scale=grad_scale, found_inf=found_inf,
        )  # fmt: skip
        adam_backend_step(fused_prox_adam_,
            params, grads, **state, lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
            decoupled_weight_decay=True, amsgrad=True, l1=2.0, maximize=False,
            grad_scale=grad_scale, found_inf=found_inf,
        )  # fmt: skip

    steps(True)
    steps(False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            lr.mul_(0.5)
            steps(False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()

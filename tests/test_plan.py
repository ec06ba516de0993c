"""The cached per-group plan of the C++ CPU kernel (regoptim/backends/cpu/plan.py): used in the steady state,
and dropped, never trusted, when anything it depends on changes. Each case compares an optimizer
with its twin that takes the full dispatch every step (same arguments, so the same kernel), bit
for bit, so a stale plan (a wrong pointer, a stale hyperparameter) shows."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import regoptim
from regoptim.backends.cpu import build as _cpu_build
from regoptim.backends.cpu import plan as _plan
from tests.tolerances import TOL

pytestmark = pytest.mark.skipif(
    _cpu_build.prebuilt_path() is None, reason="the install did not build the CPU kernel"
)

SGD = (regoptim.ProxSGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, "l1": 1e-3})
ADAMW = (regoptim.ProxAdamW, {"lr": 1e-2, "weight_decay": 1e-2, "l1": 1e-3})
AMSGRAD = (regoptim.ProxAdam, {"lr": 1e-2, "amsgrad": True, "l1": 1e-3})
CASES = {"sgd": SGD, "adamw": ADAMW, "adam-amsgrad": AMSGRAD}


@pytest.fixture(autouse=True)
def _cpp_for_fused_true(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # fused=True on CPU -> the C++ kernel


def test_no_plan_for_the_triton_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    cls, kw = SGD
    a, b, oa, ob = _pair(cls, kw, fused=True)
    _steps(a, b, oa, ob, 0, 2)
    assert _uses_plan(oa)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # fused=True now means the Triton kernels
    calls = []
    monkeypatch.setattr(cls, "_dispatch_group", lambda self, g: calls.append(g))
    _grads(a, b, 2)
    oa.step()
    assert calls, "the plan stepped although fused=True now means Triton"


def _no_plan(cls: type) -> type:
    class FullDispatch(cls):  # type: ignore[misc, valid-type]
        def _step_group(self, group: dict[str, Any]) -> None:
            self._dispatch_group(group)

    return FullDispatch


def _pair(cls: type, kw: dict[str, Any], shapes=((7, 5), (13,), (4, 3, 2)), fused=None):
    g = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=g) for s in shapes]
    a = [x.clone().requires_grad_() for x in init]
    b = [x.clone().requires_grad_() for x in init]
    return a, b, cls(a, **kw, fused=fused), _no_plan(cls)(b, **kw, fused=fused)


def _grads(a, b, seed: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    for p, q in zip(a, b, strict=True):
        grad = torch.randn(p.shape, generator=g)
        p.grad, q.grad = grad.clone(), grad.clone()


def _steps(a, b, oa, ob, start: int, n: int) -> None:
    for t in range(start, start + n):
        _grads(a, b, t)
        oa.step()
        ob.step()
        for p, q in zip(a, b, strict=True):
            assert torch.equal(p, q), t


def _uses_plan(opt: torch.optim.Optimizer) -> bool:
    return any(isinstance(v, _plan.Plan) for v in opt.__dict__.get("_cpu_plans", {}).values())


@pytest.mark.parametrize("fused", [None, True])
@pytest.mark.parametrize("case", list(CASES))
def test_steady_state_takes_the_plan(case: str, fused, monkeypatch: pytest.MonkeyPatch) -> None:
    cls, kw = CASES[case]
    a, b, oa, ob = _pair(cls, kw, fused=fused)
    _steps(a, b, oa, ob, 0, 2)
    assert _uses_plan(oa) and not _uses_plan(ob)
    assert oa.param_groups[0]["fused"] is fused

    def no_dispatch(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the full dispatch ran")

    monkeypatch.setattr(cls, "_dispatch_group", no_dispatch)
    _grads(a, b, 5)
    oa.step()  # through the plan alone


@pytest.mark.parametrize("case", list(CASES))
def test_hyperparameters_are_read_every_step(case: str) -> None:
    cls, kw = CASES[case]
    a, b, oa, ob = _pair(cls, kw)
    _steps(a, b, oa, ob, 0, 2)
    for opt in (oa, ob):
        group = opt.param_groups[0]
        group["lr"] *= 0.5
        group["l1"] = 5e-2
        group["weight_decay"] = 0.0
        if "momentum" in group:
            group["momentum"] = 0.5
        else:
            group["betas"] = (0.8, 0.99)
    _steps(a, b, oa, ob, 2, 2)
    assert _uses_plan(oa)


def _rebind(a, b) -> None:
    a[0].data = a[0].data[:5].clone()  # another size: the state no longer fits
    b[0].data = b[0].data[:5].clone()


def _strided_grads(a, b) -> None:
    grad = torch.randn(a[0].shape[::-1])
    a[0].grad, b[0].grad = grad.clone().t(), grad.clone().t()  # the param's transposed layout


CHANGES = {
    "fresh strided grads": _strided_grads,
    "negative-bit grad": lambda a, b: [
        setattr(p, "grad", (-p.grad)._neg_view()) for p in (a[1], b[1])
    ],
    "param moved": lambda a, b: [setattr(p, "data", p.data.clone()) for p in (a[1], b[1])],
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("case", list(CASES))
def test_a_change_is_never_trusted(case: str, change: str) -> None:
    cls, kw = CASES[case]
    a, b, oa, ob = _pair(cls, kw)
    _steps(a, b, oa, ob, 0, 2)
    _grads(a, b, 2)
    CHANGES[change](a, b)
    oa.step()
    ob.step()
    for p, q in zip(a, b, strict=True):
        if change == "fresh strided grads":  # the default path takes torch's for-loop for it
            torch.testing.assert_close(p, q, **TOL[torch.float32])
            q.data.copy_(p.data)
        else:
            assert torch.equal(p, q)
    if change == "fresh strided grads":
        ob.load_state_dict(copy.deepcopy(oa.state_dict()))
    _steps(a, b, oa, ob, 3, 2)


@pytest.mark.parametrize("case", list(CASES))
def test_replaced_state_is_used(case: str) -> None:
    """State loaded or assigned between steps is what the next step reads."""
    cls, kw = CASES[case]
    a, b, oa, ob = _pair(cls, kw)
    _steps(a, b, oa, ob, 0, 2)
    for opt, params in ((oa, a), (ob, b)):
        st = opt.state[params[1]]
        opt.state[params[1]] = {k: v.clone() * (0.5 if k != "step" else 1) for k, v in st.items()}
    _steps(a, b, oa, ob, 2, 1)
    sd = ob.state_dict()
    oa.load_state_dict(copy.deepcopy(sd))
    ob.load_state_dict(copy.deepcopy(sd))
    _steps(a, b, oa, ob, 3, 2)


@pytest.mark.parametrize("case", list(CASES))
def test_a_rebound_param_raises_naming_it(case: str) -> None:
    cls, kw = CASES[case]
    a, b, oa, ob = _pair(cls, kw)
    _steps(a, b, oa, ob, 0, 2)
    _rebind(a, b)
    a[0].grad = torch.randn(5, 5)
    with pytest.raises(ValueError, match="parameter 0"):
        oa.step()


def test_a_param_without_grad_takes_the_dispatch() -> None:
    cls, kw = SGD
    a, b, oa, ob = _pair(cls, kw)
    _steps(a, b, oa, ob, 0, 2)
    _grads(a, b, 2)
    a[2].grad = b[2].grad = None
    oa.step()
    ob.step()
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)


def test_params_list_edited_in_place() -> None:
    cls, kw = SGD
    a, b, oa, ob = _pair(cls, kw)
    _steps(a, b, oa, ob, 0, 2)
    extra = [torch.randn(3).requires_grad_() for _ in range(2)]
    oa.param_groups[0]["params"].append(extra[0])
    ob.param_groups[0]["params"].append(extra[1])
    extra[1].data.copy_(extra[0].data)
    a.append(extra[0])
    b.append(extra[1])
    _steps(a, b, oa, ob, 2, 2)


@pytest.mark.parametrize("case", list(CASES))
def test_group_lasso_switched_on_takes_the_dispatch(case: str) -> None:
    """A plan runs the kernel only: a group with group_l1 > 0 (the group prox after it) must
    leave the plan, also when group_l1 is switched on after the plan was made."""
    cls, kw = CASES[case]
    a, b, oa, ob = _pair(cls, kw, shapes=((4, 5), (4,), (4, 3, 2)))
    _steps(a, b, oa, ob, 0, 2)
    assert _uses_plan(oa)
    for opt in (oa, ob):
        opt.param_groups[0]["group_l1"] = 1e3  # strong enough to zero whole slices
    _steps(a, b, oa, ob, 2, 2)
    assert (a[1] == 0).any()  # whole groups went to zero through the group prox


def test_the_python_metadata_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without dynamo's TensorGuards (another torch) the plan guards metadata in Python columns:
    the same changes are caught."""
    import torch._C._dynamo.guards as guards

    def unavailable(*args: Any, **kwargs: Any) -> None:
        raise TypeError("no TensorGuards in this torch")

    monkeypatch.setattr(guards, "TensorGuards", unavailable)
    cls, kw = SGD
    a, b, oa, ob = _pair(cls, kw)
    _steps(a, b, oa, ob, 0, 2)
    plan = next(iter(oa.__dict__["_cpu_plans"].values()))
    assert plan.guard._guard is None  # the fallback is in use
    _grads(a, b, 2)
    a[1].grad, b[1].grad = (-a[1].grad)._neg_view(), (-b[1].grad)._neg_view()
    oa.step()
    ob.step()
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
    _steps(a, b, oa, ob, 3, 2)


def test_a_group_that_cannot_have_a_plan_stops_being_tried(monkeypatch) -> None:
    """float64 takes torch's fused kernel: no plan; trying to build one is not free, so it stops
    after a few steps."""
    p = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    opt = regoptim.ProxSGD([p], lr=0.1, momentum=0.9, l1=1e-3)
    attempts = []
    real = _plan._new_plan
    monkeypatch.setattr(_plan, "_new_plan", lambda *a: attempts.append(1) or real(*a))
    for _ in range(3 * _plan._MISSES_BEFORE_GIVING_UP):
        p.grad = torch.ones(5, dtype=torch.float64)
        opt.step()
    assert len(attempts) == _plan._MISSES_BEFORE_GIVING_UP
    assert not _uses_plan(opt)

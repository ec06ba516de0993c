"""Which group-lasso steps take the fused group step (regoptim.backends.group_step), with what.

The backends themselves are tested against the reference in test_cpu_group.py (C++) and
test_triton_group.py (Triton), and end to end in test_group_lasso.py; here a recording backend
stands in for them, so these tests are about the routing only.
"""

from __future__ import annotations

import pytest
import torch

import regoptim
from regoptim.backends import group_step as _group_step
from regoptim.hyper import AdamHyper, GroupLasso, SgdHyper


class _Recorder:
    """A backend that records its calls and leaves every tensor as it is."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def fused_group_sgd_(self, *args, **kwargs) -> None:
        self.calls.append(("sgd", args, kwargs))

    def fused_group_adam_(self, *args, **kwargs) -> None:
        self.calls.append(("adam", args, kwargs))


@pytest.fixture
def backend(monkeypatch):
    rec = _Recorder()
    picked: list[tuple[str, bool]] = []

    def fake(device_type, default_path):
        picked.append((device_type, default_path))
        return rec

    monkeypatch.setattr(_group_step, "_backend", fake)
    rec.picked = picked  # type: ignore[attr-defined]
    return rec


def _layer(dtype=torch.float32, grads=True):
    w = torch.randn(6, 4, dtype=dtype, requires_grad=True)
    b = torch.randn(6, dtype=dtype, requires_grad=True)
    if grads:
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    return w, b


def test_sgd_default_path_takes_one_fused_call(backend):
    w, b = _layer()
    opt = regoptim.ProxSGD(
        [{"params": [w, b], "group_l1": 0.1, "group_axes": [-2, 0]}],
        lr=0.5,
        momentum=0.9,
        weight_decay=1e-3,
        l1=1e-4,
    )
    opt.step()
    assert backend.picked == [("cpu", True)]
    ((name, args, kwargs),) = backend.calls
    assert name == "sgd"
    params, grads, bufs, hyper, lasso = args
    assert params == [w, b] and grads == [w.grad, b.grad]
    assert [t.shape for t in bufs] == [w.shape, b.shape]  # new buffers for the first step
    assert kwargs["is_first_step"] is True
    assert hyper == SgdHyper(lr=0.5, weight_decay=1e-3, momentum=0.9, l1=1e-4)
    assert lasso == GroupLasso(group_l1=0.1, axes=(0, 0))
    assert all(opt.state[p]["momentum_buffer"] is t for p, t in zip(params, bufs, strict=True))
    opt.step()
    assert backend.calls[1][2]["is_first_step"] is False
    assert backend.calls[1][1][2] == bufs


def test_adam_default_path_takes_one_fused_call(backend):
    w, b = _layer()
    opt = regoptim.ProxAdamW([w, b], lr=0.01, group_l1=0.2, amsgrad=True)
    opt.step()
    ((name, args, kwargs),) = backend.calls
    assert name == "adam"
    params, grads, m, v, vmax, steps, hyper, lasso = args
    assert params == [w, b] and len(m) == len(v) == len(vmax) == len(steps) == 2
    assert all(s.dtype == torch.float32 and s.device == w.device for s in steps)
    assert hyper == AdamHyper(lr=0.01, weight_decay=1e-2, decoupled_weight_decay=True, amsgrad=True)
    assert lasso == GroupLasso(group_l1=0.2, axes=(0, 0))


@pytest.mark.parametrize(
    "case",
    ["no_grad", "float64", "foreach", "loop", "differentiable", "strided_grad", "group_l1_0"],
)
@pytest.mark.parametrize("cls", [regoptim.ProxSGD, regoptim.ProxAdam])
def test_unqualified_groups_take_the_unfused_path(backend, cls, case):
    w, b = _layer(torch.float64 if case == "float64" else torch.float32)
    if case == "differentiable":  # autograd through the step needs non-leaf params
        w, b = w.clone(), b.clone()
        w.grad, b.grad = torch.randn_like(w), torch.randn_like(b)
    if case == "no_grad":
        b.grad = None
    if case == "strided_grad":
        w.grad = torch.randn(4, 6).t()
    kw = {"foreach": True} if case == "foreach" else {"foreach": False} if case == "loop" else {}
    if case == "differentiable":
        kw["differentiable"] = True
    group_l1 = 0.0 if case == "group_l1_0" else 0.1
    opt = cls([w, b], lr=0.1, group_l1=group_l1, **kw)
    with torch.set_grad_enabled(case == "differentiable"):
        opt.step()
    assert backend.calls == []


def test_mixed_new_and_old_momentum_buffers_take_the_unfused_path(backend):
    w, b = _layer()
    opt = regoptim.ProxSGD([w, b], lr=0.1, momentum=0.9, group_l1=0.1)
    opt.state[w]["momentum_buffer"] = torch.zeros_like(w)
    opt.step()
    assert backend.calls == []


def test_fused_true_takes_the_fused_call_on_its_backend(backend):
    w, b = _layer()
    regoptim.ProxSGD([w, b], lr=0.1, group_l1=0.1, fused=True).step()
    assert backend.picked == [("cpu", False)] and len(backend.calls) == 1


def test_skipped_first_step_leaves_no_buffer(backend):
    w, b = _layer()
    opt = regoptim.ProxSGD([w, b], lr=0.1, momentum=0.9, group_l1=0.1, fused=True)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert backend.calls == [] and all("momentum_buffer" not in opt.state[p] for p in (w, b))

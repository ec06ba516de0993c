"""``decay_scaling``: decoupled decay that follows the lr ("lr", torch's), the schedule's shape
("schedule") or nothing ("none"), on every path, against the float64 reference."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import regoptim
from regoptim import reference as ref
from tests._stack_helpers import ALL_PATHS, on_path
from tests.tolerances import assert_close_to_ref

OPTIMIZERS = {
    "ProxSGD": (regoptim.ProxSGD, {"momentum": 0.9, "decoupled_weight_decay": True}),
    "ProxAdam": (regoptim.ProxAdam, {"decoupled_weight_decay": True, "amsgrad": True}),
    "ProxAdamW": (regoptim.ProxAdamW, {}),
}
LRS = [0.1, 0.05, 0.0, 0.02]  # a schedule set by hand, lr = 0 included


def _ref_step(cls: type, p, g, st, kw: dict[str, Any], **hp: Any):
    kw = {k: v for k, v in kw.items() if k != "betas"}
    if cls is regoptim.ProxSGD:
        return ref.sgd_step(p, g, st, **kw, **hp)
    return ref.adam_step(p, g, st, **{**kw, "decoupled_weight_decay": True}, **hp)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("scaling", ["lr", "schedule", "none"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_matches_the_reference(opt_name: str, scaling: str, path: dict[str, Any]) -> None:
    cls, extra = OPTIMIZERS[opt_name]
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=g).requires_grad_() for s in [(6, 5), (7,)]]
    expected = [p.detach().double().clone() for p in params]
    states: list[dict[str, Any]] = [{} for _ in params]
    kw = {"weight_decay": 0.2, "l1": 1e-3, **extra}
    with on_path(path) as path_kwargs:
        opt = cls(params, lr=LRS[0], decay_scaling=scaling, **kw, **path_kwargs)
        for lr in LRS:
            opt.param_groups[0]["lr"] = lr
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=g)
                expected[i] = _ref_step(
                    cls, expected[i], p.grad, states[i], kw, lr=lr, decay_scaling=scaling,
                    initial_lr=LRS[0],
                )  # fmt: skip
            opt.step()
            for p, e in zip(params, expected, strict=True):
                assert_close_to_ref(p, e, torch.float32)


def test_none_decays_even_at_lr_zero() -> None:
    p = torch.ones(3, requires_grad=True)
    opt = regoptim.ProxAdamW([p], lr=0.0, weight_decay=0.1, decay_scaling="none")
    p.grad = torch.zeros(3)
    opt.step()
    torch.testing.assert_close(p.detach(), torch.full((3,), 0.9))


def test_schedule_follows_a_schedulers_initial_lr() -> None:
    """With a torch scheduler the factor is 1 - wd * lr / initial_lr, the scheduler's
    initial_lr (OneCycleLR sets its own, max_lr / div_factor)."""
    p = torch.ones(4, requires_grad=True)
    opt = regoptim.ProxAdamW([p], lr=1.0, weight_decay=0.1, decay_scaling="schedule")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.4, total_steps=10)
    initial = opt.param_groups[0]["initial_lr"]
    assert initial == pytest.approx(0.4 / 25)
    expected = p.detach().double().clone()
    for _ in range(5):
        lr = opt.param_groups[0]["lr"]
        p.grad = torch.zeros(4)
        opt.step()
        sched.step()
        expected = expected * ref.decay_factor(lr, 0.1, "schedule", initial)
        torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=0)


def test_lr_is_torch_adamw_bitwise() -> None:
    a = torch.randn(10, requires_grad=True)
    b = a.detach().clone().requires_grad_()
    oa = regoptim.ProxAdamW([a], lr=1e-2, decay_scaling="lr", foreach=False)
    ob = torch.optim.AdamW([b], lr=1e-2, foreach=False)
    for _ in range(3):
        a.grad = torch.randn(10)
        b.grad = a.grad.clone()
        oa.step()
        ob.step()
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"decay_scaling": "cosine"}, "Invalid decay_scaling: 'cosine'"),
        ({"decay_scaling": None}, "Invalid decay_scaling: None"),
        ({"decay_scaling": "none", "weight_decay": 0.1}, "decoupled weight decay only"),
        (
            {"decay_scaling": "schedule", "lr": 0.0, "decoupled_weight_decay": True},
            "initial_lr, got 0.0",
        ),
    ],
)
def test_bad_input(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        regoptim.ProxSGD([torch.zeros(2, requires_grad=True)], **{"lr": 0.1, **kw})


def test_add_param_group_and_state_dict() -> None:
    p, q = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    opt = regoptim.ProxAdamW([p], lr=0.1, decay_scaling="schedule")
    opt.add_param_group({"params": [q], "lr": 0.5})
    assert opt.param_groups[1]["initial_lr"] == 0.5
    with pytest.raises(ValueError, match="decoupled weight decay only"):
        regoptim.ProxSGD([p], lr=0.1).add_param_group({"params": [q], "decay_scaling": "none"})
    sd = copy.deepcopy(opt.state_dict())
    fresh = regoptim.ProxAdamW([p], lr=0.1)
    fresh.add_param_group({"params": [q]})
    fresh.load_state_dict(sd)
    assert [g["decay_scaling"] for g in fresh.param_groups] == ["schedule", "schedule"]
    older = copy.deepcopy(sd)
    for group in older["param_groups"]:
        del group["decay_scaling"]  # a checkpoint from before the key
    fresh.load_state_dict(older)
    assert [g["decay_scaling"] for g in fresh.param_groups] == ["lr", "lr"]


def test_skipped_amp_step_does_not_decay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    p = torch.ones(5, requires_grad=True)
    opt = regoptim.ProxSGD(
        [p], lr=0.1, weight_decay=0.5, decoupled_weight_decay=True, decay_scaling="none",
        fused=True,
    )  # fmt: skip
    p.grad = torch.ones(5)
    opt.grad_scale = torch.tensor(1.0)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(5))

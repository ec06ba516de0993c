"""Every torch.optim.lr_scheduler drives regoptim exactly as it drives the torch.optim counterpart.

With ``l1=0`` a regoptim optimizer is its torch counterpart, so under the same scheduler the whole
trajectory (lr, momentum/betas, parameters, state) must be bitwise equal on the same torch path.
Scheduling ``l1`` and ``weight_decay`` by hand through ``param_groups`` is checked against the
float64 reference.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as S

import regoptim
from regoptim.reference import adam_step, sgd_step
from tests._stack_helpers import (
    ALL_PATHS,
    COUNTERPART,
    FUSED_PATHS,
    assert_params_equal,
    assert_state_equal,
    loss_fn,
    make_batches,
    make_model,
    on_path,
    params_of,
    skip_unless_torch_parity_verified,
    torch_kwargs,
)
from tests.tolerances import assert_close_to_ref

N_STEPS = 8

SCHEDULERS: dict[str, Callable[[Any], Any]] = {
    "LambdaLR": lambda o: S.LambdaLR(o, lambda e: 0.9**e),
    "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda e: 0.95),
    "StepLR": lambda o: S.StepLR(o, step_size=2, gamma=0.5),
    "MultiStepLR": lambda o: S.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
    "ConstantLR": lambda o: S.ConstantLR(o, factor=0.5, total_iters=3),
    "LinearLR": lambda o: S.LinearLR(o, start_factor=0.2, end_factor=1.0, total_iters=4),
    "ExponentialLR": lambda o: S.ExponentialLR(o, gamma=0.8),
    "PolynomialLR": lambda o: S.PolynomialLR(o, total_iters=6, power=2.0),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=5, eta_min=1e-4),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=3, T_mult=2),
    "CyclicLR": lambda o: S.CyclicLR(
        o,
        base_lr=1e-3,
        max_lr=5e-2,
        step_size_up=3,
        cycle_momentum=True,
        base_momentum=0.8,
        max_momentum=0.95,
    ),
    "OneCycleLR": lambda o: S.OneCycleLR(o, max_lr=5e-2, total_steps=N_STEPS + 2),
    "ReduceLROnPlateau": lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=0, threshold=0.5),
    "SequentialLR": lambda o: S.SequentialLR(
        o,
        [S.LinearLR(o, start_factor=0.1, total_iters=3), S.CosineAnnealingLR(o, T_max=5)],
        milestones=[3],
    ),
    "ChainedScheduler": lambda o: S.ChainedScheduler(
        [S.ConstantLR(o, factor=0.5, total_iters=2), S.ExponentialLR(o, gamma=0.9)]
    ),
}

OPTIMIZERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ProxSGD": (regoptim.ProxSGD, {"momentum": 0.9, "weight_decay": 1e-2}),
    "ProxAdam": (regoptim.ProxAdam, {"weight_decay": 1e-2}),
    "ProxAdamW": (regoptim.ProxAdamW, {"weight_decay": 1e-2, "amsgrad": True}),
}


def _momentum_of(group: dict[str, Any]) -> float | None:
    if "betas" in group:
        return group["betas"][0]
    return group.get("momentum")


def _train(cls: type, kwargs: dict[str, Any], sched_name: str) -> tuple[list[Any], Any, Any]:
    model = make_model()
    if isinstance(
        kwargs["lr"], torch.Tensor
    ):  # each run gets its own (schedulers fill it in place)
        kwargs = {**kwargs, "lr": kwargs["lr"].clone()}
    opt = cls(model.parameters(), **kwargs)
    sched = SCHEDULERS[sched_name](opt)
    trajectory = []
    for x, y in make_batches(N_STEPS):
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        if isinstance(sched, S.ReduceLROnPlateau):
            sched.step(loss.item())
        else:
            sched.step()
        g = opt.param_groups[0]
        trajectory.append((float(g["lr"]), _momentum_of(g), params_of(model)))
    return trajectory, opt, model


def _compare(cls: type, kwargs: dict[str, Any], sched_name: str, path: dict[str, Any]) -> None:
    ours, opt, _ = _train(cls, {**kwargs, **path}, sched_name)
    theirs, ref_opt, _ = _train(COUNTERPART[cls], {**kwargs, **torch_kwargs(path)}, sched_name)
    lrs = {lr for lr, _, _ in ours}
    assert len(lrs) > 1, "the scheduler did not change the lr"
    for (lr_a, mom_a, p_a), (lr_b, mom_b, p_b) in zip(ours, theirs, strict=True):
        assert lr_a == lr_b
        assert mom_a == mom_b
        assert_params_equal(p_a, p_b)
    if sched_name in ("CyclicLR", "OneCycleLR"):
        assert len({m for _, m, _ in ours}) > 1, "momentum was not cycled"
    assert_state_equal(opt.state_dict(), ref_opt.state_dict())


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_scheduler_matches_torch_float_lr(opt_name: str, sched_name: str) -> None:
    cls, kwargs = OPTIMIZERS[opt_name]
    # torch's for-loop on both sides: bitwise the same ops
    _compare(cls, {"lr": 1e-2, **kwargs}, sched_name, {"foreach": False})


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
@pytest.mark.parametrize("path", [pytest.param({}, id="default"), FUSED_PATHS[0]])
@pytest.mark.parametrize("sched_name", ["OneCycleLR", "CyclicLR", "SequentialLR"])
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_scheduler_matches_torch_fused(
    opt_name: str, sched_name: str, path: dict[str, Any], lr_kind: str
) -> None:
    """regoptim's default CPU path (torch's fused CPU kernel plus a pass that l1=0 skips) and its
    own fused C++ kernel, both against torch's fused CPU optimizer: bitwise."""
    cls, kwargs = OPTIMIZERS[opt_name]
    if path.get("fused"):
        skip_unless_torch_parity_verified()
    lr = torch.tensor(1e-2) if lr_kind == "tensor" else 1e-2
    with on_path(path) as path_kwargs:
        _compare(cls, {"lr": lr, **kwargs}, sched_name, path_kwargs)


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_scheduler_matches_torch_tensor_lr(opt_name: str, sched_name: str) -> None:
    cls, kwargs = OPTIMIZERS[opt_name]
    lr = torch.tensor(1e-2)
    _compare(cls, {"lr": lr, **kwargs}, sched_name, {"foreach": False})


def test_tensor_lr_stays_a_tensor_under_a_scheduler() -> None:
    model = make_model()
    lr = torch.tensor(1e-2)
    opt = regoptim.ProxAdamW(model.parameters(), lr=lr, l1=1e-3)
    sched = S.CosineAnnealingLR(opt, T_max=4)
    for x, y in make_batches(3):
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()
        sched.step()
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    assert opt.param_groups[0]["lr"] is lr  # updated in place, as torch's schedulers do
    assert float(lr) < 1e-2


# --- l1 and weight_decay scheduled by hand through param_groups ----------------------------------


def _ramp(t: int) -> float:
    return min(1.0, (t + 1) / 4)  # LambdaLR-like warm-up factor


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (regoptim.ProxSGD, {"momentum": 0.9, "decoupled_weight_decay": True}),
        (regoptim.ProxSGD, {"momentum": 0.5, "nesterov": True}),
        (regoptim.ProxAdam, {}),
        (regoptim.ProxAdamW, {"amsgrad": True}),
    ],
    ids=["sgd-decoupled", "sgd-nesterov", "adam", "adamw-amsgrad"],
)
def test_l1_and_weight_decay_schedules_match_reference(
    cls: type, kwargs: dict[str, Any], path: dict[str, Any]
) -> None:
    """An L1 ramp and a weight-decay decay set by hand every step, under CosineAnnealingLR."""
    with on_path(path) as path_kwargs:
        _run_schedule(cls, kwargs, path_kwargs)


def _run_schedule(cls: type, kwargs: dict[str, Any], path: dict[str, Any]) -> None:
    g = torch.Generator().manual_seed(3)
    shapes = [(5, 7), (7,), (3, 2, 2)]
    params = [torch.randn(s, generator=g).requires_grad_() for s in shapes]
    opt = cls(params, lr=0.05, weight_decay=0.0, l1=0.0, **kwargs, **path)
    sched = S.CosineAnnealingLR(opt, T_max=10, eta_min=0.01)
    ref = [p.detach().double().clone() for p in params]
    ref_state: list[dict[str, Any]] = [{} for _ in params]
    is_sgd = cls is regoptim.ProxSGD
    hyper = {k: v for k, v in kwargs.items() if k != "amsgrad" or not is_sgd}
    if cls is regoptim.ProxAdamW:
        hyper["decoupled_weight_decay"] = True
    zeros_seen = 0
    for t in range(8):
        group = opt.param_groups[0]
        group["l1"] = 0.5 * _ramp(t)
        group["weight_decay"] = 0.1 * 0.8**t
        lr = float(group["lr"])
        for i, p in enumerate(params):
            p.grad = torch.randn(p.shape, generator=g)
            step = sgd_step if is_sgd else adam_step
            ref[i] = step(
                ref[i],
                p.grad,
                ref_state[i],
                lr=lr,
                weight_decay=group["weight_decay"],
                l1=group["l1"],
                **hyper,
            )
        opt.step()
        sched.step()
        for p, r in zip(params, ref, strict=True):
            assert_close_to_ref(p, r, torch.float32)
            assert torch.equal(p == 0, r == 0), "exact zeros differ from the reference"
            zeros_seen += int((p == 0).sum())
    assert zeros_seen > 0, "the L1 ramp produced no exact zeros"

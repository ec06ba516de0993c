"""regoptim.schedule: torch's LR schedulers on l1 / weight_decay (SparsityTarget: test_sparsity_target.py).

A schedule on ``key`` must give ``param_group[key]`` exactly (bitwise) the values the same torch
scheduler gives ``lr`` from the same base, and never touch ``lr``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.optim import lr_scheduler as S

import regoptim

N_STEPS = 14
BASES = (3e-3, 7e-4)  # two param groups, two base values

# (scheduler class or builder, args, kwargs): built as cls(optimizer, *args, **kwargs)
CASES: dict[str, tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]] = {
    "StepLR": (S.StepLR, (3,), {"gamma": 0.5}),
    "MultiStepLR": (S.MultiStepLR, ([2, 5, 9],), {"gamma": 0.3}),
    "ConstantLR": (S.ConstantLR, (), {"factor": 0.5, "total_iters": 3}),
    "LinearLR": (S.LinearLR, (0.1, 1.0, 5), {}),
    "ExponentialLR": (S.ExponentialLR, (0.8,), {}),
    "PolynomialLR": (S.PolynomialLR, (), {"total_iters": 8, "power": 2.0}),
    "CosineAnnealingLR": (S.CosineAnnealingLR, (), {"T_max": 6, "eta_min": 1e-5}),
    "CosineAnnealingWarmRestarts": (S.CosineAnnealingWarmRestarts, (), {"T_0": 3, "T_mult": 2}),
    "LambdaLR": (S.LambdaLR, (lambda e: 1.0 / (1 + e),), {}),
    "MultiplicativeLR": (S.MultiplicativeLR, (lambda e: 0.9,), {}),
    "OneCycleLR": (
        S.OneCycleLR,
        (),
        {"max_lr": [1e-2, 2e-3], "total_steps": N_STEPS + 1, "cycle_momentum": False},
    ),
    "CyclicLR": (
        S.CyclicLR,
        (),
        {"base_lr": 1e-4, "max_lr": 5e-3, "step_size_up": 3, "cycle_momentum": False},
    ),
    "SequentialLR": (
        lambda o: S.SequentialLR(
            o,
            [S.LinearLR(o, start_factor=0.1, total_iters=3), S.CosineAnnealingLR(o, T_max=6)],
            milestones=[3],
        ),
        (),
        {},
    ),
    "ChainedScheduler": (
        lambda o: S.ChainedScheduler(
            [S.ConstantLR(o, factor=0.5, total_iters=4), S.ExponentialLR(o, gamma=0.9)],
            optimizer=o,
        ),
        (),
        {},
    ),
}


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    return torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)


def _groups(model: torch.nn.Module, key: str, values: tuple[float, ...]) -> list[dict[str, Any]]:
    return [{"params": [p], key: v} for p, v in zip(model.parameters(), values, strict=True)]


def _torch_lr_values(make: Callable[..., Any], args: tuple, kwargs: dict, n: int) -> list:
    """What torch's scheduler gives ``lr`` from ``BASES``: the value after creation, then per step."""
    opt = torch.optim.SGD(_groups(torch.nn.Linear(4, 3), "lr", BASES), lr=1.0)
    sched = make(opt, *args, **kwargs)
    values = [[g["lr"] for g in opt.param_groups]]
    for _ in range(n):
        opt.step()
        sched.step()
        values.append([g["lr"] for g in opt.param_groups])
    return values


@pytest.mark.parametrize("key", ["l1", "weight_decay"])
@pytest.mark.parametrize("name", list(CASES))
def test_key_follows_torch_lr_bitwise(name: str, key: str) -> None:
    make, args, kwargs = CASES[name]
    expected = _torch_lr_values(make, args, kwargs, N_STEPS)

    model = torch.nn.Linear(4, 3)
    opt = regoptim.ProxSGD(_groups(model, key, BASES), lr=0.1, momentum=0.9)
    sched = regoptim.schedule(opt, key, make, *args, **kwargs)
    got, lrs, momenta = [[g[key] for g in opt.param_groups]], [], []
    for _ in range(N_STEPS):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
        got.append([g[key] for g in opt.param_groups])
        assert sched.get_last_values() == got[-1]
        lrs += [g["lr"] for g in opt.param_groups]
        momenta += [g["momentum"] for g in opt.param_groups]
    assert got == expected  # bitwise: float ==
    assert set(lrs) == {0.1} and set(momenta) == {0.9}  # lr and momentum never touched


def test_reduce_lr_on_plateau_takes_the_metric() -> None:
    metrics = [1.0, 0.9, 0.95, 0.96, 0.97, 0.5, 0.6, 0.7, 0.8]
    kwargs = {"factor": 0.5, "patience": 1, "threshold": 0.01}
    ref_opt = torch.optim.SGD(_groups(torch.nn.Linear(4, 3), "lr", BASES), lr=1.0)
    ref = S.ReduceLROnPlateau(ref_opt, **kwargs)
    model = torch.nn.Linear(4, 3)
    opt = regoptim.ProxSGD(_groups(model, "l1", BASES), lr=0.1)
    sched = regoptim.schedule(opt, "l1", S.ReduceLROnPlateau, **kwargs)
    for m in metrics:
        ref.step(m)
        sched.step(m)
        assert [g["l1"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
    assert opt.param_groups[0]["l1"] < BASES[0]  # it did reduce
    with pytest.raises(TypeError, match="metric"):
        sched.step()


def test_two_schedules_on_one_key_compose_as_chained_lr_schedulers() -> None:
    ref_opt = torch.optim.SGD(_groups(torch.nn.Linear(4, 3), "lr", BASES), lr=1.0)
    refs = [S.ExponentialLR(ref_opt, 0.9), S.StepLR(ref_opt, 3, gamma=0.5)]
    opt = regoptim.ProxSGD(_groups(torch.nn.Linear(4, 3), "l1", BASES), lr=0.1)
    scheds = [
        regoptim.schedule(opt, "l1", S.ExponentialLR, 0.9),
        regoptim.schedule(opt, "l1", S.StepLR, 3, gamma=0.5),
    ]
    for _ in range(N_STEPS):
        for o, ss in ((ref_opt, refs), (opt, scheds)):
            o.step()
            for s in ss:
                s.step()
        assert [g["l1"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]


def test_lr_scheduler_and_l1_schedule_coexist() -> None:
    """OneCycleLR on lr (cycling momentum) and OneCycleLR on l1 keep apart (max_lr vs max_l1)."""
    total = N_STEPS + 1
    ref_lr_opt = torch.optim.SGD(torch.nn.Linear(4, 3).parameters(), lr=0.1, momentum=0.9)
    ref_lr = S.OneCycleLR(ref_lr_opt, max_lr=0.5, total_steps=total)
    ref_l1_opt = torch.optim.SGD(torch.nn.Linear(4, 3).parameters(), lr=1e-3)
    ref_l1 = S.OneCycleLR(ref_l1_opt, max_lr=4e-3, total_steps=total, cycle_momentum=False)

    opt = regoptim.ProxSGD(torch.nn.Linear(4, 3).parameters(), lr=0.1, momentum=0.9, l1=1e-3)
    lr_sched = S.OneCycleLR(opt, max_lr=0.5, total_steps=total)
    l1_sched = regoptim.schedule(
        opt, "l1", S.OneCycleLR, max_lr=4e-3, total_steps=total, cycle_momentum=False
    )
    for _ in range(N_STEPS):
        for o, s in ((ref_lr_opt, ref_lr), (ref_l1_opt, ref_l1), (opt, lr_sched)):
            o.step()
            s.step()
        l1_sched.step()
        group = opt.param_groups[0]
        assert group["lr"] == ref_lr_opt.param_groups[0]["lr"]
        assert group["momentum"] == ref_lr_opt.param_groups[0]["momentum"]
        assert group["l1"] == ref_l1_opt.param_groups[0]["lr"]
        assert lr_sched.get_last_lr() == ref_lr.get_last_lr()


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (S.OneCycleLR, {"max_lr": [4e-3, 0.0], "total_steps": 20, "cycle_momentum": False}),
        (S.CyclicLR, {"base_lr": [1e-4, 0.0], "max_lr": [5e-3, 0.0], "cycle_momentum": False}),
        (S.CosineAnnealingLR, {"T_max": 5}),
    ],
)
def test_exempt_group_stays_at_zero(cls: type, kwargs: dict) -> None:
    """A multiplicative schedule keeps 0 at 0; absolute ones (max_lr) need 0.0 for that group."""
    model = torch.nn.Linear(4, 3)
    opt = regoptim.ProxSGD(regoptim.param_groups(model, l1=1e-3), lr=0.1)  # bias: l1=0
    sched = regoptim.schedule(opt, "l1", cls, **kwargs)
    regularized = set()
    for _ in range(N_STEPS):
        opt.step()
        sched.step()
        assert opt.param_groups[1]["l1"] == 0.0
        regularized.add(opt.param_groups[0]["l1"])
    assert len(regularized) > 1  # the regularized group was scheduled


@pytest.mark.parametrize("name", ["CosineAnnealingLR", "OneCycleLR", "SequentialLR", "LambdaLR"])
def test_resume_from_state_dicts_gives_the_same_values(name: str) -> None:
    make, args, kwargs = CASES[name]
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    batches = [torch.randn(8, 4) for _ in range(N_STEPS)]

    def run(opt: torch.optim.Optimizer, sched: Any, xs: list[torch.Tensor]) -> list:
        values = []
        for x in xs:
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            sched.step()
            values.append([g["l1"] for g in opt.param_groups])
        return values

    initial = {k: v.clone() for k, v in model.state_dict().items()}
    opt = regoptim.ProxSGD(_groups(model, "l1", BASES), lr=0.1, momentum=0.9)
    straight = run(opt, regoptim.schedule(opt, "l1", make, *args, **kwargs), batches)

    model.load_state_dict(initial)
    opt = regoptim.ProxSGD(_groups(model, "l1", BASES), lr=0.1, momentum=0.9)
    sched = regoptim.schedule(opt, "l1", make, *args, **kwargs)
    first = run(opt, sched, batches[:5])
    opt_state, sched_state = opt.state_dict(), sched.state_dict()

    model2 = torch.nn.Linear(4, 3)  # a fresh process: new model, optimizer, schedule
    model2.load_state_dict(model.state_dict())
    model = model2
    opt = regoptim.ProxSGD(_groups(model, "l1", BASES), lr=0.1, momentum=0.9)
    sched = regoptim.schedule(opt, "l1", make, *args, **kwargs)
    opt.load_state_dict(opt_state)
    sched.load_state_dict(sched_state)
    assert first + run(opt, sched, batches[5:]) == straight


def test_warns_like_torch_when_stepped_before_the_optimizer() -> None:
    opt = regoptim.ProxSGD(torch.nn.Linear(4, 3).parameters(), lr=0.1, l1=1e-3)
    sched = regoptim.schedule(opt, "l1", S.ExponentialLR, 0.9)
    with pytest.warns(UserWarning, match="before `optimizer.step"):
        sched.step()

    opt = regoptim.ProxSGD(torch.nn.Linear(4, 3).parameters(), lr=0.1, l1=1e-3)
    sched = regoptim.schedule(opt, "l1", S.ExponentialLR, 0.9)
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched.step()


def _opt() -> regoptim.ProxSGD:
    return regoptim.ProxSGD(torch.nn.Linear(4, 3).parameters(), lr=0.1, momentum=0.9, l1=1e-3)


@pytest.mark.parametrize(
    ("key", "error", "match"),
    [
        ("lr", ValueError, "'lr' is the learning rate"),
        ("initial_lr", ValueError, "'initial_lr' is the learning rate"),
        ("l2", ValueError, "no key 'l2'"),
        ("nesterov", TypeError, "'nesterov'\\] must be a number, got False"),
        ("foreach", TypeError, "'foreach'\\] must be a number, got None"),
        (3, TypeError, "key must be a param-group key"),
    ],
)
def test_bad_keys(key: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        regoptim.schedule(_opt(), key, S.ExponentialLR, 0.9)


def test_tensor_value_is_refused() -> None:
    opt = _opt()
    opt.param_groups[0]["l1"] = torch.tensor(1e-3)
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['l1'\] is a Tensor"):
        regoptim.schedule(opt, "l1", S.ExponentialLR, 0.9)


@pytest.mark.parametrize("cls", [S.OneCycleLR, S.CyclicLR])
def test_momentum_cycling_is_refused_and_momentum_left_alone(cls: type) -> None:
    opt = _opt()
    kwargs = {"max_lr": 1e-2, "total_steps": 10} if cls is S.OneCycleLR else {"base_lr": 1e-4}
    if cls is S.CyclicLR:
        kwargs["max_lr"] = 1e-2
    with pytest.raises(TypeError, match="cycle_momentum=False"):
        regoptim.schedule(opt, "l1", cls, **kwargs)
    assert opt.param_groups[0]["momentum"] == 0.9
    assert "base_momentum" not in opt.param_groups[0]


def test_other_misuse() -> None:
    with pytest.raises(TypeError, match="must be a torch.optim.Optimizer"):
        regoptim.schedule(object(), "l1", S.ExponentialLR, 0.9)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must build a torch.optim.lr_scheduler.LRScheduler"):
        regoptim.schedule(_opt(), "l1", lambda o: object())
    sched = regoptim.schedule(_opt(), "l1", S.ExponentialLR, 0.9)
    with pytest.raises(TypeError, match="metrics is for ReduceLROnPlateau"):
        sched.step(0.5)
    other = regoptim.schedule(_opt(), "weight_decay", S.ExponentialLR, 0.9)
    with pytest.raises(ValueError, match="on 'weight_decay', this one drives 'l1'"):
        sched.load_state_dict(other.state_dict())
    assert math.isclose(sched.get_last_values()[0], 1e-3)

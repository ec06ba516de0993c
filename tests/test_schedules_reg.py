"""regoptim.schedule (torch's LR schedulers on l1 / weight_decay) and regoptim.SparsityTarget.

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


# --- SparsityTarget ------------------------------------------------------------------------------


def test_count_zero_groups_on_hand_built_tensors() -> None:
    w = torch.arange(1.0, 13.0).reshape(4, 3)
    w[1] = 0.0
    w[3] = -0.0  # -0.0 is zero
    b = torch.tensor([1.0, 0.0, 0.0, 2.0])  # row 3's bias keeps group 3 alive
    assert regoptim.count_zero_groups([w]) == (2, 4)
    assert regoptim.count_zero_groups([w, b], [0, 0]) == (1, 4)
    assert regoptim.count_zero_groups([w, b]) == (1, 4)  # an int axis applies to every tensor
    v = torch.ones(2, 4)  # next layer: its columns are the same 4 units
    v[:, 1] = 0.0
    assert regoptim.count_zero_groups([w, v], [0, 1]) == (1, 4)
    v[0, 1] = 1e-30  # not exactly zero
    assert regoptim.count_zero_groups([w, v], [0, 1]) == (0, 4)
    assert regoptim.count_zero_groups([w.T.contiguous()], 1) == (2, 4)
    assert regoptim.count_zero_groups([w], -2) == (2, 4)
    assert regoptim.count_zero_groups([]) == (0, 0)
    with pytest.raises(ValueError, match=r"params\[1\] has 2 slices along axis 0, the earlier"):
        regoptim.count_zero_groups([w, v], 0)
    with pytest.raises(ValueError, match=r"axis 2 is out of range for params\[0\]"):
        regoptim.count_zero_groups([w], 2)
    with pytest.raises(ValueError, match="one int per tensor"):
        regoptim.count_zero_groups([w, b], [0])


def _mlp() -> torch.nn.Sequential:
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))


def test_measure_counts_exact_zeros_of_the_regularized_groups_only() -> None:
    model = _mlp()
    opt = regoptim.ProxSGD(regoptim.param_groups(model, l1=1e-3), lr=0.1)  # biases exempt
    target = regoptim.SparsityTarget(opt, 0.5, total_steps=10)
    assert target.measure() == 0.0
    with torch.no_grad():
        model[0].weight[:2] = 0.0  # 16 entries
        model[2].weight[0, :4] = -0.0  # 4 entries
        model[0].bias.zero_()  # exempt: not counted
        model[2].weight[1, 0] = 1e-30  # not a zero
    assert target.measure() == 20 / (48 + 18)


def test_measure_counts_zero_groups_for_group_l1() -> None:
    model = _mlp()
    groups = [
        {"params": [model[0].weight, model[0].bias], "group_l1": 1e-3},  # 6 rows: group axis 0
        {"params": [model[2].weight], "group_l1": 1e-3, "group_axes": [1]},  # 6 columns
        {"params": [model[2].bias], "group_l1": 0.0},  # not regularized
    ]
    target = regoptim.SparsityTarget(regoptim.ProxSGD(groups), 0.5, total_steps=10, key="group_l1")
    with torch.no_grad():
        model[0].weight[:3] = 0.0
        model[0].bias[:2] = 0.0  # rows 0 and 1 are zero groups, row 2 keeps its bias
        model[0].weight[4, 0] = 0.0  # a zero entry is not a zero group
        model[2].weight[:, 5] = 0.0
        model[2].bias.zero_()
    assert target.measure() == 3 / 12


def test_ramp_is_the_cubic_of_gradual_pruning() -> None:
    opt = regoptim.ProxSGD(regoptim.param_groups(_mlp(), l1=1e-3), lr=0.1)
    target = regoptim.SparsityTarget(opt, 0.8, total_steps=100, initial_sparsity=0.2)
    assert target.ramp(0) == pytest.approx(0.2, rel=1e-12)
    assert target.ramp(50) == pytest.approx(0.8 - 0.6 * 0.5**3, rel=1e-12)
    assert target.ramp(75) == pytest.approx(0.8 - 0.6 * 0.25**3, rel=1e-12)
    assert target.ramp(100) == target.ramp(1000) == 0.8


def test_controller_update_rule_bounds_and_every() -> None:
    model = _mlp()  # no zeros and no optimizer steps: measured stays 0
    opt = regoptim.ProxSGD(
        [
            {"params": [model[0].weight], "l1": 1e-3},
            {"params": [model[2].weight], "l1": 4e-3},
            {"params": [model[0].bias, model[2].bias], "l1": 0.0},
        ],
        lr=0.1,
    )
    target = regoptim.SparsityTarget(opt, 0.5, total_steps=10, gain=3.0, every=2)
    assert target.groups == [0, 1]
    target.step()  # step 1: no measurement, no change
    assert target.last_fraction is None and target.get_last_values() == [1e-3, 4e-3]
    target.step()  # step 2: measured 0.0, wanted ramp(2)
    factor = math.exp(3.0 * 2 * target.ramp(2))
    assert target.last_fraction == 0.0
    assert target.get_last_values() == [1e-3 * factor, 4e-3 * factor]
    assert opt.param_groups[2]["l1"] == 0.0  # the exempt group is left alone
    for _ in range(40):
        target.step()
    assert target.get_last_values() == [4e-3 * 1e4] * 2  # clamped at max_value

    opt.param_groups[0]["l1"] = opt.param_groups[1]["l1"] = 1e-3
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # too many zeros: the strength falls, down to min_value
    low = regoptim.SparsityTarget(opt, 0.5, total_steps=10, min_value=1e-5)
    low.step()
    assert low.get_last_values() == [1e-3 * math.exp(2.0 * (low.ramp(1) - 1.0))] * 2
    for _ in range(10):
        low.step()
    assert low.get_last_values() == [1e-5, 1e-5]


@pytest.fixture
def one_thread():
    """The training tests' models are tiny: one torch thread is faster, and steady on a busy box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x / 16.0, dtype=torch.float32), torch.tensor(y)


def _train(model: torch.nn.Module, opt: Any, target: Any, steps: range, seed: int = 0) -> list:
    x, y = _digits()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps.start):  # the same batches as an uninterrupted run
        torch.randint(0, len(x), (64,), generator=g)
    measured = []
    for _ in steps:
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        target.step()
        measured.append((target.last_fraction, target.get_last_values()))
    return measured


def test_digits_mlp_reaches_and_follows_the_target(one_thread: None) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    opt = regoptim.ProxSGD(regoptim.param_groups(model, l1=1e-3), lr=0.1, momentum=0.9)
    target = regoptim.SparsityTarget(opt, 0.8, total_steps=200)
    measured = _train(model, opt, target, range(300))
    weights = [p for p in model.parameters() if p.ndim > 1]
    final = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert abs(final - 0.8) < 0.03
    for t in (50, 100, 150, 200, 250, 300):  # the measured curve follows the ramp
        assert abs(measured[t - 1][0] - target.ramp(t)) < 0.1, t
    assert all(p.count_nonzero() == p.numel() for p in (model[0].bias, model[2].bias))


def test_state_dict_resume_gives_the_same_values(one_thread: None) -> None:
    def fresh() -> tuple[torch.nn.Module, Any, Any]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
        )
        opt = regoptim.ProxSGD(regoptim.param_groups(model, l1=1e-3), lr=0.1, momentum=0.9)
        return model, opt, regoptim.SparsityTarget(opt, 0.6, total_steps=30, every=3)

    model, opt, target = fresh()
    straight = _train(model, opt, target, range(40))

    model, opt, target = fresh()
    first = _train(model, opt, target, range(20))
    saved = (model.state_dict(), opt.state_dict(), target.state_dict())
    model, opt, target = fresh()
    model.load_state_dict(saved[0])
    opt.load_state_dict(saved[1])
    target.load_state_dict(saved[2])
    assert first + _train(model, opt, target, range(20, 40)) == straight
    assert straight[-1][1] != straight[0][1]  # the strength did move


def test_group_l1_steers_the_fraction_of_zero_groups(one_thread: None) -> None:
    """No optimizer implements group_l1 yet: the group soft-threshold is applied by hand."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    first, second = model[0], model[2]
    opt = regoptim.ProxSGD(
        [
            {"params": [first.weight, first.bias], "group_l1": 1e-3, "group_axes": [0, 0]},
            {"params": [second.weight, second.bias]},
        ],
        lr=0.1,
        momentum=0.9,
    )
    target = regoptim.SparsityTarget(opt, 0.5, total_steps=100, key="group_l1")

    class GroupProx:  # the optimizer step, then the rows' group soft-threshold
        def zero_grad(self) -> None:
            opt.zero_grad()

        def step(self) -> None:
            opt.step()
            group = opt.param_groups[0]
            with torch.no_grad():
                norms = torch.cat([first.weight, first.bias[:, None]], dim=1).norm(dim=1)
                scale = (1 - group["lr"] * group["group_l1"] / norms.clamp_min(1e-30)).clamp_min(0)
                first.weight.mul_(scale[:, None])
                first.bias.mul_(scale)

    measured = _train(model, GroupProx(), target, range(160))
    zero_rows, rows = regoptim.count_zero_groups([first.weight, first.bias])
    assert rows == 32 and abs(zero_rows / rows - 0.5) <= 0.1
    assert measured[-1][0] == zero_rows / rows
    assert "group_l1" not in opt.param_groups[1]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"target": 1.0}, ValueError, "target must be a fraction in \\(0, 1\\), got 1.0"),
        ({"target": 0}, ValueError, "target must be a fraction in \\(0, 1\\), got 0"),
        ({"total_steps": 0}, ValueError, "total_steps must be an int >= 1, got 0"),
        ({"initial_sparsity": 0.9}, ValueError, "initial_sparsity must be in \\[0, target"),
        ({"gain": 0.0}, ValueError, "gain must be a finite number > 0, got 0.0"),
        ({"every": 0}, ValueError, "every must be an int >= 1, got 0"),
        ({"key": "lr"}, ValueError, "key 'lr' is the learning rate"),
        ({"key": "weight_decay"}, ValueError, "no param group has weight_decay > 0"),
        ({"min_value": 1.0, "max_value": 0.5}, ValueError, "min_value=1.0, max_value=0.5"),
        ({"key": "nesterov"}, TypeError, "\\['nesterov'\\] must be a float, got False"),
    ],
)
def test_sparsity_target_bad_input(kwargs: dict, error: type, match: str) -> None:
    opt = regoptim.ProxSGD(regoptim.param_groups(_mlp(), l1=1e-3), lr=0.1)
    args = {"target": 0.5, "total_steps": 10} | kwargs
    with pytest.raises(error, match=match):
        regoptim.SparsityTarget(opt, **args)


def test_sparsity_target_other_misuse() -> None:
    model = _mlp()
    opt = regoptim.ProxSGD(regoptim.param_groups(model, l1=1e-3), lr=0.1)
    opt.param_groups[0]["l1"] = torch.tensor(1e-3)
    with pytest.raises(TypeError, match=r"\['l1'\] must be a float, got tensor"):
        regoptim.SparsityTarget(opt, 0.5, total_steps=10)
    opt = regoptim.ProxSGD([{"params": model[0].parameters(), "group_l1": 1e-3, "group_axes": [0]}])
    with pytest.raises(
        ValueError, match=r"group_axes must be an int or one int per parameter \(2\)"
    ):
        regoptim.SparsityTarget(opt, 0.5, total_steps=10, key="group_l1")
    opt = regoptim.ProxSGD(regoptim.param_groups(model, l1=1e-3), lr=0.1)
    other = regoptim.SparsityTarget(opt, 0.5, total_steps=10)
    opt.param_groups[0]["weight_decay"] = 1e-3
    target = regoptim.SparsityTarget(opt, 0.5, total_steps=10, key="weight_decay")
    with pytest.raises(ValueError, match="on 'l1', this one steers 'weight_decay'"):
        target.load_state_dict(other.state_dict())

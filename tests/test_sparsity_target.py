"""regoptim.SparsityTarget and regoptim.count_zero_groups.

The measurement is checked on hand-built tensors, the controller's rule on a model that does not
train, and the whole loop on scikit-learn's digits.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import regoptim


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
    assert target.get_last_values() == pytest.approx([1e-3 * factor, 4e-3 * factor], rel=1e-12)
    assert opt.param_groups[2]["l1"] == 0.0  # the exempt group is left alone
    for _ in range(40):
        target.step()
    assert target.get_last_values() == pytest.approx([4e-3 * 1e4] * 2, rel=1e-12)  # max_value

    opt.param_groups[0]["l1"] = opt.param_groups[1]["l1"] = 1e-3
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()  # too many zeros: the strength falls, down to min_value
    low = regoptim.SparsityTarget(opt, 0.5, total_steps=10, min_value=1e-5)
    low.step()
    expected = 1e-3 * math.exp(2.0 * (low.ramp(1) - 1.0))
    assert low.get_last_values() == pytest.approx([expected] * 2, rel=1e-12)
    for _ in range(10):
        low.step()
    assert low.get_last_values() == pytest.approx([1e-5, 1e-5], rel=1e-12)
    opt.param_groups[0]["l1"] = 0.0  # set by hand: the controller goes on from min_value
    low.step()
    assert opt.param_groups[0]["l1"] == pytest.approx(1e-5, rel=1e-12)


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
    """ProxSGD's group prox (rows of the first layer with their bias entries) under the target."""
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
    measured = _train(model, opt, target, range(160))
    zero_rows, rows = regoptim.count_zero_groups([first.weight, first.bias])
    assert rows == 32 and abs(zero_rows / rows - 0.5) <= 0.1
    assert measured[-1][0] == zero_rows / rows
    assert opt.param_groups[1]["group_l1"] == 0.0  # not steered


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
        ({"key": 3}, TypeError, "key must be a param-group key \\(a str\\), got 3"),
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
    opt = regoptim.ProxSGD([{"params": model[0].parameters(), "group_l1": 1e-3}])
    opt.param_groups[0]["group_axes"] = [0]  # set by hand after the optimizer checked it
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

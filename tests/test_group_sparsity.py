"""Structured sparsity in the workflow: ``sparsity(..., optimizer=)`` counts zero groups per param
group with group lasso, and ``plot_sparsity`` draws them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import regoptim


def _model_and_opt():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = regoptim.ProxSGD(
        [
            {"params": [model[0].weight, model[0].bias], "group_l1": 1e-3},  # 6 neurons
            {"params": [model[2].weight], "group_l1": 1e-3, "group_axes": [1]},  # 6 inputs
            {"params": [model[2].bias]},  # no group lasso: no row
        ],
        lr=0.1,
    )
    with torch.no_grad():
        model[0].weight[:2] = 0.0
        model[0].bias[:3] = 0.0  # neurons 0 and 1 are zero groups, neuron 2 keeps its weights
        model[2].weight[:, [1, 4, 5]] = 0.0
        model[2].weight[0, 0] = 0.0  # a zero entry, not a zero group
    return model, opt


def test_report_counts_zero_groups_per_param_group():
    model, opt = _model_and_opt()
    report = regoptim.sparsity(model, optimizer=opt)
    assert report.groups == (
        regoptim.GroupSparsityRow(0, ("0.weight", "0.bias"), 6, 2),
        regoptim.GroupSparsityRow(1, ("2.weight",), 6, 3),
    )
    assert report.groups[1].fraction == 0.5
    assert report.to_dict()["groups"][0] == {
        "index": 0,
        "params": ["0.weight", "0.bias"],
        "groups": 6,
        "zero_groups": 2,
        "fraction": 2 / 6,
    }
    lines = str(report).splitlines()
    assert lines[-3].split() == [
        "param",
        "group",
        "parameters",
        "groups",
        "zero",
        "groups",
        "zero",
        "%",
    ]
    assert lines[-2].split() == ["0", "0.weight,", "0.bias", "6", "2", "33.3%"]
    assert lines[-1].split() == ["1", "2.weight", "6", "3", "50.0%"]
    assert regoptim.sparsity(model).groups == ()  # without the optimizer: per tensor only
    # parameters not found in model_or_params are named by their place in the param groups
    other = regoptim.sparsity([model[2].bias], optimizer=opt)
    assert other.groups[0].params == ("param_groups[0][0]", "param_groups[0][1]")


def test_report_follows_training_with_group_lasso():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    opt = regoptim.ProxAdam(
        [{"params": [model[0].weight, model[0].bias], "group_l1": 0.05}], lr=0.05
    )
    x, y = torch.randn(64, 8), torch.randn(64, 3)
    for _ in range(30):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    (row,) = regoptim.sparsity(model, optimizer=opt).groups
    assert (row.zero_groups, row.groups) == regoptim.count_zero_groups(
        [model[0].weight, model[0].bias]
    )
    assert 0 < row.zero_groups < 16


def test_plot_sparsity_draws_zero_groups():
    pytest.importorskip("matplotlib")
    from regoptim.workflow.plots import plot_sparsity

    model, opt = _model_and_opt()
    fig = plot_sparsity(regoptim.sparsity(model, optimizer=opt), near=False)
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == [
        "0.weight", "0.bias", "2.weight", "2.bias",
        "groups: 0.weight, 0.bias", "groups: 2.weight", "total",
    ]  # fmt: skip
    widths = [round(p.get_width(), 6) for p in ax.patches]
    assert widths[4:6] == [round(100 * 2 / 6, 6), 50.0]

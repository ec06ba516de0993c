"""structured_groups: which channel sets become group-lasso groups, and which stay ungrouped."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regoptim
from regoptim.workflow.structure import UntraceableModelError, analyze, structured_groups


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.GELU(), nn.Linear(12, 3)
    )


class FunctionalMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(8, 16), nn.Linear(16, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.head(torch.tanh(F.relu(self.fc2(F.relu(self.fc1(x)))) * 2.0))


def cnn() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 5),
    )


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c1, self.b1 = nn.Conv2d(8, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        x = F.relu(x + y)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def ids(params) -> list[int]:
    return [id(p) for p in params]


def check_partition(model: nn.Module, groups: list[dict]) -> None:
    """Every trainable parameter sits in exactly one group."""
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())


def structured(groups: list[dict]) -> list[dict]:
    return [g for g in groups if "group_l1" in g]


X_FLAT, X_IMG = torch.randn(4, 8), torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("make", [mlp, FunctionalMLP], ids=["sequential", "custom-forward"])
def test_mlp_hidden_layers_grouped_output_layer_not(make):
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the output layer is left out silently: nothing to report
        groups = structured_groups(model, X_FLAT, group_l1=1e-3, l1=1e-4, weight_decay=5e-4)
    check_partition(model, groups)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    found = structured(groups)
    assert [ids(g["params"]) for g in found] == [
        ids([linears[0].weight, linears[0].bias]),
        ids([linears[1].weight, linears[1].bias]),
    ]
    for g in found:
        assert g["group_axes"] == [0, 0]
        assert (g["group_l1"], g["l1"], g["weight_decay"]) == (1e-3, 1e-4, 5e-4)
    # the output layer is placed by param_groups: weight regularized, bias exempt
    head = linears[-1]
    rest = [g for g in groups if "group_l1" not in g]
    assert [ids(g["params"]) for g in rest] == [ids([head.weight]), ids([head.bias])]
    assert (rest[0]["l1"], rest[0]["weight_decay"]) == (1e-4, 5e-4)
    assert (rest[1]["l1"], rest[1]["weight_decay"]) == (0.0, 0.0)


def test_cnn_group_spans_conv_and_following_batchnorm():
    model = cnn()
    groups = structured_groups(model, X_IMG, group_l1=1e-3)
    check_partition(model, groups)
    conv, bn = model[0], model[1]
    (group,) = structured(groups)
    assert ids(group["params"]) == ids([conv.weight, conv.bias, bn.weight, bn.bias])
    assert group["group_axes"] == [0, 0, 0, 0]


def test_residual_add_couples_producers_of_both_branches():
    model = Residual()
    groups = structured_groups(model, X_IMG, group_l1=1e-3)
    check_partition(model, groups)
    by_params = {frozenset(ids(g["params"])): g for g in structured(groups)}
    m = model
    coupled = [m.stem.weight, m.stem.bias, m.c2.weight, m.c2.bias]
    coupled += [m.bn0.weight, m.bn0.bias, m.b2.weight, m.b2.bias]
    inner = [m.c1.weight, m.c1.bias, m.b1.weight, m.b1.bias]
    assert set(by_params) == {frozenset(ids(coupled)), frozenset(ids(inner))}
    assert by_params[frozenset(ids(coupled))]["group_axes"] == [0] * 8


def test_zero_group_makes_channel_output_exactly_zero_in_train_mode():
    model = cnn().train()
    (group,) = structured(structured_groups(model, X_IMG, group_l1=1e-3))
    with torch.no_grad():
        for p, axis in zip(group["params"], group["group_axes"], strict=True):
            p.select(axis, 5).zero_()
    hidden = model[:3](X_IMG)
    assert torch.equal(hidden[:, 5], torch.zeros_like(hidden[:, 5]))
    assert hidden[:, 4].abs().sum() > 0


@pytest.mark.parametrize(
    "norm, x",
    [(nn.LayerNorm(16), X_FLAT), (nn.GroupNorm(4, 16), torch.randn(2, 8, 5))],
    ids=["layernorm", "groupnorm"],
)
def test_features_under_layernorm_or_groupnorm_stay_ungrouped_and_are_reported(norm, x):
    first = nn.Linear(8, 16) if isinstance(norm, nn.LayerNorm) else nn.Conv1d(8, 16, 1)
    tail = [nn.Flatten(), nn.Linear(16 * 5, 3)] if isinstance(norm, nn.GroupNorm) else []
    model = nn.Sequential(first, norm, nn.ReLU(), *(tail or [nn.Linear(16, 3)]))
    with pytest.warns(UserWarning, match=r"'0'.*normalised by module '1'.*mixes"):
        groups = structured_groups(model, x, group_l1=1e-3)
    check_partition(model, groups)
    assert structured(groups) == []
    exempt = [g for g in groups if g["weight_decay"] == 0.0 and g["l1"] == 0.0][-1]
    assert {id(norm.weight), id(norm.bias), id(first.bias)} <= set(ids(exempt["params"]))


def test_output_layer_never_grouped_even_behind_an_activation_or_in_a_tuple():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 2), nn.Linear(16, 3)

        def forward(self, x):
            h = F.relu(self.body(x))
            return self.a(h), torch.sigmoid(self.b(h))

    model = TwoHeads()
    (group,) = structured(structured_groups(model, X_FLAT, group_l1=1e-3))
    assert ids(group["params"]) == ids([model.body.weight, model.body.bias])
    seq = nn.Sequential(nn.Linear(8, 4), nn.ReLU())
    assert structured(structured_groups(seq, X_FLAT, group_l1=1e-3)) == []


@pytest.mark.parametrize(
    "case, reason",
    [
        ("cat", r"'a': used by call_function cat"),
        ("add-input", r"'a': combined by call_function add with a tensor that no prunable"),
        ("called-twice", r"'mid': produced by module 'mid' \(Linear\), which is called more"),
    ],
)
def test_unsupported_uses_leave_the_set_ungrouped_with_a_warning(case, reason):
    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(16, 2)
            self.mid = nn.Linear(8, 8)

        def forward(self, x):
            if case == "cat":
                return self.head(torch.cat([self.a(x), self.b(x)], 1))
            if case == "add-input":
                return self.head(torch.cat([self.a(x) + x, x], 1))
            return self.head(torch.cat([self.mid(F.relu(self.mid(x))), x], 1))

    with pytest.warns(UserWarning, match=reason):
        groups = structured_groups(Model(), X_FLAT, group_l1=1e-3)
    assert structured(groups) == []


def test_exclude_leaves_the_whole_set_ungrouped():
    model = mlp()
    groups = structured_groups(model, X_FLAT, group_l1=1e-3, exclude=["0.bias"])
    check_partition(model, groups)
    assert [ids(g["params"]) for g in structured(groups)] == [ids([model[2].weight, model[2].bias])]
    with pytest.raises(ValueError, match="exclude entries match no parameter"):
        structured_groups(model, X_FLAT, group_l1=1e-3, exclude=["nope"])


def test_frozen_parameters_leave_the_set_ungrouped():
    model = mlp()
    model[0].bias.requires_grad_(False)
    groups = structured_groups(model, X_FLAT, group_l1=1e-3)
    assert [ids(g["params"]) for g in structured(groups)] == [ids([model[2].weight, model[2].bias])]


def test_torch_optim_accepts_the_groups_and_keeps_the_keys():
    model = cnn()
    groups = structured_groups(model, X_IMG, group_l1=1e-3)
    opt = torch.optim.SGD(groups, lr=0.1)
    model(X_IMG).sum().backward()
    opt.step()
    assert opt.param_groups[0]["group_axes"] == [0, 0, 0, 0]
    assert opt.state_dict()["param_groups"][0]["group_l1"] == 1e-3


def test_model_is_not_run_and_not_changed():
    model = cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    structured_groups(model, X_IMG, group_l1=1e-3)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN stats untouched
    assert model.training


class Gate(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: fx cannot trace it
            return x
        return -x


def test_untraceable_model_error_names_the_module():
    model = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.ReLU(), Gate()), nn.Linear(8, 2))
    with pytest.raises(UntraceableModelError, match=r"module '1\.1' \(Gate\)"):
        structured_groups(model, X_FLAT, group_l1=1e-3)
    with pytest.raises(UntraceableModelError, match=r"forward of Gate itself"):
        analyze(Gate(), X_FLAT)
    assert regoptim.UntraceableModelError is UntraceableModelError


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="group_l1"):
        structured_groups(mlp(), X_FLAT, group_l1=-1.0)
    with pytest.raises(TypeError, match="group_l1"):
        structured_groups(mlp(), X_FLAT, group_l1=None)
    with pytest.raises(TypeError, match="example_inputs"):
        structured_groups(mlp(), "x", group_l1=1e-3)
    with pytest.raises(TypeError, match="nn.Module"):
        structured_groups("model", X_FLAT, group_l1=1e-3)


@pytest.mark.parametrize("start_dim, grouped", [(1, True), (0, False)], ids=["dim1", "dim0"])
def test_flatten_must_keep_the_batch_dimension(start_dim, grouped):
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Flatten(start_dim), nn.Linear(6 * 4, 2))
    if start_dim == 1:
        model[3] = nn.Linear(6, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        groups = structured_groups(model, X_FLAT, group_l1=1e-3)
    assert bool(structured(groups)) == grouped
    assert any("reshaped by module '2' (Flatten)" in str(w.message) for w in caught) != grouped

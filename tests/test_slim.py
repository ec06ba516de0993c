"""slim: zero (or constant) channel groups physically removed, outputs unchanged in eval mode."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import regoptim
from regoptim.workflow.structure import SlimReport, UntraceableModelError, slim, structured_groups
from tests.test_structure import FunctionalMLP, Gate, Residual, cnn, mlp
from tests.tolerances import assert_close_normwise

X_FLAT, X_IMG = torch.randn(16, 8), torch.randn(4, 3, 8, 8)


def zero_channels(module: nn.Module, channels: list[int], bias: float = 0.0) -> None:
    """Zero the weight rows of ``channels``; set their bias entries to ``bias``."""
    with torch.no_grad():
        module.weight[channels] = 0.0
        if module.bias is not None:
            module.bias[channels] = bias


def randomize_bn(bn: nn.BatchNorm2d) -> None:
    with torch.no_grad():
        bn.running_mean.uniform_(-1.0, 1.0)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def assert_same_outputs(original: nn.Module, slimmed: nn.Module, x: torch.Tensor) -> None:
    """Equal outputs in eval mode, to float32 rounding. Slimming changes the inner size of the
    products that follow, so BLAS sums the remaining terms in another order: that rounding scales
    with the largest terms, not with each output, hence a norm-wise comparison."""
    original.eval(), slimmed.eval()
    with torch.no_grad():
        assert_close_normwise(slimmed(x), original(x), torch.float32)


def test_mlp_zero_neurons_removed_with_their_columns():
    model = mlp()
    zero_channels(model[0], [0, 3, 5, 9])
    zero_channels(model[2], [1, 2])
    slimmed, report = slim(model, X_FLAT, report=True)
    assert (slimmed[0].out_features, slimmed[2].in_features) == (12, 12)
    assert (slimmed[2].out_features, slimmed[4].in_features) == (10, 10)
    assert slimmed[0].weight.shape == (12, 8) and slimmed[2].weight.shape == (10, 12)
    assert n_params(model) - n_params(slimmed) == 4 * (8 + 1) + 4 * 12 + 2 * (12 + 1) + 2 * 3
    assert [(r.layer, r.before, r.after) for r in report.rows] == [
        ("0", 16, 12),
        ("2", 12, 10),
        ("4", 3, 3),
    ]
    assert (report.params_before, report.params_after) == (n_params(model), n_params(slimmed))
    assert_same_outputs(model, slimmed, X_FLAT)


def test_original_model_untouched_and_training_flags_kept():
    model = cnn().train()
    randomize_bn(model[1])
    zero_channels(model[0], [1, 2])
    zero_channels(model[1], [1, 2])
    before = copy.deepcopy(model.state_dict())
    slimmed = slim(model, X_IMG)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model[0].out_channels == 8 and model.training
    assert slimmed.training and slimmed[1].training and slimmed[0].out_channels == 6


def test_cnn_conv_bn_relu_maxpool_flatten_linear():
    model = cnn()
    randomize_bn(model[1])
    zero_channels(model[0], [0, 6])
    zero_channels(model[1], [0, 6])  # the coupled group: conv filter, bias, BN gamma and beta
    slimmed = slim(model, X_IMG)
    conv, bn, fc = slimmed[0], slimmed[1], slimmed[5]
    assert conv.weight.shape == (6, 3, 3, 3) and bn.num_features == 6
    keep = [1, 2, 3, 4, 5, 7]
    assert torch.equal(bn.running_mean, model[1].running_mean[keep])
    assert torch.equal(bn.running_var, model[1].running_var[keep])
    # Flatten -> Linear: each removed channel takes its 4*4 block of columns
    columns = [c * 16 + j for c in keep for j in range(16)]
    assert torch.equal(fc.weight, model[5].weight[:, columns])
    assert_same_outputs(model, slimmed, X_IMG)


@pytest.mark.parametrize(
    "act", [nn.ReLU(), nn.Sigmoid(), nn.GELU(), nn.Tanh()], ids=lambda a: type(a).__name__
)
def test_constant_nonzero_channel_folded_into_linear_bias(act):
    model = nn.Sequential(nn.Linear(8, 16), act, nn.Linear(16, 4))
    zero_channels(model[0], [2, 7], bias=0.75)  # act(0.75) != 0: a constant, not a zero
    slimmed = slim(model, X_FLAT)
    assert slimmed[0].out_features == 14 and slimmed[2].in_features == 14
    assert not torch.equal(slimmed[2].bias, model[2].bias)  # the constant went into the bias
    assert_same_outputs(model, slimmed, X_FLAT)


def test_sigmoid_of_a_zero_group_is_folded():
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 4, bias=False))
    zero_channels(model[0], [4])  # sigmoid(0) = 0.5 reaches the next layer
    slimmed = slim(model, X_FLAT)
    assert slimmed[0].out_features == 15 and slimmed[2].bias is not None
    assert_same_outputs(model, slimmed, X_FLAT)


def conv_chain(padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=padding),
    )


@pytest.mark.parametrize("padding, kept", [(0, 4), (1, 6)], ids=["no-padding", "zero-padding"])
@pytest.mark.parametrize("how", ["bias", "bn-beta"])
def test_padding_rule_for_constant_channels(padding, kept, how):
    model = conv_chain(padding)
    randomize_bn(model[1])
    if how == "bias":
        zero_channels(model[0], [1, 4], bias=0.5)  # conv output 0.5, BN -> a constant
    else:
        with torch.no_grad():
            model[1].weight[[1, 4]] = 0.0  # gamma 0, beta != 0: BN outputs beta
            model[1].bias[[1, 4]] = torch.tensor([0.3, 0.8])
    slimmed, report = slim(model, X_IMG, report=True)
    assert slimmed[0].out_channels == kept and slimmed[3].in_channels == kept
    assert ("padded conv" in str(report)) == (padding == 1)
    assert_same_outputs(model, slimmed, X_IMG)


def test_zero_channel_removed_even_before_a_padded_conv():
    model = conv_chain(padding=1)
    randomize_bn(model[1])
    zero_channels(model[0], [0])
    with torch.no_grad():
        model[1].weight[0], model[1].bias[0] = 0.0, 0.0
    slimmed = slim(model, X_IMG)
    assert slimmed[0].out_channels == 5
    assert_same_outputs(model, slimmed, X_IMG)


def test_constant_channel_through_padded_average_pool_is_kept():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.AvgPool2d(3, stride=1, padding=1), nn.Flatten(), nn.Linear(256, 2)
    )
    zero_channels(model[0], [1], bias=1.0)  # borders average in the padding: not constant
    zero_channels(model[0], [2])  # zero stays zero
    slimmed, report = slim(model, X_IMG, report=True)
    assert slimmed[0].out_channels == 3 and slimmed[3].in_features == 3 * 64
    assert "channel 1: not constant" in str(report)
    assert_same_outputs(model, slimmed, X_IMG)


def residual_with_stats() -> Residual:
    model = Residual()
    for bn in (model.bn0, model.b1, model.b2):
        randomize_bn(bn)
    return model


def test_residual_channel_removed_only_when_zero_in_both_branches():
    model = residual_with_stats()
    for module in (model.stem, model.bn0, model.c2, model.b2):
        zero_channels(module, [2, 5])
    zero_channels(model.stem, [7])  # zero in one branch only: the sum is not constant
    zero_channels(model.bn0, [7])
    slimmed = slim(model, X_IMG)
    assert slimmed.stem.out_channels == slimmed.c2.out_channels == 6
    assert slimmed.c1.in_channels == 6 and slimmed.fc.in_features == 6
    assert slimmed.b2.num_features == slimmed.bn0.num_features == 6
    assert_same_outputs(model, slimmed, X_IMG)


def test_layernorm_features_left_alone():
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 3))
    zero_channels(model[0], [0, 1, 2])
    slimmed, report = slim(model, X_FLAT, report=True)
    assert slimmed[0].out_features == 16
    assert "untouched: normalised by module '1' (LayerNorm)" in str(report)
    assert_same_outputs(model, slimmed, X_FLAT)


def test_all_channels_zero_keeps_one():
    model = mlp()
    zero_channels(model[2], list(range(12)), bias=0.2)
    slimmed = slim(model, X_FLAT)
    assert slimmed[2].out_features == 1 and slimmed[4].in_features == 1
    assert_same_outputs(model, slimmed, X_FLAT)


def test_untraceable_model_error_names_the_module():
    model = nn.Sequential(nn.Linear(8, 8), Gate(), nn.Linear(8, 2))
    with pytest.raises(UntraceableModelError, match=r"module '1' \(Gate\)"):
        slim(model, X_FLAT)


def test_report_table_is_readable():
    model = mlp()
    zero_channels(model[0], [0, 1])
    _, report = slim(model, X_FLAT, report=True)
    assert isinstance(report, SlimReport) and report.rows[0].removed == 2
    lines = str(report).splitlines()
    assert lines[0].split() == ["layer", "type", "before", "kept", "removed"]
    assert lines[1].split() == ["0", "Linear", "16", "14", "2"]
    assert lines[-1].startswith(f"parameters: {n_params(model):,} -> ")


def random_model(seed: int) -> tuple[nn.Module, torch.Tensor]:
    """A random CNN or MLP with random channel groups zeroed by hand (some folded, some kept)."""
    g = torch.Generator().manual_seed(seed)

    def pick(n: int) -> list[int]:
        return torch.randperm(n, generator=g)[
            : int(torch.randint(0, n, (1,), generator=g))
        ].tolist()

    if seed % 2:
        widths = [8] + torch.randint(4, 20, (3,), generator=g).tolist()
        acts = [nn.ReLU, nn.SiLU, nn.Sigmoid, nn.LeakyReLU]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
            layers += [nn.Linear(a, b), acts[(seed + i) % 4]()]
        model = nn.Sequential(*layers, nn.Linear(widths[-1], 3))
        for layer in model[:-1:2]:
            zero_channels(layer, pick(layer.out_features), bias=float(seed % 3) * 0.3)
        return model, X_FLAT
    c1, c2 = torch.randint(3, 10, (2,), generator=g).tolist()
    model = nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1),
        nn.BatchNorm2d(c1),
        nn.GELU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 1),
        nn.BatchNorm2d(c2),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Linear(c2 * 16, 3),
    )
    for conv, bn in ((model[0], model[1]), (model[4], model[5])):
        randomize_bn(bn)
        zero_channels(conv, pick(conv.out_channels), bias=0.1 * (seed % 3))
        with torch.no_grad():
            bn.weight[pick(bn.num_features)] = 0.0
    return model, X_IMG


@pytest.mark.parametrize("seed", range(8))
def test_random_models_outputs_unchanged(seed):
    model, x = random_model(seed)
    slimmed = slim(model, x)
    assert n_params(slimmed) <= n_params(model)
    assert_same_outputs(model, slimmed, x)
    assert_same_outputs(model, slimmed, torch.randn_like(x))  # not just the example inputs


def test_groups_and_slim_agree_on_what_is_removable():
    model = residual_with_stats()
    for group in structured_groups(model, X_IMG, group_l1=1e-3):
        if "group_l1" in group:
            with torch.no_grad():
                for p, axis in zip(group["params"], group["group_axes"], strict=True):
                    p.select(axis, 1).zero_()
    slimmed = slim(model, X_IMG)
    assert (slimmed.stem.out_channels, slimmed.c1.out_channels) == (7, 5)
    assert_same_outputs(model, slimmed, X_IMG)


def test_trained_mlp_on_digits_with_group_soft_threshold():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)
    )
    groups = structured_groups(model, x[:8], group_l1=5e-2)
    opt = torch.optim.SGD(groups, lr=0.2, momentum=0.9)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        with torch.no_grad():  # the group-lasso prox, by hand: shrink each row's joint norm
            for group in opt.param_groups:
                if "group_l1" not in group:
                    continue
                rows = torch.cat([p.reshape(p.shape[0], -1) for p in group["params"]], 1)
                scale = (1 - group["lr"] * group["group_l1"] / rows.norm(dim=1)).clamp(min=0)
                for p in group["params"]:
                    p.mul_(scale.view(-1, *[1] * (p.ndim - 1)))
    slimmed, report = slim(model, x, report=True)
    assert slimmed[0].out_features <= 64 - 15 and slimmed[2].out_features <= 32 - 5
    assert report.params_after < report.params_before
    assert_same_outputs(model, slimmed, x)
    with torch.no_grad():
        assert torch.equal(slimmed(x).argmax(1), model(x).argmax(1))
        assert (model(x).argmax(1) == y).float().mean() > 0.9


def test_exported_from_the_package():
    assert regoptim.slim is slim and regoptim.structured_groups is structured_groups
    assert regoptim.SlimReport is SlimReport


def test_readme_snippet_runs_and_prints_the_table_shown(capsys):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### From zero groups to a smaller model", 1)[1]
    code, shown = re.findall(r"```(?:python)?\n(.*?)```", section, re.S)[:2]
    exec(compile(code, "README.md", "exec"), {})
    assert capsys.readouterr().out.strip() == shown.strip()


class ViewCNN(nn.Module):
    def __init__(self, hard_coded: bool) -> None:
        super().__init__()
        self.hard_coded = hard_coded
        self.conv, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Linear(6 * 4 * 4, 2)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        # view(N, -1) keeps working when channels go; view(-1, 96) would break, so it blocks
        return self.fc(x.view(-1, 6 * 4 * 4) if self.hard_coded else x.view(x.size(0), -1))


@pytest.mark.parametrize("hard_coded, kept", [(False, 4), (True, 6)], ids=["view-N--1", "view-96"])
def test_view_as_flatten_only_when_the_channel_count_is_not_hard_coded(hard_coded, kept):
    model = ViewCNN(hard_coded)
    zero_channels(model.conv, [0, 3])
    slimmed, report = slim(model, X_IMG, report=True)
    assert slimmed.conv.out_channels == kept and slimmed.fc.in_features == kept * 16
    assert ("used by call_method view" in str(report)) == hard_coded
    assert_same_outputs(model, slimmed, X_IMG)


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock style: in-place ReLU and ``out += identity``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv1, self.bn1 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        identity = self.relu(self.bn0(self.stem(x)))
        out = self.relu(self.bn1(self.conv1(identity)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.head(self.relu(out))


def test_resnet_style_block_with_inplace_add_and_relu():
    model = BasicBlock()
    for bn in (model.bn0, model.bn1, model.bn2):
        randomize_bn(bn)
    with torch.no_grad():  # gamma = beta = 0 in both branches: the sum's channel 3 is zero
        for bn in (model.bn0, model.bn2):
            bn.weight[3], bn.bias[3] = 0.0, 0.0
        model.bn1.weight[[0, 5]], model.bn1.bias[[0, 5]] = 0.0, 0.0
    slimmed = slim(model, X_IMG)
    assert slimmed.stem.out_channels == slimmed.conv2.out_channels == 7
    assert slimmed.conv1.out_channels == slimmed.conv2.in_channels == 6
    assert slimmed.head[2].in_features == 7
    assert_same_outputs(model, slimmed, X_IMG)


def test_custom_forward_mlp_with_scalar_ops_folds_through_them():
    model = FunctionalMLP()  # head(tanh(relu(fc2(relu(fc1(x)))) * 2))
    zero_channels(model.fc1, [0, 4], bias=0.6)
    zero_channels(model.fc2, [1, 2, 3], bias=-0.4)
    slimmed = slim(model, X_FLAT)
    assert (slimmed.fc1.out_features, slimmed.fc2.out_features) == (14, 9)
    assert (slimmed.fc2.in_features, slimmed.head.in_features) == (14, 9)
    assert_same_outputs(model, slimmed, X_FLAT)


def test_a_wrong_edit_is_caught_by_the_output_check(monkeypatch):
    import importlib

    # the module, not the function of the same name
    slim_module = importlib.import_module("regoptim.workflow.structure.slim")
    monkeypatch.setattr(slim_module, "_fold", lambda *args: None)  # forget the constants
    model = mlp()
    zero_channels(model[0], [1], bias=1.0)
    with pytest.raises(RuntimeError, match="does not reproduce the original's outputs"):
        slim(model, X_FLAT)


def test_batchnorm_without_affine_sliced_and_its_constant_folded():
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6, affine=False), nn.ReLU(), nn.Conv2d(6, 4, 3)
    )
    with torch.no_grad():
        model[1].running_mean.uniform_(-1.0, 0.0)
        model[1].running_var.uniform_(0.5, 2.0)
    zero_channels(model[0], [2, 3], bias=0.5)  # (0.5 - mean) / std > 0 survives the ReLU
    slimmed = slim(model, X_IMG)
    assert slimmed[0].out_channels == slimmed[1].num_features == slimmed[3].in_channels == 4
    assert slimmed[1].running_mean.shape == (4,)
    assert_same_outputs(model, slimmed, X_IMG)

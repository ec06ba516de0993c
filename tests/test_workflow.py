"""param_groups, l1_penalty/l2_penalty, sparsity and the plots, against hand-computed values."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch import nn

from regoptim.workflow.groups import param_groups
from regoptim.workflow.penalties import l1_penalty, l2_penalty
from regoptim.workflow.sparsity import SparsityReport, sparsity

# ------------------------------------------------------------------------------------ models


class Net(nn.Module):
    """Linear, Conv2d, BatchNorm, LayerNorm and Embedding, plus a timm-style exemption."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)
        self.fc = nn.Linear(4, 3)
        self.ln = nn.LayerNorm(3)
        self.head = nn.Linear(3, 2, bias=False)
        self.pos = nn.Parameter(torch.zeros(1, 5, 4))
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def no_weight_decay(self) -> set[str]:
        return {"pos", "not_a_parameter"}  # timm ignores names that match nothing, so do we


def _names(model: nn.Module, group: dict) -> set[str]:
    ids = {id(p) for p in group["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_param_groups_default_split():
    net = Net()
    groups = param_groups(net, weight_decay=0.1, l1=0.01)
    assert len(groups) == 2
    reg, ex = groups
    assert _names(net, reg) == {"conv.weight", "fc.weight", "head.weight"}
    assert _names(net, ex) == {
        "embed.weight",
        "conv.bias",
        "bn.weight",
        "bn.bias",
        "fc.bias",
        "ln.weight",
        "ln.bias",
        "pos",
    }
    assert reg["weight_decay"] == 0.1 and reg["l1"] == 0.01
    assert ex["weight_decay"] == 0.0 and ex["l1"] == 0.0
    # frozen parameters are left out; nothing appears twice
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids)) == sum(p.requires_grad for p in net.parameters())


def test_param_groups_options():
    net = Net()
    reg, ex = param_groups(net, exempt_embeddings=False, exempt_1d=False, exclude=["head.*"])
    # 1-D norm weights now regularized, biases still exempt, embedding regularized
    assert _names(net, reg) == {
        "embed.weight",
        "conv.weight",
        "fc.weight",
        "bn.weight",
        "ln.weight",
    }
    assert "head.weight" in _names(net, ex) and "fc.bias" in _names(net, ex)
    # None leaves the key out so the optimizer default applies; the exempt group is explicit
    assert "weight_decay" not in reg and "l1" not in reg
    assert ex["weight_decay"] == 0.0 and ex["l1"] == 0.0


def test_param_groups_no_weight_decay_on_submodule():
    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.ones(3, 3))
            self.lin = nn.Linear(3, 3)

        def no_weight_decay(self) -> set[str]:
            return {"table"}

    outer = nn.Sequential(Inner())
    reg, ex = param_groups(outer)
    assert _names(outer, reg) == {"0.lin.weight"}
    assert _names(outer, ex) == {"0.table", "0.lin.bias"}


def test_param_groups_attention_biases():
    mha = nn.MultiheadAttention(4, 2)
    reg, ex = param_groups(mha, exempt_1d=False)
    assert _names(mha, reg) == {"in_proj_weight", "out_proj.weight"}
    assert _names(mha, ex) == {"in_proj_bias", "out_proj.bias"}


def test_param_groups_drops_empty_group():
    groups = param_groups(nn.LayerNorm(4), weight_decay=0.1)
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"weight_decay": -1.0}, ValueError, "weight_decay"),
        ({"l1": float("nan")}, ValueError, "l1"),
        ({"l1": float("inf")}, ValueError, "l1"),
        ({"l1": "0.1"}, TypeError, "l1"),
        ({"exclude": ["nope.weight"]}, ValueError, "exclude"),
        ({"exclude": [3]}, TypeError, "exclude"),
    ],
)
def test_param_groups_bad_input(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        param_groups(Net(), **kwargs)


def test_param_groups_bad_model():
    with pytest.raises(TypeError, match="model"):
        param_groups([torch.zeros(2, requires_grad=True)])  # type: ignore[arg-type]
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        param_groups(frozen)


def test_param_groups_accepted_by_torch_optimizers():
    for make in (
        lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9),
        lambda g: torch.optim.Adam(g, lr=0.1),
        lambda g: torch.optim.AdamW(g, lr=0.1),
    ):
        net = Net()
        opt = make(param_groups(net, weight_decay=0.5, l1=0.1))
        # torch keeps the unknown key (and ignores it)
        assert opt.param_groups[0]["l1"] == 0.1 and opt.param_groups[1]["l1"] == 0.0
        net.fc(torch.randn(2, 4)).sum().backward()
        opt.step()
        state = opt.state_dict()
        clone = make(param_groups(Net(), weight_decay=0.5, l1=0.1))
        clone.load_state_dict(state)
        assert clone.param_groups[0]["weight_decay"] == 0.5


def test_param_groups_accepted_by_regoptim_optimizers():
    from regoptim import ProxAdam, ProxAdamW, ProxSGD

    for cls in (ProxSGD, ProxAdam, ProxAdamW):
        net = Net()
        # an optimizer-level l1 default must not leak into the exempt group
        opt = cls(param_groups(net, weight_decay=0.01), lr=0.1, l1=0.05)
        assert opt.param_groups[0]["l1"] == 0.05 and opt.param_groups[1]["l1"] == 0.0
        assert opt.param_groups[1]["weight_decay"] == 0.0
        net.fc(torch.randn(2, 4)).sum().backward()
        opt.step()


# ------------------------------------------------------------------------------------ penalties


def test_penalties_hand_computed():
    a = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    b = torch.tensor([-0.5, 0.25], dtype=torch.float64)
    assert l1_penalty([a, b]).item() == pytest.approx(1 + 2 + 0 + 3 + 0.5 + 0.25)
    assert l2_penalty([a, b]).item() == pytest.approx(0.5 * (1 + 4 + 9 + 0.25 + 0.0625))
    # mixed dtypes: the common dtype, at least float32
    assert l1_penalty([a, b]).dtype == torch.float64
    assert l1_penalty(torch.ones(3, dtype=torch.bfloat16)).dtype == torch.float32
    # complex entries count by modulus
    c = torch.tensor([3 + 4j, 0j])
    assert l1_penalty(c).item() == pytest.approx(5.0)
    assert l2_penalty(c).item() == pytest.approx(12.5)
    # modules, empty input
    lin = nn.Linear(2, 1)
    expected = sum(p.abs().sum() for p in lin.parameters())
    assert torch.allclose(l1_penalty(lin), expected)
    assert l1_penalty([]).item() == 0.0 and l2_penalty([torch.zeros(0)]).item() == 0.0


def test_penalty_gradients():
    w = torch.tensor([[1.5, -2.0, 0.0], [0.3, 0.0, -0.1]], requires_grad=True)
    v = torch.tensor([-4.0, 0.5], dtype=torch.float64, requires_grad=True)
    l1_penalty([w, v]).backward()
    assert torch.equal(w.grad, torch.sign(w.detach()))  # and exactly 0 at w == 0
    assert torch.equal(v.grad, torch.sign(v.detach()))
    w.grad = v.grad = None
    l2_penalty([w, v]).backward()
    torch.testing.assert_close(w.grad, w.detach())
    torch.testing.assert_close(v.grad, v.detach())
    # an all-zero tensor: gradient 0, not NaN
    z = torch.zeros(3, requires_grad=True)
    l2_penalty(z).backward()
    assert torch.equal(z.grad, torch.zeros(3))


def test_penalties_bad_input():
    with pytest.raises(TypeError, match="l1_penalty"):
        l1_penalty(3.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="group"):
        l2_penalty({"params": []})  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="floating"):
        l1_penalty([torch.ones(2, dtype=torch.int64)])


def _train(model, opt, penalty_wd: float, steps: int = 6):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
        loss = model(x).square().mean()
        if penalty_wd:
            loss = loss + penalty_wd * l2_penalty(model.parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_l2_penalty_equals_coupled_weight_decay(momentum):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    wd = 0.1
    a, b, c = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    _train(a, torch.optim.SGD(a.parameters(), lr=0.1, momentum=momentum, weight_decay=wd), 0.0)
    _train(b, torch.optim.SGD(b.parameters(), lr=0.1, momentum=momentum), wd)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-12)
    # the pitfall: both at once is weight decay 2 * wd
    _train(c, torch.optim.SGD(c.parameters(), lr=0.1, momentum=momentum, weight_decay=wd), wd)
    d = copy.deepcopy(base)
    _train(d, torch.optim.SGD(d.parameters(), lr=0.1, momentum=momentum, weight_decay=2 * wd), 0)
    for pc, pd in zip(c.parameters(), d.parameters(), strict=True):
        torch.testing.assert_close(pc, pd, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(next(a.parameters()), next(c.parameters()))


# ------------------------------------------------------------------------------------ sparsity


def test_sparsity_counts_and_fields():
    a = torch.tensor([[0.0, -0.0, 1e-4], [2.0, -5e-4, float("nan")]])
    b = torch.tensor([0.0, 1.0, -1e-2, 0.0])
    rep = sparsity([("a", a), ("b", b)], atol=1e-3)
    assert isinstance(rep, SparsityReport)
    assert (rep["a"].zeros, rep["a"].near_zeros, rep["a"].numel) == (2, 4, 6)
    assert (rep["b"].zeros, rep["b"].near_zeros) == (2, 2)
    assert (rep.zeros, rep.near_zeros, rep.numel) == (4, 6, 10)
    assert rep.fraction == pytest.approx(0.4) and rep.near_fraction == pytest.approx(0.6)
    assert rep["a"].shape == (2, 3) and rep["a"].fraction == pytest.approx(1 / 3)
    assert [r.name for r in rep] == ["a", "b"] and len(rep) == 2
    with pytest.raises(KeyError):
        rep["c"]
    assert sparsity(a, atol=0).near_zeros == 2
    d = rep.to_dict()
    assert d["zeros"] == 4 and d["params"][1]["name"] == "b"


def test_sparsity_inputs():
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight[0] = 0.0
    assert sparsity(lin)["weight"].zeros == 3
    # a state_dict, with an integer buffer that is skipped
    bn = nn.BatchNorm1d(3)
    sd = bn.state_dict()
    rep = sparsity(sd)
    assert "num_batches_tracked" not in [r.name for r in rep]
    assert rep["running_mean"].zeros == 3
    # plain tensors are numbered
    assert [r.name for r in sparsity([torch.zeros(2), torch.ones(2)])] == ["0", "1"]
    assert sparsity([]).fraction == 0.0
    with pytest.raises(ValueError, match="atol"):
        sparsity(lin, atol=-1.0)
    with pytest.raises(TypeError, match="model_or_params"):
        sparsity(3)  # type: ignore[arg-type]


def test_sparsity_prints_well():
    rep = sparsity([("fc1.weight", torch.tensor([[0.0, 1.0], [0.0, 0.0]]))], atol=1e-3)
    text = str(rep)
    lines = text.splitlines()
    assert lines[0].split()[:3] == ["parameter", "shape", "numel"]
    assert "|w|<=0.001" in lines[0]
    assert lines[1].split() == ["fc1.weight", "(2,", "2)", "4", "3", "75.0%", "3", "75.0%"]
    assert lines[-1].split() == ["total", "4", "3", "75.0%", "3", "75.0%"]
    assert repr(rep) == (
        "SparsityReport(tensors=1, numel=4, zeros=3 (75.0%), near_zeros=3 (75.0%), atol=0.001)"
    )


# ------------------------------------------------------------------------------------ plots


def test_plots_written_headless(tmp_path):
    pytest.importorskip("matplotlib")
    from regoptim.workflow.plots import (
        plot_regularization_path,
        plot_sparsity,
        plot_weight_distributions,
    )

    torch.manual_seed(0)
    before = nn.Linear(20, 10)
    after = copy.deepcopy(before)
    with torch.no_grad():
        after.weight[after.weight.abs() < 0.1] = 0.0
    fig = plot_weight_distributions(before, after, path=tmp_path / "w.png")
    assert (tmp_path / "w.png").stat().st_size > 1000
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 1
    fig = plot_weight_distributions(
        before.state_dict(), {"a": after, "b": before, "c": [after.weight]}
    )
    assert len([ax for ax in fig.axes if ax.get_visible()]) == 3
    fig = plot_sparsity(
        {"x": sparsity(after), "y": sparsity(before)}, path=tmp_path / "s.png", near=False
    )
    assert (tmp_path / "s.png").stat().st_size > 1000
    plot_sparsity(sparsity(after))
    fig = plot_regularization_path(
        [0.0, 1e-3, 1e-2],
        {"val": [0.9, 0.95, 0.8]},
        [0.0, 0.5, 0.9],
        best=1e-3,
        xlabel="l1",
        path=tmp_path / "p.svg",
    )
    assert (tmp_path / "p.svg").read_text().startswith("<?xml")
    plot_regularization_path([1e-3, 1e-2], {"val": [0.9, 0.95]})
    with pytest.raises(ValueError, match="length"):
        plot_regularization_path([1e-3, 1e-2], {"val": [0.9]})
    with pytest.raises(ValueError, match="bins"):
        plot_weight_distributions(before, after, bins=0)


_NO_EXTRAS = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('matplotlib', 'sklearn'):
            raise ImportError('blocked ' + name)
sys.meta_path.insert(0, Block())
import regoptim
from regoptim.workflow import cli, compare, groups, paths, penalties, prune, train
from regoptim.workflow.plots import plot_sparsity
from regoptim.workflow.sparsity import sparsity
assert 'matplotlib' not in sys.modules and 'sklearn' not in sys.modules
try:
    plot_sparsity(sparsity([]))
except ImportError as e:
    assert "regoptim[plots]" in str(e), e
    print("ok")
"""


def test_imports_without_matplotlib_or_sklearn():
    out = subprocess.run(
        [sys.executable, "-c", _NO_EXTRAS], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_public_exports():
    import regoptim

    if not hasattr(regoptim, "param_groups"):
        pytest.skip("regoptim/__init__.py does not export the workflow API yet")
    assert regoptim.param_groups is param_groups
    assert regoptim.l1_penalty is l1_penalty and regoptim.l2_penalty is l2_penalty
    # the function (its module is regoptim.workflow.sparsity): regoptim.sparsity(model) must work
    assert regoptim.sparsity is sparsity
    assert regoptim.SparsityReport is SparsityReport

"""Group lasso in the optimizers (``group_l1``, ``group_axes``): every path against the float64
reference, the validation, the routing around regoptim's fused kernels, checkpoints, and a
full-batch ProxSGD run against scikit-learn's MultiTaskLasso."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _helpers import IMPLS, ref_state
from registry import ADAM, ADAMW, SGD
from tolerances import assert_close_to_ref

import regoptim
import regoptim.backends.dispatch
from regoptim import reference
from regoptim.optimizer import resolve_impl

# one param group spanning three tensors: rows of (6, 4), entries of (6,), columns of (3, 6, 2)
SHAPES, AXES = [(6, 4), (6,), (3, 6, 2)], [0, 0, 1]
GROUP_SCALES = [0.05, 0.0, 0.5, 1.0, 1.5, 2.0]  # group norms of about 0.05 to 2


def _params(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [0.3 * torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    scale = torch.tensor(GROUP_SCALES, dtype=torch.float64)  # group 1 starts at zero
    ps = [
        p * scale.view([-1 if k == a else 1 for k in range(p.ndim)])
        for p, a in zip(ps, AXES, strict=True)
    ]
    return [p.to(dtype).requires_grad_() for p in ps]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    return [0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]


CASES = [
    pytest.param(SGD, dict(lr=0.1, momentum=0.9, l1=0.05, weight_decay=0.05), id="sgd-l1-coupled"),
    pytest.param(SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1, decoupled_weight_decay=True), id="sgd-decoupled"),
    pytest.param(ADAM, dict(lr=0.05, l1=0.02, weight_decay=0.05), id="adam-l1-coupled"),
    pytest.param(ADAM, dict(lr=0.05, amsgrad=True, weight_decay=0.1, decoupled_weight_decay=True, l1=0.02), id="adam-amsgrad-decoupled-l1"),
    pytest.param(ADAMW, dict(lr=0.05, weight_decay=0.1), id="adamw"),
]  # fmt: skip


def _expected(info, opt, params, grads, config, group_l1, with_grad):
    """The reference's step for each parameter with a gradient, then the group prox over all."""
    kw = info.ref_kwargs(config)
    states, ys = [], []
    for p, g, has in zip(params, grads, with_grad, strict=True):
        st = ref_state(opt.state[p])
        ys.append(info.ref(p, g, st, **kw) if has else p.detach().double())
        states.append(st)
    ds = None
    if info is not SGD:
        betas, eps = kw.get("betas", (0.9, 0.999)), kw.get("eps", 1e-8)
        ds = [
            reference.adam_denominator_ref(st, betas=betas, eps=eps, amsgrad=kw.get("amsgrad", False))
            if st
            else torch.full(y.shape, eps, dtype=torch.float64)
            for st, y in zip(states, ys, strict=True)
        ]  # fmt: skip
    return reference.group_prox_ref(ys, AXES, lr=kw["lr"], group_l1=group_l1, denominators=ds)


@pytest.mark.parametrize("impl", [*IMPLS, "fused-cpu", "fused-triton"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("info", "config"), CASES)
def test_step_matches_reference(info, config, dtype, impl, monkeypatch):
    """Three steps, each checked from the optimizer's current parameters and state; in the second,
    params[1] has no gradient: it is not stepped but still takes part in its groups' prox."""
    flags = dict(IMPLS.get(impl, {"fused": True}))
    backends: list[str] = []
    if impl.startswith("fused"):
        if dtype == torch.float64:
            pytest.skip("float64 takes the eager path under fused=True")
        monkeypatch.setenv("TRITON_INTERPRET", "1" if impl == "fused-triton" else "0")
        monkeypatch.setattr(
            regoptim.backends.dispatch,
            "fused_backend",
            _recording(regoptim.backends.dispatch.fused_backend, backends),
        )
    params = _params(dtype)
    group_l1 = 1.5 if info is SGD else 0.7
    opt = info.cls(
        [{"params": params, "group_l1": group_l1, "group_axes": AXES}], **config, **flags
    )
    for step in range(3):
        grads = _grads(params, step)
        with_grad = [not (step == 1 and i == 1) for i in range(len(params))]
        for p, g, has in zip(params, grads, with_grad, strict=True):
            p.grad = g.to(dtype) if has else None
        expected = _expected(info, opt, params, grads, config, group_l1, with_grad)
        opt.step()
        for p, e in zip(params, expected, strict=True):
            assert_close_to_ref(p, e, dtype)
        zero = [
            i
            for i in range(6)
            if all(not e.select(a, i).any() for e, a in zip(expected, AXES, strict=True))
        ]
        got = [
            i
            for i in range(6)
            if all(not p.select(a, i).any() for p, a in zip(params, AXES, strict=True))
        ]
        assert got == zero and 0 < len(zero) < 6, (got, zero)  # fmt: skip
    if impl.startswith("fused"):  # the step ran in the kernel meant, the group prox after it
        assert set(backends) == {"triton" if impl == "fused-triton" else "cpu"}, backends


@pytest.mark.parametrize("impl", [*IMPLS, "fused-cpu", "fused-triton"])
@pytest.mark.parametrize("info", [SGD, ADAM], ids=lambda i: i.name)
def test_zero_lr_leaves_every_group_as_it_is(info, impl, monkeypatch):
    """lr = 0 (a schedule's first or last step) is no step and a threshold of 0: a zero group
    stays exactly zero (no 0/0), every other value stays as it was."""
    flags = dict(IMPLS.get(impl, {"fused": True}))
    if impl.startswith("fused"):
        monkeypatch.setenv("TRITON_INTERPRET", "1" if impl == "fused-triton" else "0")
    params = _params(torch.float32)
    before = [p.detach().clone() for p in params]
    opt = info.cls([{"params": params, "group_l1": 1.0, "group_axes": AXES}], lr=0.0, **flags)
    for p, g in zip(params, _grads(params, 0), strict=True):
        p.grad = g.float()
    opt.step()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)


def _recording(fn, calls):
    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        calls.append(out)
        return out

    return wrapped


@pytest.mark.parametrize("info", [SGD, ADAM], ids=lambda i: i.name)
def test_param_never_stepped_takes_part_in_the_prox(info):
    """A parameter without a gradient (and, for Adam, without state: d = eps) is not updated by
    the step, but its slices are part of their groups and are shrunk with them."""
    w, b = _params(torch.float64)[:2]
    opt = info.cls([{"params": [w, b], "group_l1": 0.5}], lr=0.1)
    g = _grads([w], 0)[0]
    w.grad = g.clone()
    st: dict = {}
    y = info.ref(w, g, st, **info.ref_kwargs(dict(lr=0.1)))
    ds = None if info is SGD else [reference.adam_denominator_ref(st, betas=(0.9, 0.999), eps=1e-8, amsgrad=False), torch.full((6,), 1e-8, dtype=torch.float64)]  # fmt: skip
    expected = reference.group_prox_ref([y, b.detach().double()], [0, 0], lr=0.1, group_l1=0.5, denominators=ds)  # fmt: skip
    b_before = b.detach().clone()
    opt.step()
    assert_close_to_ref(w, expected[0], torch.float64)
    assert_close_to_ref(b, expected[1], torch.float64)
    assert not torch.equal(b, b_before) and b not in opt.state


def test_no_gradient_no_step_no_prox():
    w = _params(torch.float64)[0]
    before = w.detach().clone()
    regoptim.ProxSGD([w], lr=0.1, group_l1=10.0).step()
    assert torch.equal(w, before)


def test_negative_axes_are_normalised():
    a, b = _params(torch.float64, 1)[0], _params(torch.float64, 1)[0]
    for p, axes in ((a, [1]), (b, [-1])):
        p.grad = torch.ones_like(p)
        regoptim.ProxSGD([p], lr=0.1, group_l1=1.0, group_axes=axes).step()
    assert torch.equal(a, b)


# --- validation ----------------------------------------------------------------------------------

W, B, W5 = torch.zeros(6, 4), torch.zeros(6), torch.zeros(5, 4)


@pytest.mark.parametrize("cls", [regoptim.ProxSGD, regoptim.ProxAdam, regoptim.ProxAdamW])
@pytest.mark.parametrize(
    ("group", "error", "match"),
    [
        ({"params": [W, B, W5]}, ValueError, r"params\[0\]: 6 along axis 0, params\[1\]: 6 along axis 0, params\[2\]: 5 along axis 0"),
        ({"params": [W, B], "group_axes": [1, 0]}, ValueError, r"params\[0\]: 4 along axis 1, params\[1\]: 6 along axis 0"),
        ({"params": [W], "group_axes": [2]}, ValueError, r"group_axes\[0\]: 2 is out of range for params\[0\] of shape \(6, 4\)"),
        ({"params": [W, B], "group_axes": [-3, 0]}, ValueError, r"group_axes\[0\]: -3 is out of range"),
        ({"params": [W, B], "group_axes": [0]}, ValueError, r"1 axes for 2 parameters"),
        ({"params": [W, torch.zeros(())]}, ValueError, r"params\[1\] is 0-d"),
        ({"params": [W], "group_axes": "0"}, TypeError, r"group_axes: expected None or a list of ints"),
        ({"params": [W], "group_axes": [0.0]}, TypeError, r"group_axes: expected None or a list of ints"),
        ({"params": [torch.zeros(3, dtype=torch.complex64)]}, ValueError, r"params\[0\] for group_l1: complex"),
        ({"params": [W], "group_l1": -0.1}, ValueError, r"^Invalid group_l1 value: -0\.1$"),
        ({"params": [W], "group_l1": float("nan")}, ValueError, r"group_l1 value: nan"),
    ],
)  # fmt: skip
def test_bad_groups_raise_at_construction_and_add_param_group(cls, group, error, match):
    group = {"group_l1": 1e-3, **group}
    with pytest.raises(error, match=match):
        cls([group], lr=0.1)
    opt = cls([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(error, match=match):
        opt.add_param_group(group)
    assert len(opt.param_groups) == 1
    if "group_l1" in group and group["group_l1"] == 1e-3:
        with pytest.raises(error, match=match):  # as a constructor keyword too
            cls(group["params"], lr=0.1, group_l1=1e-3, group_axes=group.get("group_axes"))


def test_edited_group_is_checked_before_the_step():
    w, b = torch.randn(6, 4, requires_grad=True), torch.randn(6, requires_grad=True)
    opt = regoptim.ProxSGD([{"params": [w, b], "group_l1": 1e-3}], lr=0.1)
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    opt.step()
    opt.param_groups[0]["group_axes"] = [1, 0]
    before = w.detach().clone()
    with pytest.raises(
        ValueError, match=r"params\[0\]: 4 along axis 1, params\[1\]: 6 along axis 0"
    ):
        opt.step()
    assert torch.equal(w, before)


def test_axes_edited_in_place_are_caught_before_the_update():
    w, b = torch.randn(6, 4, requires_grad=True), torch.randn(6, requires_grad=True)
    opt = regoptim.ProxAdam([{"params": [w, b], "group_l1": 1e-3, "group_axes": [0, 0]}])
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    opt.step()
    opt.param_groups[0]["group_axes"][0] = 1
    before = w.detach().clone()
    with pytest.raises(
        ValueError, match=r"params\[0\]: 4 along axis 1, params\[1\]: 6 along axis 0"
    ):
        opt.step()
    assert torch.equal(w, before)


def test_unregularized_groups_may_hold_scalars():
    opt = regoptim.ProxSGD([torch.zeros((), requires_grad=True)], lr=0.1)
    assert opt.param_groups[0]["group_l1"] == 0.0 and opt.param_groups[0]["group_axes"] is None


# --- routing around regoptim's fused kernels -------------------------------------------------------


def test_default_path_keeps_off_the_fused_kernels(monkeypatch):
    """A group that the fused group step does not serve (here: a parameter without a gradient)
    takes torch's paths and the eager group prox, never regoptim's plain fused kernel."""
    p, g = torch.zeros(6, 4), torch.zeros(6, 4)
    picked = resolve_impl([p], [g], foreach=None, fused=None, fused_ok=False)
    assert picked == "torch_fused"  # torch's fused CPU kernel, then the regularizers' passes
    assert resolve_impl([p], [g], foreach=None, fused=True, fused_ok=False) == "fused"

    def refuse(*args, **kwargs):
        raise AssertionError("regoptim's fused kernel ran for a group with group_l1")

    monkeypatch.setitem(regoptim._sgd_impl.IMPLS, "fused", refuse)
    monkeypatch.setitem(regoptim._adam_impl.IMPLS, "fused", refuse)
    for cls in (regoptim.ProxSGD, regoptim.ProxAdam):
        w = torch.randn(6, 4, requires_grad=True)
        b = torch.randn(6, requires_grad=True)  # no gradient: part of the norms, not stepped
        w.grad = torch.randn(6, 4)
        cls([w, b], lr=0.1, group_l1=1e-2).step()


@pytest.mark.parametrize(("cls", "group_l1"), [(regoptim.ProxSGD, 1.0), (regoptim.ProxAdam, 0.05)])
def test_amp_skipped_fused_step_skips_the_group_prox(cls, group_l1, monkeypatch):
    """fused=True under a GradScaler: a step whose gradients overflowed leaves the parameters as
    they were, group prox included; the next step runs both."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    w = (
        torch.randn(6, 4) * torch.tensor([0.01, 0.02, 1.0, 1.0, 2.0, 3.0])[:, None]
    ).requires_grad_()
    ref = w.detach().clone().requires_grad_()
    opt = cls([w], lr=0.1, group_l1=group_l1, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**4)
    before = w.detach().clone()
    scaler.scale((w * float("inf")).sum()).backward()  # an overflowing step
    scaler.step(opt)
    scaler.update()
    assert torch.equal(w, before) and not opt.state.get(w, {}).get("momentum_buffer")
    opt.zero_grad()
    scaler.scale((w * 0.01).sum()).backward()
    scaler.step(opt)
    ref.grad = torch.full_like(ref, 0.01)
    cls([ref], lr=0.1, group_l1=group_l1, foreach=False).step()  # the eager path, unscaled
    torch.testing.assert_close(w, ref)
    assert regoptim.count_zero_groups([w]) == (2, 6)  # rows 0 and 1: the group prox ran


# --- checkpoints ------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [regoptim.ProxSGD, regoptim.ProxAdam, regoptim.ProxAdamW])
def test_state_dict_round_trip_keeps_group_keys(cls):
    w, b = torch.randn(6, 4, requires_grad=True), torch.randn(6, requires_grad=True)
    opt = cls([{"params": [w], "group_l1": 1e-2, "group_axes": [-1]}, {"params": [b]}], lr=0.1)
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    opt.step()
    sd = opt.state_dict()
    other = cls([{"params": [w]}, {"params": [b]}], lr=0.1)
    other.load_state_dict(sd)
    assert other.param_groups[0]["group_l1"] == 1e-2 and other.param_groups[0]["group_axes"] == [-1]
    assert other.param_groups[1]["group_l1"] == 0.0 and other.param_groups[1]["group_axes"] is None


@pytest.mark.parametrize(
    ("cls", "torch_cls"),
    [(regoptim.ProxSGD, torch.optim.SGD), (regoptim.ProxAdam, torch.optim.Adam), (regoptim.ProxAdamW, torch.optim.AdamW)],
)  # fmt: skip
def test_torch_checkpoint_loads_with_defaults(cls, torch_cls):
    w = torch.randn(6, 4, requires_grad=True)
    w.grad = torch.ones_like(w)
    theirs = torch_cls([w], lr=0.1)
    theirs.step()
    ours = cls([w], lr=0.1, group_l1=0.5)
    ours.load_state_dict(theirs.state_dict())
    group = ours.param_groups[0]
    assert group["group_l1"] == 0.0 and group["group_axes"] is None
    ours.step()  # the loaded hyperparameters, without group lasso


# --- an independent solver ----------------------------------------------------------------------


def test_full_batch_prox_sgd_reaches_multitask_lasso():
    """Column groups (group_axes=[1]) of a bias-free Linear layer under the squared loss are
    scikit-learn's MultiTaskLasso: (1/(2n))||Y - X W^T||_F^2 + alpha * sum_j ||W[:, j]||_2.
    Full-batch ProxSGD with lr = 1/L (L the loss gradient's Lipschitz constant) is proximal
    gradient descent on it, so it must reach the same objective and the same zero columns."""
    from sklearn.linear_model import MultiTaskLasso

    rng = np.random.default_rng(0)
    n, p, tasks = 200, 12, 3
    x = rng.standard_normal((n, p))
    x = (x - x.mean(0)) / x.std(0)
    w_true = rng.standard_normal((tasks, p)) * (np.arange(p) % 2)  # odd columns only
    y = x @ w_true.T + 0.5 * rng.standard_normal((n, tasks))
    alpha = 0.2 * np.linalg.norm(x.T @ y, axis=1).max() / n  # 0.2 of the all-zero alpha

    sk = MultiTaskLasso(alpha=alpha, fit_intercept=False, tol=1e-14, max_iter=100_000).fit(x, y)

    def objective(w):
        return 0.5 * ((y - x @ w.T) ** 2).sum() / n + alpha * np.linalg.norm(w, axis=0).sum()

    lin = torch.nn.Linear(p, tasks, bias=False, dtype=torch.float64)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    lipschitz = float(torch.linalg.eigvalsh(xt.T @ xt / n).max())
    opt = regoptim.ProxSGD(lin.parameters(), lr=1 / lipschitz, group_l1=alpha, group_axes=[1])
    for _ in range(300):  # 50 steps already reach sklearn's objective to 1e-15 here
        opt.zero_grad()
        (0.5 * ((lin(xt) - yt) ** 2).sum() / n).backward()
        opt.step()
    w = lin.weight.detach().numpy()
    ours, theirs = objective(w), objective(sk.coef_)
    assert abs(ours - theirs) <= 1e-6 * theirs, (ours, theirs)
    zero_cols = np.flatnonzero(~w.any(axis=0))
    assert np.array_equal(zero_cols, np.flatnonzero(~sk.coef_.any(axis=0)))
    assert 0 < len(zero_cols) < p  # the test sees both kinds
    assert regoptim.count_zero_groups([lin.weight], axes=1) == (len(zero_cols), p)


@pytest.mark.parametrize("cls", [regoptim.ProxSGD, regoptim.ProxAdam])
def test_differentiable_step_gradcheck(cls):
    """differentiable=True: autograd through the step and the group prox (Adam's Newton solve
    included) matches finite differences, w.r.t. the parameters and a tensor lr."""
    g = torch.randn(6, 4, dtype=torch.float64)
    rows = torch.tensor([0.01, 1, 1, 2, 2, 3], dtype=torch.float64)[:, None]  # row 0: zeroed
    w = (torch.randn(6, 4, dtype=torch.float64) * rows).requires_grad_()
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)

    def step(w, lr):
        p = w.clone()
        opt = cls([p], lr=lr, group_l1=3.0, differentiable=True)
        p.grad = g.clone()
        opt.step()
        return p

    assert not step(w, lr)[0].any() and step(w, lr)[1:].all()
    assert torch.autograd.gradcheck(step, (w, lr))


def test_compiled_step_matches_eager():
    """torch.compile(opt.step) with group lasso (ProxSGD) computes what the eager step computes."""
    rows = torch.tensor([0.05, 0.1, 1.0, 1.0, 2.0, 2.0])
    w = (torch.randn(6, 4) * rows[:, None]).requires_grad_()
    b = (torch.randn(6) * rows).requires_grad_()
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    opt = regoptim.ProxSGD([{"params": [w, b], "group_l1": 3.0}], lr=0.1, momentum=0.9)
    eager = regoptim.ProxSGD([{"params": [w2, b2], "group_l1": 3.0}], lr=0.1, momentum=0.9)
    compiled = torch.compile(opt.step, backend="aot_eager")
    for _ in range(3):
        g, gb = 0.1 * torch.randn(6, 4), 0.1 * torch.randn(6)
        w.grad, b.grad, w2.grad, b2.grad = g, gb, g.clone(), gb.clone()
        compiled()
        eager.step()
    torch.testing.assert_close(w, w2)
    torch.testing.assert_close(b, b2)
    assert 0 < regoptim.count_zero_groups([w, b])[0] < 6

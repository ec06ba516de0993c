"""What a torch.optim user expects beyond the math: closures, skipped params, odd tensors,
complex and sparse gradients, per-group and changing hyperparameters."""

from __future__ import annotations

import pytest
import torch
from _helpers import IMPLS, ref_state
from registry import ADAM, ADAMW, OPTIMIZERS, SGD
from tolerances import assert_close_to_ref

import regoptim

REG = {
    "ProxSGD": dict(lr=0.1, momentum=0.9, weight_decay=0.01, decoupled_weight_decay=True, l1=0.05),
    "ProxAdam": dict(lr=0.05, weight_decay=0.01, amsgrad=True, l1=0.05),
    "ProxAdamW": dict(lr=0.05, weight_decay=0.05, l1=0.05),
}


def _check_against_reference(info, params, opt, config, steps=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads = []
        for p in params:
            real = torch.complex128 if p.is_complex() else torch.float64
            grads.append(torch.randn(p.shape, generator=g, dtype=real).to(p.dtype))
        expected = []
        for p, gr in zip(params, grads, strict=True):
            p.grad = gr.clone() if gr.is_contiguous() else gr
            expected.append(info.ref(p, gr, ref_state(opt.state[p]), **info.ref_kwargs(config)))
        opt.step()
        for p, e in zip(params, expected, strict=True):
            assert_close_to_ref(p, e, p.dtype)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_closure_loss_is_returned(info):
    p = torch.nn.Parameter(torch.ones(2))
    opt = info.cls([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss.detach()

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() == 2.0
    assert opt.step() is None


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_params_without_grad_are_skipped(info, impl):
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = info.cls([a, b], **REG[info.name], **IMPLS[impl])
    a.grad = torch.ones(3)
    opt.step()
    assert torch.equal(b, torch.ones(3)) and len(opt.state[b]) == 0
    assert not torch.equal(a, torch.ones(3))


def _odd_params(dtype):
    g = torch.Generator().manual_seed(3)
    t = torch.randn(6, 4, generator=g, dtype=torch.float64).to(dtype).t()  # transposed view
    cl = (
        torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
        .to(dtype)
        .to(memory_format=torch.channels_last)
    )
    zero_d = torch.randn((), generator=g, dtype=torch.float64).to(dtype)
    empty = torch.empty(0, 3, dtype=dtype)
    return [x.requires_grad_() for x in (t, cl, zero_d, empty)]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_non_contiguous_zero_d_and_empty(info, impl):
    params = _odd_params(torch.float32)
    cfg = {**REG[info.name], **IMPLS[impl]}
    opt = info.cls(params, **cfg)
    _check_against_reference(info, params, opt, cfg)
    assert params[1].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("impl", ["loop", "foreach"])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_complex_params_against_reference(info, impl):
    g = torch.Generator().manual_seed(5)
    params = [
        torch.randn(4, 3, generator=g, dtype=torch.complex128).to(torch.complex64).requires_grad_()
    ]
    cfg = {**REG[info.name], **IMPLS[impl]}
    opt = info.cls(params, **cfg)
    _check_against_reference(info, params, opt, cfg)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_complex_equals_torch_without_regularization(info):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5, 2, generator=g, dtype=torch.complex64)
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    cfg = {"SGD": {}, "Adam": {"amsgrad": True}, "AdamW": {}}[info.torch_cls.__name__]
    o1 = info.cls([ours], lr=0.1, weight_decay=0.01, **cfg)
    o2 = info.torch_cls([theirs], lr=0.1, weight_decay=0.01, **cfg)
    for _ in range(4):
        grad = torch.randn(5, 2, generator=g, dtype=torch.complex64)
        ours.grad, theirs.grad = grad.clone(), grad.clone()
        o1.step()
        o2.step()
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("impl", ["loop", "foreach"])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sparse_gradients_sgd(momentum, impl):
    """Sparse gradients where torch.optim.SGD takes them; the prox still touches every entry."""
    torch.manual_seed(0)
    cfg = dict(
        lr=0.1, momentum=momentum, weight_decay=0.01, decoupled_weight_decay=True, l1=0.3,
        **IMPLS[impl],
    )  # fmt: skip
    sparse = torch.nn.Embedding(8, 3, sparse=True)
    dense = torch.nn.Embedding(8, 3, sparse=False)
    dense.load_state_dict(sparse.state_dict())
    o1 = regoptim.ProxSGD(sparse.parameters(), **cfg)
    o2 = regoptim.ProxSGD(dense.parameters(), **cfg)
    for step in range(3):
        idx = torch.tensor([step, 5])
        for emb, opt in ((sparse, o1), (dense, o2)):
            opt.zero_grad()
            (emb(idx) ** 2).sum().backward()
            opt.step()
    torch.testing.assert_close(sparse.weight, dense.weight, rtol=1e-6, atol=1e-7)
    untouched_rows = [r for r in range(8) if r not in (0, 1, 2, 5)]
    # rows that never had a gradient still shrink under the (dense) prox
    assert (
        sparse.weight[untouched_rows].abs() < dense.weight.detach()[untouched_rows].abs() + 1
    ).all()
    assert (sparse.weight == 0).any()


def test_sparse_gradients_with_coupled_decay_raise_like_torch():
    emb = torch.nn.Embedding(8, 3, sparse=True)
    opt = regoptim.ProxSGD(emb.parameters(), lr=0.1, weight_decay=0.01)
    emb(torch.tensor([1])).sum().backward()
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(emb.weight, before)


def test_sparse_gradients_equal_torch_sgd_without_regularization():
    torch.manual_seed(0)
    a = torch.nn.Embedding(8, 3, sparse=True)
    b = torch.nn.Embedding(8, 3, sparse=True)
    b.load_state_dict(a.state_dict())
    o1 = regoptim.ProxSGD(a.parameters(), lr=0.1, momentum=0.9)
    o2 = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        for emb, opt in ((a, o1), (b, o2)):
            opt.zero_grad()
            emb(torch.tensor([step, 4])).sum().backward()
            opt.step()
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_per_group_hyperparameters(info):
    a = torch.nn.Parameter(torch.full((4,), 0.3))
    b = torch.nn.Parameter(torch.full((4,), 0.3))
    opt = info.cls([{"params": [a], "l1": 0.0}, {"params": [b], "l1": 100.0}], lr=0.01)
    a.grad = torch.zeros(4)
    b.grad = torch.zeros(4)
    opt.step()
    assert (a != 0).all() and (b == 0).all()


@pytest.mark.parametrize("info", [SGD, ADAM, ADAMW], ids=lambda i: i.name)
def test_l1_ramp_changed_by_hand_follows_reference(info):
    p = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    cfg = dict(REG[info.name])
    opt = info.cls([p], **cfg)
    g = torch.Generator().manual_seed(9)
    ref_p, ref_st = p.detach().clone(), {}
    for step in range(6):
        l1 = 0.02 * step  # the common recipe: ramp the strength up
        opt.param_groups[0]["l1"] = l1
        grad = torch.randn(10, 4, generator=g, dtype=torch.float64)
        p.grad = grad
        opt.step()
        ref_p = info.ref(ref_p, grad, ref_st, **{**info.ref_kwargs(cfg), "l1": l1})
        assert_close_to_ref(p, ref_p, torch.float64)


def test_tensor_lr_is_read_each_step():
    p = torch.nn.Parameter(torch.ones(2))
    lr = torch.tensor(0.1)
    opt = regoptim.ProxSGD([p], lr=lr, l1=0.5)
    p.grad = torch.zeros(2)
    opt.step()
    assert torch.allclose(p, torch.full((2,), 0.95))
    opt.param_groups[0]["lr"].fill_(1.0)  # in place, as a scheduler with a tensor lr does
    opt.step()
    assert torch.allclose(p, torch.full((2,), 0.45))
    opt.step()
    assert torch.equal(p, torch.zeros(2))


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_fused_true_routes_unsupported_dtypes_to_the_torch_path(info, backend, monkeypatch):
    """float64 (and, for Adam, complex) tensors in a fused=True group still get the exact step."""
    from regoptim.backends.dispatch import fused_unavailable_reason

    monkeypatch.setenv("TRITON_INTERPRET", "1" if backend == "triton" else "0")
    reason = fused_unavailable_reason("cpu")
    if reason is not None:
        pytest.skip(reason)
    g = torch.Generator().manual_seed(11)
    params = [
        torch.randn(6, 3, generator=g, dtype=torch.float64).requires_grad_(),
        torch.randn(7, generator=g, dtype=torch.float64).float().requires_grad_(),
        torch.randn(4, generator=g, dtype=torch.complex128).to(torch.complex64).requires_grad_(),
    ]
    cfg = {**REG[info.name], "fused": True}
    opt = info.cls(params, **cfg)
    _check_against_reference(info, params, opt, cfg)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_prox_never_hides_a_nan(info, impl):
    """A NaN weight stays NaN through the prox (a soft-threshold that maps NaN to 0 would hide a
    diverged run); the other entries get exact zeros as usual."""
    p = torch.tensor([float("nan"), 0.1, 0.05, 2.0], requires_grad=True)
    opt = info.cls([p], lr=0.1, l1=1.0, **IMPLS[impl])
    p.grad = torch.ones(4)  # a step of about lr = 0.1 for SGD and Adam alike, then the prox
    opt.step()
    assert torch.isnan(p[0]) and p[1] == 0 and p[2] == 0 and 0 < p[3] < 2.0

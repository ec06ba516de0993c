"""``differentiable=True`` and ``capturable=True``, with torch's meaning, the prox included.

differentiable: autograd through one step, checked with ``torch.autograd.gradcheck`` as torch's
own optimizer tests do (``_diff_fn``: the step as a function of the parameter, the gradient and
the state). capturable: ``step`` on the parameter's device and never read on the host.
"""

from __future__ import annotations

import copy
import importlib
from typing import Any

import pytest
import torch

import regoptim

_torch_adam = importlib.import_module("torch.optim.adam")

pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")

F64 = torch.float64


def _diff_step(p, grad, state, cls, kwargs, *inputs):
    """One step as a differentiable function (torch's ``_diff_fn``); ``inputs`` repeats the state
    tensors and the tensor hyperparameters so that gradcheck perturbs and differentiates them."""
    p = p.clone()
    p.grad = grad
    state = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    opt = cls([p], **kwargs)
    opt.state[p].update(state)
    opt.step()
    return (p,) + tuple(
        v for v in opt.state[p].values() if isinstance(v, torch.Tensor) and v.requires_grad
    )


def _rand(*shape, scale=1.0):
    return (scale * torch.rand(*shape, dtype=F64)).requires_grad_()


def _adam_state(amsgrad: bool) -> dict[str, torch.Tensor]:
    state = {
        "step": torch.tensor(10.0, dtype=F64),  # not continuous: no gradient, as in torch
        "exp_avg": _rand(10),
        "exp_avg_sq": _rand(10),
    }
    if amsgrad:
        state["max_exp_avg_sq"] = _rand(10)
    return state


CASES = {
    "ProxSGD-momentum-coupled": (
        regoptim.ProxSGD,
        {"momentum": 0.9, "weight_decay": 0.1, "l1": 0.3},
        lambda: {"momentum_buffer": _rand(10)},
    ),
    "ProxSGD-nesterov-decoupled": (
        regoptim.ProxSGD,
        {
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 0.1,
            "decoupled_weight_decay": True,
            "l1": 0.3,
        },
        lambda: {"momentum_buffer": _rand(10)},
    ),  # fmt: skip
    "ProxAdam-amsgrad-coupled": (
        regoptim.ProxAdam,
        {"weight_decay": 0.1, "amsgrad": True, "l1": 2.0},
        lambda: _adam_state(amsgrad=True),
    ),
    "ProxAdamW": (
        regoptim.ProxAdamW,
        {"weight_decay": 0.1, "l1": 2.0},
        lambda: _adam_state(amsgrad=False),
    ),
}


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_through_one_step_with_the_prox(name, tensor_lr):
    torch.manual_seed(0)
    cls, kwargs, make_state = CASES[name]
    p, grad, state = _rand(10, scale=2.0) - 1.0, _rand(10), make_state()
    p = p.detach().requires_grad_()
    lr = torch.tensor(0.5, dtype=F64, requires_grad=True) if tensor_lr else 0.5
    kwargs = {**kwargs, "lr": lr, "differentiable": True}
    # the prox must act on both sides of its kink here: some weights zeroed, some only shrunk
    out = _diff_step(p, grad, state, cls, kwargs)[0]
    zeros = int((out == 0).sum())
    assert 0 < zeros < out.numel()
    extra = (lr,) if tensor_lr else ()
    assert torch.autograd.gradcheck(
        _diff_step, (p, grad, state, cls, kwargs, *state.values(), *extra)
    )


def test_gradient_flows_through_the_prox():
    """d p_new / d p is 0 where the prox zeroed a weight and 1 elsewhere (plain SGD, no decay)."""
    p0 = torch.tensor([1.0, -1.0, 0.05, -0.02], dtype=F64, requires_grad=True)
    p = p0.clone()
    p.grad = torch.zeros(4, dtype=F64)
    regoptim.ProxSGD([p], lr=0.1, l1=1.0, differentiable=True).step()
    assert torch.equal(p.detach(), torch.tensor([0.9, -0.9, 0.0, 0.0], dtype=F64))
    (dp,) = torch.autograd.grad(p.sum(), p0)
    assert torch.equal(dp, torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64))


TORCH = {regoptim.ProxSGD: torch.optim.SGD, regoptim.ProxAdam: torch.optim.Adam,
         regoptim.ProxAdamW: torch.optim.AdamW}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_without_l1_equals_torchs_differentiable_step(name):
    cls, kwargs, make_state = CASES[name]
    kwargs = {k: v for k, v in kwargs.items() if k not in ("l1", "decoupled_weight_decay")}
    if kwargs.get("nesterov"):
        kwargs["weight_decay"] = 0.0
    torch.manual_seed(0)
    p, grad, state = _rand(10), _rand(10), make_state()
    kw = {**kwargs, "lr": 0.5, "differentiable": True}
    ours = _diff_step(p, grad, state, cls, kw)
    theirs = _diff_step(p, grad, state, TORCH[cls], kw)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls", list(TORCH), ids=lambda c: c.__name__)
def test_differentiable_with_foreach_behaves_as_torch(cls):
    """torch's foreach Adam refuses autograd at step time; its foreach SGD follows it."""
    results = []
    for c in (cls, TORCH[cls]):
        p = torch.ones(3, dtype=F64, requires_grad=True).clone()
        p.grad = torch.ones(3, dtype=F64)
        opt = c([p], lr=0.1, foreach=True, differentiable=True)
        try:
            opt.step()
            results.append(("ok", p.requires_grad))
        except Exception as exc:
            results.append((type(exc), str(exc)))
    assert results[0] == results[1]


@pytest.mark.parametrize("cls", list(TORCH), ids=lambda c: c.__name__)
def test_fused_with_differentiable_is_refused_as_torch_refuses_it(cls):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(RuntimeError, match="^`fused` does not support `differentiable`$"):
        cls([p], fused=True, differentiable=True)
    with pytest.raises(RuntimeError, match="^`fused` does not support `differentiable`$"):
        TORCH[cls]([p], fused=True, differentiable=True)


def test_adam_differentiable_refuses_a_step_that_requires_grad():
    p = torch.ones(3, dtype=F64, requires_grad=True).clone()
    p.grad = torch.ones(3, dtype=F64)
    opt = regoptim.ProxAdam([p], differentiable=True)
    opt.state[p].update(_adam_state(amsgrad=False))
    opt.state[p]["step"].requires_grad_()
    with pytest.raises(RuntimeError, match="`requires_grad` is not supported for `step`"):
        opt.step()


# --- capturable ---------------------------------------------------------------------------------


@pytest.fixture
def capturable_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let torch's capturable Adam run on CPU, and make any host read of a tensor an error."""
    monkeypatch.setattr(
        _torch_adam, "_get_capturable_supported_devices", lambda *a, **k: ["cpu", "cuda"]
    )

    def no_host_read(self: torch.Tensor, *args: Any) -> Any:
        raise AssertionError("a capturable step read a tensor on the host")

    monkeypatch.setattr(torch.Tensor, "item", no_host_read)
    monkeypatch.setattr(torch.Tensor, "__float__", no_host_read)


def _adam_run(cls: type, kwargs: dict[str, Any], steps: int = 3) -> tuple[Any, list[Any]]:
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3, generator=g)) for _ in range(2)]
    opt = cls(params, lr=0.1, l1=0.05, weight_decay=0.1, amsgrad=True, **kwargs)
    for s in range(steps):
        gg = torch.Generator().manual_seed(100 + s)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gg)
        opt.step()
    return opt, params


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize("cls", [regoptim.ProxAdam, regoptim.ProxAdamW], ids=lambda c: c.__name__)
def test_capturable_step_never_reads_the_step_on_the_host(cls, foreach, capturable_on_cpu):
    opt, params = _adam_run(cls, {"capturable": True, "foreach": foreach})
    for p in params:
        step = opt.state[p]["step"]
        assert isinstance(step, torch.Tensor) and step.device == p.device
        assert step.dtype == torch.float32  # torch's scalar dtype when not fused
        assert torch.equal(step, torch.tensor(3.0))


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_capturable_step_equals_the_plain_step(foreach, monkeypatch):
    monkeypatch.setattr(
        _torch_adam, "_get_capturable_supported_devices", lambda *a, **k: ["cpu", "cuda"]
    )
    _, captured = _adam_run(regoptim.ProxAdam, {"capturable": True, "foreach": foreach})
    _, plain = _adam_run(regoptim.ProxAdam, {"foreach": foreach})
    for a, b in zip(captured, plain, strict=True):
        torch.testing.assert_close(a, b)
        assert torch.equal(a == 0, b == 0)
    assert any((p == 0).any() for p in plain)


@pytest.mark.parametrize("cls", [regoptim.ProxAdam, regoptim.ProxAdamW], ids=lambda c: c.__name__)
def test_capturable_on_cpu_fails_at_step_as_torch(cls):
    results = []
    for c in (cls, torch.optim.Adam):
        p = torch.nn.Parameter(torch.ones(3))
        opt = c([p], capturable=True)
        p.grad = torch.ones(3)
        with pytest.raises(AssertionError) as caught:
            opt.step()
        results.append(str(caught.value))
    assert results[0] == results[1]
    assert "If capturable=True, params and state_steps must be on supported devices" in results[0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
def test_capturable_step_replays_in_a_cuda_graph(foreach):
    def make() -> tuple[Any, list[torch.Tensor]]:
        g = torch.Generator(device="cuda").manual_seed(0)
        params = [torch.randn(64, 32, device="cuda", generator=g, requires_grad=True)]
        opt = regoptim.ProxAdam(params, lr=0.01, l1=0.01, capturable=True, foreach=foreach)
        return opt, params

    grads = [torch.randn(64, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(s))
             for s in range(4)]  # fmt: skip
    eager_opt, eager = make()
    for gr in grads:
        eager[0].grad = gr.clone()
        eager_opt.step()

    opt, params = make()
    params[0].grad = grads[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()  # warm-up (creates the state) on a side stream, as graph capture wants
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for gr in grads[1:]:
        params[0].grad.copy_(gr)
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(params[0], eager[0])


def _torch_capturable_inputs() -> list[Any]:
    common = pytest.importorskip("torch.testing._internal.common_optimizers")
    out = []
    for info in common.optim_db:
        ours = {"Adam": regoptim.ProxAdam, "AdamW": regoptim.ProxAdamW}.get(info.name)
        for inp in info.optim_inputs_func("cuda") if ours else []:
            if inp.kwargs.get("capturable"):
                out.append(
                    pytest.param(ours, info.optim_cls, inp.kwargs, id=f"{ours.__name__}-{inp.desc}")
                )
    return out


@pytest.mark.parametrize("foreach", [False, True], ids=["loop", "foreach"])
@pytest.mark.parametrize(("cls", "torch_cls", "kwargs"), _torch_capturable_inputs())
def test_torchs_capturable_inputs_step_as_torchs(cls, torch_cls, kwargs, foreach, monkeypatch):
    """torch's capturable inputs (tensor lr, tensor betas), run on CPU by letting torch's capturable
    Adam accept CPU tensors: ours (l1=0) equals torch's bit for bit; with l1 it still steps."""
    monkeypatch.setattr(
        _torch_adam, "_get_capturable_supported_devices", lambda *a, **k: ["cpu", "cuda"]
    )
    kwargs = {**kwargs, "foreach": foreach}
    results = []
    for c, extra in ((cls, {}), (torch_cls, {}), (cls, {"l1": 0.5})):
        g = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5, 4, generator=g))
        opt = c([p], **copy.deepcopy(kwargs), **extra)
        for _ in range(3):
            p.grad = torch.randn(5, 4, generator=g)
            opt.step()
        assert opt.state[p]["step"].device == p.device
        results.append(p.detach())
    assert torch.equal(results[0], results[1])
    assert not torch.equal(results[2], results[0])

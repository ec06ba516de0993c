"""torch.compile: a compiled ``opt.step`` and a compiled training step match eager.

Dynamo and AOTAutograd (functionalization, the graph inductor receives) run for real with the
``aot_eager`` backend; inductor's C++ code generation costs 20-70 s cold on 2 cores, so the inductor
test runs only with ``REGOPTIM_TEST_INDUCTOR=1``. Compiled and eager results are compared with the
float32 tolerance: under compile torch's optimizers take other (capturable, for-loop) branches whose
operation order differs in the last bits.

On the torch paths (loop, foreach, default) regoptim's step must trace without graph breaks
(``fullgraph=True``; torch.optim's own ``step`` cannot, it inserts graph breaks on purpose) and must
not recompile when a scheduler changes a tensor lr.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch._dynamo
from torch.optim import lr_scheduler as S

import regoptim
from tests._stack_helpers import COUNTERPART, EAGER_PATHS, loss_fn, make_batches, make_model
from tests.tolerances import TOL

BACKEND = "aot_eager"

OPTIMIZERS = [
    pytest.param(
        regoptim.ProxSGD,
        {"momentum": 0.9, "weight_decay": 1e-2, "decoupled_weight_decay": True, "l1": 2.0},
        id="ProxSGD",
    ),
    pytest.param(regoptim.ProxAdam, {"weight_decay": 1e-2, "l1": 2.0}, id="ProxAdam"),
    pytest.param(
        regoptim.ProxAdamW, {"weight_decay": 1e-2, "l1": 2.0, "amsgrad": True}, id="ProxAdamW"
    ),
]


_SGD, _ADAM, _ADAMW = (o.values for o in OPTIMIZERS)
LOOP, FOREACH, DEFAULT = (p.values[0] for p in EAGER_PATHS)
# each path, both lr kinds and both families, without the full product (compiling is slow)
CASES = [
    pytest.param(*_SGD, LOOP, "float", id="ProxSGD-loop-float"),
    pytest.param(*_SGD, DEFAULT, "tensor", id="ProxSGD-default-tensor"),
    pytest.param(*_ADAM, FOREACH, "float", id="ProxAdam-foreach-float"),
    pytest.param(*_ADAMW, LOOP, "tensor", id="ProxAdamW-loop-tensor"),
]


def _lr(kind: str) -> float | torch.Tensor:
    return torch.tensor(1e-2) if kind == "tensor" else 1e-2


def _train_steps(
    cls: type,
    kwargs: dict[str, Any],
    n: int,
    compile_step: Callable[[Callable[..., Any]], Callable[..., Any]] | None,
) -> tuple[list[torch.Tensor], dict[str, Any]]:
    model = make_model()
    opt = cls(model.parameters(), **kwargs)
    # the lr decays as under ExponentialLR, set by hand: a scheduler wraps opt.step in a function
    # dynamo skips (torch/optim/lr_scheduler.py), which would hide the step from fullgraph=True
    step = compile_step(opt.step) if compile_step else opt.step
    for t, (x, y) in enumerate(make_batches(n)):
        _set_lr(opt, 1e-2 * 0.7**t)
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        step()
    return [p.detach().clone() for p in model.parameters()], opt.state_dict()


def _set_lr(opt: Any, value: float) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def _assert_close_f32(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, **TOL[torch.float32])


@pytest.mark.parametrize("cls,kwargs,path,lr_kind", CASES)
def test_compiled_step_matches_eager(
    cls: type, kwargs: dict[str, Any], path: dict[str, Any], lr_kind: str, request: Any
) -> None:
    kwargs = {"lr": _lr(lr_kind), **kwargs, **path}
    torch._dynamo.reset()
    eager, eager_state = _train_steps(cls, {**kwargs, "lr": _lr(lr_kind)}, 3, None)
    compiled, state = _train_steps(
        cls, {**kwargs, "lr": _lr(lr_kind)}, 3, lambda f: torch.compile(f, backend=BACKEND)
    )
    _assert_close_f32(compiled, eager)
    assert any(bool((p == 0).any()) for p in compiled), "l1 produced no exact zeros"
    for k, s in eager_state["state"].items():
        for key, v in s.items():
            torch.testing.assert_close(
                state["state"][k][key].cpu().double(), v.cpu().double(), **TOL[torch.float32]
            )


@pytest.mark.parametrize("cls,kwargs,path,lr_kind", CASES)
def test_step_compiles_fullgraph(
    cls: type, kwargs: dict[str, Any], path: dict[str, Any], lr_kind: str, request: Any
) -> None:
    """No graph break at all in regoptim's step on torch's paths (fullgraph=True raises on one)."""
    torch._dynamo.reset()
    kwargs = {"lr": _lr(lr_kind), **kwargs, **path}
    compiled, _ = _train_steps(
        cls, kwargs, 3, lambda f: torch.compile(f, backend=BACKEND, fullgraph=True)
    )
    eager, _ = _train_steps(cls, {**kwargs, "lr": _lr(lr_kind)}, 3, None)
    _assert_close_f32(compiled, eager)


def test_torch_optim_step_itself_has_graph_breaks() -> None:
    """Evidence for the docstring: torch.optim's step breaks the graph on purpose
    (``_use_grad_for_differentiable`` calls ``torch._dynamo.graph_break()``), so fullgraph=True is
    a bar only regoptim's step can meet."""
    torch._dynamo.reset()
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, foreach=False)
    loss_fn(model, *make_batches(1)[0]).backward()
    with pytest.raises(torch._dynamo.exc.Unsupported, match="graph_break"):
        torch.compile(opt.step, backend="eager", fullgraph=True)()


class _GraphCounter:
    """A dynamo backend that counts the graphs it is handed (each compile and recompile)."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: Any) -> Callable[..., Any]:
        self.graphs += 1
        return gm.forward


@pytest.mark.parametrize(
    "cls,kwargs,path",
    [
        pytest.param(*_SGD, LOOP, id="ProxSGD-loop"),
        pytest.param(*_SGD, DEFAULT, id="ProxSGD-default"),
        pytest.param(*_ADAMW, LOOP, id="ProxAdamW-loop"),
    ],
)
def test_no_recompile_when_tensor_lr_changes(
    cls: type, kwargs: dict[str, Any], path: dict[str, Any], request: Any
) -> None:
    torch._dynamo.reset()
    model = make_model()
    opt = cls(model.parameters(), lr=torch.tensor(1e-2), **kwargs, **path)
    sched = S.CosineAnnealingLR(opt, T_max=6)
    counter = _GraphCounter()
    step = torch.compile(opt.step, backend=counter)
    batches = make_batches(5)

    def one(i: int) -> None:
        opt.zero_grad()
        loss_fn(model, *batches[i]).backward()
        step()
        sched.step()

    one(0)  # state is created on the first step: the second step may compile once more
    one(1)
    graphs = counter.graphs
    lrs = set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i in range(2, 5):
            one(i)
            lrs.add(float(opt.param_groups[0]["lr"]))
    assert len(lrs) == 3
    assert counter.graphs == graphs, "recompiled when the lr changed"


@pytest.mark.parametrize("cls,kwargs", [OPTIMIZERS[2]])
def test_float_lr_recompiles_no_more_than_torch(cls: type, kwargs: dict[str, Any]) -> None:
    """A float lr: dynamo specializes on the first value and turns it dynamic on the first change
    (automatic dynamic shapes); after that no recompiles, as for the torch counterpart."""
    counts = {}
    for name, klass, kw in [
        ("regoptim", cls, {**kwargs, "foreach": False}),
        ("torch", COUNTERPART[cls], {k: v for k, v in kwargs.items() if k not in ("l1",)}),
    ]:
        if klass is torch.optim.SGD:
            kw.pop("decoupled_weight_decay", None)
        kw.setdefault("foreach", False)
        torch._dynamo.reset()
        model = make_model()
        opt = klass(model.parameters(), lr=1e-2, **kw)
        counter = _GraphCounter()
        step = torch.compile(opt.step, backend=counter)
        for i, (x, y) in enumerate(make_batches(4)):
            opt.param_groups[0]["lr"] = 1e-2 * 0.8**i
            opt.zero_grad()
            loss_fn(model, x, y).backward()
            step()
        counts[name] = counter.graphs
    assert counts["regoptim"] <= counts["torch"] + 1, counts


def _train_compiled_model(
    cls: type, kwargs: dict[str, Any], n: int, compiler: Callable[..., Any] | None
) -> list[torch.Tensor]:
    model = make_model()
    opt = cls(model.parameters(), **kwargs)

    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model, x, y)
        loss.backward()
        opt.step()
        return loss

    fn = compiler(train_step) if compiler else train_step
    for x, y in make_batches(n):
        fn(x, y)
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("cls,kwargs", [OPTIMIZERS[0], OPTIMIZERS[2]])
def test_compiled_training_step_matches_eager(cls: type, kwargs: dict[str, Any]) -> None:
    """model + loss + backward + step in one compiled function."""
    torch._dynamo.reset()
    kwargs = {"lr": 1e-2, **kwargs, "foreach": False}
    compiled = _train_compiled_model(cls, kwargs, 3, lambda f: torch.compile(f, backend=BACKEND))
    eager = _train_compiled_model(cls, kwargs, 3, None)
    _assert_close_f32(compiled, eager)
    assert any(bool((p == 0).any()) for p in compiled)


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("REGOPTIM_TEST_INDUCTOR") != "1",
    reason="inductor C++ codegen takes 20-70 s cold on 2 cores; set REGOPTIM_TEST_INDUCTOR=1",
)
def test_inductor_training_step_matches_eager() -> None:
    torch._dynamo.reset()
    kwargs = {"lr": torch.tensor(1e-2), "weight_decay": 1e-2, "l1": 0.5, "foreach": False}
    compiled = _train_compiled_model(regoptim.ProxAdamW, kwargs, 3, torch.compile)
    kwargs["lr"] = torch.tensor(1e-2)
    eager = _train_compiled_model(regoptim.ProxAdamW, kwargs, 3, None)
    _assert_close_f32(compiled, eager)

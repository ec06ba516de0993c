"""torch's generic optimizer checks, run over torch's own inputs with regoptim in torch's place.

torch tests every optimizer against the inputs and error inputs of its ``optim_db``
(``torch.testing._internal.common_optimizers``). Here each ``OptimizerInfo`` of SGD, Adam and AdamW
is mapped to ProxSGD, ProxAdam and ProxAdamW, and the kinds of checks torch's generic suite makes
(hooks, printing, deepcopy, no-op steps, grads left alone, errors) run on both, side by side: a
drop-in must behave as torch's optimizer does on the same input.

Inputs: torch's CPU inputs with its global flags (``differentiable``, ``fused``, each on and off),
plus a ``foreach=True`` variant of each (torch lists foreach only on devices with foreach kernels),
plus its CUDA-only inputs (``capturable``, tensor betas), which on CPU must fail at step time exactly
as torch's do. The one skip: the older-state-dict check on differentiable inputs (their state
lies inside an autograd graph, which deepcopy refuses, in torch too).
"""

from __future__ import annotations

import copy
import re
import warnings
from typing import Any

import numpy as np
import pytest
import torch

import regoptim

common = pytest.importorskip(
    "torch.testing._internal.common_optimizers", reason="torch's test registry needs expecttest"
)
from torch.optim.optimizer import (  # noqa: E402
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

# torch's own optimizers warn alike when a differentiable step reads a non-leaf tensor's .grad
pytestmark = pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf")

OURS = {"SGD": regoptim.ProxSGD, "Adam": regoptim.ProxAdam, "AdamW": regoptim.ProxAdamW}
INFOS = [info for info in common.optim_db if info.name in OURS]
SKIP_DIFFERENTIABLE_CHECKPOINT = (
    "a differentiable step's state lies in an autograd graph (deepcopy refuses it)"
)
# hyperparameters regoptim adds to torch's (shown by repr, absent from torch's groups)
_GROUP_KEYS = {"group_l1", "group_axes"}
EXTRA_KEYS = {
    "SGD": {"l1", "decoupled_weight_decay", *_GROUP_KEYS},
    "Adam": {"l1", *_GROUP_KEYS},
    "AdamW": {"l1", *_GROUP_KEYS},
}


def _inputs(info: Any) -> list[Any]:
    out = []
    cpu = common._get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info)
    for inp in cpu:
        out.append((inp.desc, inp.kwargs))
        if inp.kwargs.get("differentiable") is False and inp.kwargs.get("fused") is False:
            out.append((f"{inp.desc} & foreach", {**inp.kwargs, "foreach": True}))
    cpu_descs = {inp.desc for inp in info.optim_inputs_func("cpu")}
    for inp in info.optim_inputs_func("cuda"):
        if inp.desc not in cpu_descs:
            out.append((f"{inp.desc} (CUDA input)", inp.kwargs))
    return out


CASES = [
    pytest.param(info, kwargs, id=f"{OURS[info.name].__name__}-{desc}")
    for info in INFOS
    for desc, kwargs in _inputs(info)
]


def _params(kwargs: dict[str, Any], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(2, 3, generator=g), torch.randn(3, generator=g)]
    if kwargs.get("differentiable"):
        # as torch's tests: a differentiable step updates non-leaf tensors that track autograd
        return [p.requires_grad_().clone() for p in leaves]
    return [torch.nn.Parameter(p) for p in leaves]


def _set_grads(params: list[torch.Tensor], seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _pair(info: Any, kwargs: dict[str, Any]) -> tuple[Any, Any, list[Any], list[Any]]:
    """(ours, torch's, our params, torch's params): same initial values, same grads."""
    ours_p, theirs_p = _params(kwargs), _params(kwargs)
    ours = OURS[info.name](ours_p, **copy.deepcopy(kwargs))
    theirs = info.optim_cls(theirs_p, **copy.deepcopy(kwargs))
    return ours, theirs, ours_p, theirs_p


def _step_both(ours: Any, theirs: Any) -> bool:
    """Step torch's optimizer, then ours: either both step, or ours raises exactly what torch's
    raised (type and message). Returns whether they stepped."""
    try:
        theirs.step()
    except Exception as exc:
        with pytest.raises(type(exc)) as caught:
            ours.step()
        assert str(caught.value) == str(exc)
        return False
    ours.step()
    return True


def _snapshot(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize(("info", "kwargs"), CASES)
def test_steps_like_torch(info, kwargs):
    """Both step or both raise the same error; with torch's inputs (no l1) the values agree."""
    ours, theirs, ours_p, theirs_p = _pair(info, kwargs)
    for params in (ours_p, theirs_p):
        _set_grads(params)
    if _step_both(ours, theirs):
        for a, b in zip(ours_p, theirs_p, strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("info", "kwargs"), CASES)
def test_grads_are_not_written(info, kwargs):
    ours, theirs, ours_p, theirs_p = _pair(info, kwargs)
    for params in (ours_p, theirs_p):
        _set_grads(params)
    grads = [p.grad.clone() for p in ours_p]
    for _ in range(2):
        if not _step_both(ours, theirs):
            return
    for p, g in zip(ours_p, grads, strict=True):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize(("info", "kwargs"), CASES)
def test_zero_grads_are_a_no_op_where_torchs_are(info, kwargs):
    """Zero gradients leave the parameters exactly as they were iff torch's do (weight decay and
    AdamW's default decay move them in both)."""
    ours, theirs, ours_p, theirs_p = _pair(info, kwargs)
    before = _snapshot(ours_p)
    for params in (ours_p, theirs_p):
        for p in params:
            p.grad = torch.zeros_like(p)
    for _ in range(3):
        if not _step_both(ours, theirs):
            return
    for ours_after, theirs_after, b in zip(ours_p, theirs_p, before, strict=True):
        assert torch.equal(ours_after, b) == torch.equal(theirs_after, b)
        torch.testing.assert_close(ours_after, theirs_after)


def test_zero_grads_with_l1_still_shrink():
    """Not torch's no-op: the prox of the L1 term acts on the weights, gradient or not."""
    p = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.05]))
    opt = regoptim.ProxSGD([p], lr=0.1, l1=1.0)
    p.grad = torch.zeros(3)
    opt.step()
    assert torch.equal(p.detach(), torch.tensor([0.9, -0.9, 0.0]))


@pytest.mark.parametrize(("info", "kwargs"), CASES)
def test_params_without_grad_are_untouched_and_get_no_state(info, kwargs):
    ours, theirs, ours_p, theirs_p = _pair(info, kwargs)
    before = _snapshot(ours_p)
    for params in (ours_p, theirs_p):
        params[0].grad = torch.ones_like(params[0])
    if not _step_both(ours, theirs):
        return
    assert torch.equal(ours_p[1], before[1])
    assert ours_p[1] not in ours.state
    assert theirs_p[1] not in theirs.state  # what torch does too
    assert set(ours.state[ours_p[0]]) == set(theirs.state[theirs_p[0]])


@pytest.mark.parametrize(("info", "kwargs"), CASES)
def test_step_hooks(info, kwargs):
    ours, _, params, _ = _pair(info, kwargs)
    calls: list[str] = []
    handles = [
        ours.register_step_pre_hook(lambda opt, args, kw: calls.append("pre")),
        ours.register_step_post_hook(lambda opt, args, kw: calls.append("post")),
        register_optimizer_step_pre_hook(lambda opt, args, kw: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda opt, args, kw: calls.append("global post")),
    ]
    _set_grads(params)
    try:
        try:
            ours.step()
        except AssertionError:  # capturable on CPU: torch's error (test_steps_like_torch)
            assert kwargs.get("capturable")
            assert calls == ["global pre", "pre"]
            return
        assert calls == ["global pre", "pre", "post", "global post"]
    finally:
        for h in handles:
            h.remove()
    ours.step()
    assert calls == ["global pre", "pre", "post", "global post"]


@pytest.mark.parametrize(("info", "kwargs"), CASES)
def test_state_dict_hooks(info, kwargs):
    ours, _, params, _ = _pair(info, kwargs)
    calls: list[str] = []

    def post(opt: Any, sd: dict[str, Any]) -> dict[str, Any]:
        calls.append("post")
        sd["param_groups"][0]["marker"] = 1
        return sd

    def load_pre(opt: Any, sd: dict[str, Any]) -> dict[str, Any]:
        calls.append("load pre")
        sd = copy.deepcopy(sd)
        sd["param_groups"][0]["marker"] = 2
        return sd

    ours.register_state_dict_pre_hook(lambda opt: calls.append("pre"))
    ours.register_state_dict_post_hook(post)
    ours.register_load_state_dict_pre_hook(load_pre)
    ours.register_load_state_dict_post_hook(lambda opt: calls.append("load post"))
    sd = ours.state_dict()
    assert calls == ["pre", "post"] and sd["param_groups"][0]["marker"] == 1
    ours.load_state_dict(sd)
    assert calls == ["pre", "post", "load pre", "load post"]
    assert ours.param_groups[0]["marker"] == 2


@pytest.mark.parametrize(("info", "kwargs"), CASES)
def test_repr_is_torchs_plus_regoptims_keys(info, kwargs):
    ours, theirs, _, _ = _pair(info, kwargs)
    ours_lines, theirs_lines = repr(ours).splitlines(), repr(theirs).splitlines()
    assert ours_lines[0] == f"{type(ours).__name__} ("
    assert theirs_lines[0] == f"{info.name} ("
    assert set(theirs_lines[1:]) <= set(ours_lines[1:])
    extra = [line for line in ours_lines[1:] if line not in theirs_lines]
    assert {line.split(":")[0].strip() for line in extra} == EXTRA_KEYS[info.name]


@pytest.mark.parametrize(("info", "kwargs"), CASES)
def test_deepcopy_copies_all_public_attrs(info, kwargs):
    # leaf parameters even for differentiable inputs: deepcopy refuses tensors inside a graph
    ours_p, theirs_p = _params({}), _params({})
    ours = OURS[info.name](ours_p, **copy.deepcopy(kwargs))
    theirs = info.optim_cls(theirs_p, **copy.deepcopy(kwargs))
    for params in (ours_p, theirs_p):
        _set_grads(params)
    # capturable cannot step on CPU (test_steps_like_torch); a differentiable step on leaves is
    # an error in torch too
    if not (kwargs.get("capturable") or kwargs.get("differentiable")):
        assert _step_both(ours, theirs)
    clone = copy.deepcopy(ours)

    def public(obj: Any) -> set[str]:
        return {k for k in vars(obj) if not k.startswith("_")}

    assert public(clone) == public(ours) == public(theirs)
    assert clone.defaults.keys() == ours.defaults.keys()
    assert len(clone.state) == len(ours.state) == len(theirs.state)
    for p, q in zip(ours_p, clone.param_groups[0]["params"], strict=True):
        assert set(clone.state[q]) == set(ours.state[p])
        for key, value in ours.state[p].items():
            assert clone.state[q][key] is not value and torch.equal(clone.state[q][key], value)
    for p, q in zip(ours.param_groups[0]["params"], clone.param_groups[0]["params"], strict=True):
        assert p is not q and torch.equal(p, q)


@pytest.mark.parametrize(("info", "kwargs"), CASES)
def test_loads_an_older_state_dict_as_torch_does(info, kwargs):
    """A state dict from before the newer flags (no foreach/fused/capturable/differentiable keys,
    a Python-number ``step``) loads and steps on, in ours exactly when in torch's."""
    if kwargs.get("differentiable"):
        pytest.skip(SKIP_DIFFERENTIABLE_CHECKPOINT)
    ours, theirs, ours_p, theirs_p = _pair(info, kwargs)
    for params in (ours_p, theirs_p):
        _set_grads(params)
    if not _step_both(ours, theirs):
        return
    for opt in (ours, theirs):
        sd = copy.deepcopy(opt.state_dict())
        for group in sd["param_groups"]:
            for key in ("foreach", "fused", "capturable", "differentiable"):
                group.pop(key, None)
        for state in sd["state"].values():
            if "step" in state:
                state["step"] = float(state["step"])
        opt.load_state_dict(sd)
        for state in opt.state.values():
            if "step" in state:
                assert torch.is_tensor(state["step"])
    assert _step_both(ours, theirs)
    for a, b in zip(ours_p, theirs_p, strict=True):
        torch.testing.assert_close(a, b)


ERROR_CASES = [
    pytest.param(info, err, id=f"{OURS[info.name].__name__}-{err.optimizer_error_input.desc}")
    for info in INFOS
    for err in info.optim_error_inputs_func(device="cpu", dtype=torch.float32)
]


@pytest.mark.parametrize(("info", "err"), ERROR_CASES)
def test_torch_error_inputs_raise_torchs_error(info, err):
    inp = err.optimizer_error_input
    assert err.error_on == common.OptimizerErrorEnum.CONSTRUCTION_ERROR  # all of torch's CPU ones

    def build(cls: type) -> None:
        params = inp.params if inp.params is not None else [torch.nn.Parameter(torch.ones(2))]
        cls(params, **copy.deepcopy(inp.kwargs))

    if issubclass(err.error_type, Warning):
        for cls in (info.optim_cls, OURS[info.name]):
            with pytest.warns(err.error_type, match=err.error_regex):
                build(cls)
        return
    with pytest.raises(err.error_type, match=err.error_regex) as theirs:
        build(info.optim_cls)
    with pytest.raises(err.error_type, match=err.error_regex) as ours:
        build(OURS[info.name])
    assert str(ours.value) == str(theirs.value)


NUMPY_VALUES = [
    ("lr", np.float32(0.01)),
    ("lr", np.int64(1)),
    ("lr", np.float64(0.01)),
    ("lr", np.float32(-0.01)),
    ("weight_decay", np.float32(0.1)),
    ("weight_decay", np.float32(-0.1)),
    ("momentum", np.float32(0.9)),
    ("momentum", np.float32(-0.9)),
    ("dampening", np.float32(0.5)),
    ("eps", np.float32(1e-6)),
    ("eps", np.float32(-1e-6)),
    ("betas", (np.float32(0.9), np.float32(0.99))),  # torch: not floats
    ("betas", (np.float64(0.9), np.float64(0.99))),  # np.float64 is a float
    ("betas", (np.float64(1.0), np.float64(0.99))),
]


@pytest.mark.parametrize(
    ("info", "key", "value"),
    [
        pytest.param(info, key, value, id=f"{OURS[info.name].__name__}-{key}={value!r}")
        for info in INFOS
        for key, value in NUMPY_VALUES
        if key in info.optim_cls.__init__.__code__.co_varnames
    ],
)
def test_numpy_scalars_accepted_where_torch_accepts_them(info, key, value):
    kwargs = {key: value, **({"momentum": 0.9} if key == "dampening" else {})}
    try:
        info.optim_cls([torch.nn.Parameter(torch.ones(2))], **kwargs)
    except Exception as exc:
        with pytest.raises(type(exc), match=f"^{re.escape(str(exc))}$"):
            OURS[info.name]([torch.nn.Parameter(torch.ones(2))], **kwargs)
        return
    p = torch.nn.Parameter(torch.ones(2))
    opt = OURS[info.name]([p], **kwargs, l1=np.float32(0.01))
    p.grad = torch.ones(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    assert torch.isfinite(p).all() and not torch.equal(p, torch.ones(2))

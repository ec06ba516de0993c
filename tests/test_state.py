"""Checkpoints: state_dict round trips, exact resume, deepcopy/pickle, torch.optim interop."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from _helpers import IMPLS, set_grads
from registry import ADAM, ADAMW, OPTIMIZERS, SGD

REG = {
    "ProxSGD": dict(lr=0.1, momentum=0.9, weight_decay=0.01, decoupled_weight_decay=True, l1=0.01),
    "ProxAdam": dict(lr=0.01, weight_decay=0.01, amsgrad=True, l1=0.01),
    "ProxAdamW": dict(lr=0.01, weight_decay=0.05, l1=0.01),
}
PLAIN = {
    "ProxSGD": dict(lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    "ProxAdam": dict(lr=0.01, weight_decay=0.01, amsgrad=True),
    "ProxAdamW": dict(lr=0.01, weight_decay=0.05),
}


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))


def _run(model, opt, steps, start=0):
    params = list(model.parameters())
    for s in range(start, start + steps):
        set_grads(params, s)
        opt.step()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for x, y in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_resume_from_checkpoint_is_bit_identical(info, impl):
    cfg = {**REG[info.name], **IMPLS[impl]}
    straight = _model()
    opt = info.cls(straight.parameters(), **cfg)
    _run(straight, opt, 10)

    first = _model()
    opt1 = info.cls(first.parameters(), **cfg)
    _run(first, opt1, 5)
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)

    resumed = _model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = info.cls(resumed.parameters(), **cfg)
    opt2.load_state_dict(ckpt["optim"])
    _run(resumed, opt2, 5, start=5)
    _same(straight, resumed)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_state_dict_round_trip_keeps_hyperparameters(info):
    model = _model()
    opt = info.cls(model.parameters(), **REG[info.name])
    _run(model, opt, 2)
    sd = opt.state_dict()
    opt2 = info.cls(_model().parameters(), lr=0.5)
    opt2.load_state_dict(sd)
    assert opt2.param_groups[0]["l1"] == REG[info.name]["l1"]
    assert opt2.param_groups[0]["lr"] == REG[info.name]["lr"]
    assert opt2.state_dict()["state"].keys() == sd["state"].keys()


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_deepcopy_and_pickle(info):
    model = _model()
    opt = info.cls(model.parameters(), **REG[info.name])
    _run(model, opt, 3)
    twin_model = copy.deepcopy(model)
    twin = info.cls(twin_model.parameters(), **REG[info.name])
    twin.load_state_dict(copy.deepcopy(opt.state_dict()))
    clone = pickle.loads(pickle.dumps(opt))
    assert type(clone) is info.cls
    assert clone.param_groups[0]["l1"] == REG[info.name]["l1"]
    _run(model, opt, 3, start=3)
    _run(twin_model, twin, 3, start=3)
    _same(model, twin_model)


STATE_KEYS = {
    "ProxSGD": {"momentum_buffer"},
    "ProxAdam": {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"},
    "ProxAdamW": {"step", "exp_avg", "exp_avg_sq"},
}


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_state_keys_are_torchs(info):
    model = _model()
    opt = info.cls(model.parameters(), **REG[info.name])
    _run(model, opt, 1)
    for p in model.parameters():
        assert set(opt.state[p]) == STATE_KEYS[info.name]


@pytest.mark.parametrize("direction", ["torch_to_regoptim", "regoptim_to_torch"])
@pytest.mark.parametrize("info", [SGD, ADAM, ADAMW], ids=lambda i: i.name)
def test_torch_state_dict_interop(info, direction):
    """A checkpoint of either library loads into the other and continues identically."""
    cfg = {**PLAIN[info.name], "foreach": False}
    src_cls, dst_cls = (
        (info.torch_cls, info.cls)
        if direction == "torch_to_regoptim"
        else (info.cls, info.torch_cls)
    )
    model = _model()
    src = src_cls(model.parameters(), **cfg)
    _run(model, src, 4)
    sd = copy.deepcopy(src.state_dict())

    reference_model = copy.deepcopy(model)
    _run(model, src, 4, start=4)

    dst = dst_cls(reference_model.parameters(), lr=123.0)
    dst.load_state_dict(sd)
    _run(reference_model, dst, 4, start=4)
    _same(model, reference_model)
    if dst_cls is info.cls:
        assert dst.param_groups[0]["l1"] == 0.0
        if info is ADAMW:
            assert dst.param_groups[0]["decoupled_weight_decay"] is True

"""Checkpoints: torch.distributed.checkpoint round trips, and torch.optim <-> regoptim state_dicts.

* ``get_optimizer_state_dict`` / ``dcp.save`` / ``dcp.load`` / ``set_optimizer_state_dict`` (in one
  process, DCP's no-process-group mode): training resumed from the checkpoint continues bitwise as
  the uninterrupted run, L1 zeros and all.
* A plain ``state_dict()`` of torch.optim.SGD/Adam/AdamW loads into ProxSGD/ProxAdam/ProxAdamW (and
  the other way round) and the run continues bitwise as the original optimizer would have.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import regoptim
from tests._stack_helpers import (
    COUNTERPART,
    EAGER_PATHS,
    FUSED_PATHS,
    assert_params_equal,
    assert_state_equal,
    loss_fn,
    make_batches,
    make_model,
    on_path,
    params_of,
    skip_unless_torch_parity_verified,
)

BATCHES = make_batches(6)

OPTIMIZERS = [
    pytest.param(
        regoptim.ProxSGD,
        {
            "lr": 0.1,
            "momentum": 0.9,
            "weight_decay": 1e-2,
            "decoupled_weight_decay": True,
            "l1": 0.2,
        },
        id="ProxSGD",
    ),
    pytest.param(regoptim.ProxAdam, {"lr": 2e-2, "weight_decay": 1e-2, "l1": 0.5}, id="ProxAdam"),
    pytest.param(
        regoptim.ProxAdamW,
        {"lr": torch.tensor(2e-2), "weight_decay": 1e-2, "l1": 0.5, "amsgrad": True},
        id="ProxAdamW-tensor-lr",
    ),
]


def _fresh(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}


def _steps(model: torch.nn.Module, opt: Any, batches: list[Any]) -> None:
    for x, y in batches:
        opt.zero_grad()
        loss_fn(model, x, y).backward()
        opt.step()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("path", [*EAGER_PATHS, FUSED_PATHS[0]])
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_dcp_save_load_resumes_identically(
    cls: type, kwargs: dict[str, Any], path: dict[str, Any], tmp_path: Any
) -> None:
    if isinstance(kwargs["lr"], torch.Tensor) and path.get("foreach"):
        pytest.skip("a tensor lr with foreach=True is rejected, as by torch.optim.Adam")
    with on_path(path) as path_kwargs:
        kwargs = {**kwargs, **path_kwargs}
        # the uninterrupted run
        model = make_model()
        opt = cls(model.parameters(), **_fresh(kwargs))
        _steps(model, opt, BATCHES[:3])
        dcp.save(
            {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
            checkpoint_id=str(tmp_path),
        )
        _steps(model, opt, BATCHES[3:])

        # a new process would start from scratch: other initial weights, no optimizer state
        resumed = make_model(seed=123)
        ropt = cls(resumed.parameters(), **_fresh(kwargs))
        state = {
            "model": get_model_state_dict(resumed),
            "optim": get_optimizer_state_dict(resumed, ropt),
        }
        dcp.load(state, checkpoint_id=str(tmp_path))
        set_model_state_dict(resumed, state["model"])
        set_optimizer_state_dict(resumed, ropt, state["optim"])
        _steps(resumed, ropt, BATCHES[3:])

        assert_params_equal(params_of(resumed), params_of(model))
        assert_state_equal(ropt.state_dict(), opt.state_dict())
        assert any(bool((p == 0).any()) for p in resumed.parameters())


# --- torch.optim <-> regoptim plain state_dicts ------------------------------------------------

INTEROP = [
    pytest.param(regoptim.ProxSGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2}, id="SGD"),
    pytest.param(
        regoptim.ProxSGD,
        {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
        id="SGD-nesterov",
    ),
    pytest.param(regoptim.ProxAdam, {"lr": 2e-2, "weight_decay": 1e-2}, id="Adam"),
    pytest.param(regoptim.ProxAdam, {"lr": 2e-2, "amsgrad": True}, id="Adam-amsgrad"),
    pytest.param(regoptim.ProxAdamW, {"lr": 2e-2, "weight_decay": 1e-2}, id="AdamW"),
]


def _continue_from(
    src_cls: type, dst_cls: type, kwargs: dict[str, Any]
) -> tuple[list[torch.Tensor], list[torch.Tensor], Any, Any]:
    """Train src 3 steps, checkpoint; continue src 3 steps, and dst loaded from the checkpoint."""
    model = make_model()
    src = src_cls(model.parameters(), **kwargs)
    _steps(model, src, BATCHES[:3])
    sd = copy.deepcopy(src.state_dict())
    model_sd = copy.deepcopy(model.state_dict())
    _steps(model, src, BATCHES[3:])

    other = make_model(seed=7)
    other.load_state_dict(model_sd)
    dst = dst_cls(other.parameters(), **kwargs)
    dst.load_state_dict(sd)
    _steps(other, dst, BATCHES[3:])
    return params_of(other), params_of(model), dst, src


@pytest.mark.parametrize("direction", ["torch->regoptim", "regoptim->torch"])
@pytest.mark.parametrize("flags", [{"foreach": False}, {"foreach": True}], ids=["loop", "foreach"])
@pytest.mark.parametrize("cls,kwargs", INTEROP)
def test_torch_state_dict_interop(
    cls: type, kwargs: dict[str, Any], flags: dict[str, Any], direction: str
) -> None:
    torch_cls = COUNTERPART[cls]
    src, dst = (torch_cls, cls) if direction == "torch->regoptim" else (cls, torch_cls)
    got, expected, dst_opt, src_opt = _continue_from(src, dst, {**kwargs, **flags})
    assert_params_equal(got, expected)
    assert_state_equal(dst_opt.state_dict(), src_opt.state_dict())
    if isinstance(dst_opt, regoptim.ProxSGD | regoptim.ProxAdam):
        group = dst_opt.param_groups[0]
        assert group["l1"] == 0.0
        assert group["decoupled_weight_decay"] == (cls is regoptim.ProxAdamW)


@pytest.mark.parametrize("cls,kwargs", INTEROP)
def test_torch_fused_checkpoint_loads_into_regoptim(cls: type, kwargs: dict[str, Any]) -> None:
    """A checkpoint of torch's fused CPU optimizer (``fused=True`` in its param_groups) loads into
    regoptim, which then runs its own fused kernel (the C++ CPU kernel here): equal to torch's fused
    kernel continuing, bit for bit (the kernel mirrors torch's rounding in float32)."""
    path = FUSED_PATHS[0]
    if path.marks:
        pytest.skip(path.marks[0].kwargs["reason"])
    skip_unless_torch_parity_verified()
    with on_path(path.values[0]):
        got, expected, dst_opt, _ = _continue_from(COUNTERPART[cls], cls, {**kwargs, "fused": True})
    assert dst_opt.param_groups[0]["fused"] is True
    assert_params_equal(got, expected)

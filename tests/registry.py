"""Registry of regoptim's optimizers: their torch.optim counterparts, references, valid
configurations and error inputs. Generic tests iterate over it (as torch's common_optimizers)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import regoptim
from regoptim import reference


@dataclass
class OptimInfo:
    name: str
    cls: type[torch.optim.Optimizer]
    torch_cls: type[torch.optim.Optimizer]
    ref: Callable[..., torch.Tensor]
    # configurations that include regoptim's regularizers (compared with the reference)
    configs: list[dict[str, Any]]
    # configurations with regularization off (compared with torch.optim, bit for bit)
    torch_configs: list[dict[str, Any]]
    # (kwargs, exception type, regex the message must match); where torch.optim makes the same
    # check, the message is torch's (tests/test_torch_generic.py also runs torch's own error inputs)
    error_inputs: list[tuple[dict[str, Any], type[Exception], str]] = field(default_factory=list)
    # keys the torch counterpart does not know
    extra_keys: tuple[str, ...] = ()

    def ref_kwargs(self, config: dict[str, Any]) -> dict[str, Any]:
        out = dict(config)
        for k in ("foreach", "fused"):
            out.pop(k, None)
        if self.name == "ProxAdamW":
            out["decoupled_weight_decay"] = True
            out.setdefault("weight_decay", 1e-2)
        lr = out.get("lr", 1e-3)
        out["lr"] = float(lr)
        return out


def _sgd_configs(reg: bool) -> list[dict[str, Any]]:
    out = []
    for momentum, dampening, nesterov, wd, maximize in itertools.product(
        (0.0, 0.9), (0.0, 0.3), (False, True), (0.0, 0.05), (False, True)
    ):
        if nesterov and (momentum == 0 or dampening != 0):
            continue
        if momentum == 0 and dampening != 0:
            continue
        base = dict(
            lr=0.1, momentum=momentum, dampening=dampening, nesterov=nesterov,
            weight_decay=wd, maximize=maximize,
        )  # fmt: skip
        if not reg:
            out.append(base)
            continue
        for decoupled, l1 in itertools.product((False, True), (0.0, 0.05)):
            if not decoupled and l1 == 0.0:
                continue  # torch's own math: covered by the torch configs
            if decoupled and wd == 0.0 and l1 == 0.0:
                continue
            out.append({**base, "decoupled_weight_decay": decoupled, "l1": l1})
    return out


def _adam_configs(reg: bool, adamw: bool) -> list[dict[str, Any]]:
    out = []
    for amsgrad, wd, maximize, betas in itertools.product(
        (False, True), (0.0, 0.05), (False, True), ((0.9, 0.999), (0.5, 0.8))
    ):
        base = dict(lr=0.05, amsgrad=amsgrad, weight_decay=wd, maximize=maximize, betas=betas)
        if not reg:
            out.append(base)
            continue
        decoupled_options = (True,) if adamw else (False, True)
        for decoupled in decoupled_options:
            cfg = {**base, "l1": 0.02}
            if not adamw:
                cfg["decoupled_weight_decay"] = decoupled
            out.append(cfg)
    return out


_COMMON_ERRORS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"lr": -1.0}, ValueError, r"^Invalid learning rate: -1\.0$"),
    ({"lr": torch.tensor(-1.0)}, ValueError, r"^Invalid learning rate: -1\.0$"),
    ({"lr": float("nan")}, ValueError, r"learning rate: nan"),
    ({"lr": float("inf")}, ValueError, r"learning rate: inf"),
    ({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"^Tensor lr must be 1-element$"),
    ({"lr": torch.tensor(0.1, requires_grad=True)}, ValueError, r"differentiable=True"),
    ({"lr": np.int64(-1)}, ValueError, r"^Invalid learning rate: -1$"),
    ({"weight_decay": -0.1}, ValueError, r"^Invalid weight_decay value: -0\.1$"),
    ({"weight_decay": np.float32(-0.5)}, ValueError, r"^Invalid weight_decay value: -0\.5$"),
    ({"weight_decay": float("nan")}, ValueError, r"weight_decay value: nan"),
    ({"l1": -1e-3}, ValueError, r"l1 value: -0\.001"),
    ({"l1": float("inf")}, ValueError, r"l1 value: inf"),
    ({"l1": float("nan")}, ValueError, r"l1 value: nan"),
    ({"l1": "0.1"}, TypeError, r"l1: expected a float"),
    ({"l1": np.bool_(True)}, TypeError, r"l1: expected a float"),
    ({"maximize": 1}, TypeError, r"maximize: expected a bool"),
    ({"differentiable": None}, TypeError, r"differentiable: expected a bool, got None"),
    ({"foreach": True, "fused": True}, RuntimeError, r"`fused` and `foreach` cannot be `True`"),
    (
        {"fused": True, "differentiable": True},
        RuntimeError,
        r"`fused` does not support `differentiable`",
    ),
    ({"l2": 0.1}, TypeError, r"l2"),
]

SGD = OptimInfo(
    name="ProxSGD",
    cls=regoptim.ProxSGD,
    torch_cls=torch.optim.SGD,
    ref=reference.sgd_step,
    configs=_sgd_configs(reg=True),
    torch_configs=_sgd_configs(reg=False),
    error_inputs=_COMMON_ERRORS
    + [
        ({"momentum": -0.5}, ValueError, r"^Invalid momentum value: -0\.5$"),
        ({"momentum": float("nan")}, ValueError, r"momentum value: nan"),
        ({"momentum": float("inf")}, ValueError, r"momentum value: inf"),
        ({"dampening": 1.5}, ValueError, r"dampening value: 1\.5"),
        (
            {"nesterov": True},
            ValueError,
            r"^Nesterov momentum requires a momentum and zero dampening \(got momentum=0, dampening=0\)$",
        ),
        ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError, r"dampening=0\.1"),
    ],
    extra_keys=("decoupled_weight_decay", "l1", "group_l1", "group_axes"),
)

_ADAM_ERRORS = _COMMON_ERRORS + [
    ({"eps": -1e-8}, ValueError, r"^Invalid epsilon value: -1e-08$"),
    ({"eps": float("nan")}, ValueError, r"^Invalid epsilon value: nan \(eps must be"),
    ({"betas": (1.0, 0.999)}, ValueError, r"^Invalid beta parameter at index 0: 1\.0$"),
    ({"betas": (0.9, -0.1)}, ValueError, r"^Invalid beta parameter at index 1: -0\.1$"),
    ({"betas": (0.9, float("nan"))}, ValueError, r"^Invalid beta parameter at index 1: nan$"),
    ({"betas": (torch.tensor(1.0), torch.tensor(0.9))}, ValueError, r"^Invalid beta parameter at index 0: 1\.0$"),
    ({"betas": (0.9, "0.99")}, TypeError, r"beta parameter at index 1: expected a float or Tensor, got str"),
    ({"betas": (0.9,)}, ValueError, r"betas"),
    # torch's rules: both floats (not ints, not numpy float32) or both tensors
    ({"betas": (0, 0.999)}, ValueError, r"^betas must be either both floats or both Tensors$"),
    ({"betas": (np.float32(0.9), np.float32(0.99))}, ValueError, r"^betas must be either both floats"),
    ({"betas": (torch.tensor(0.9), 0.99)}, ValueError, r"^betas must be either both floats"),
    ({"betas": (torch.tensor(0.9), torch.tensor([0.9, 0.99]))}, ValueError, r"^Tensor betas\[1\] must be 1-element$"),
    ({"betas": (torch.tensor(0.9), torch.tensor(0.99)), "foreach": True}, ValueError,
     r"^betas\[0\] as a Tensor is not supported for capturable=False and foreach=True$"),
    ({"lr": torch.tensor(0.01), "foreach": True}, ValueError,
     r"^lr as a Tensor is not supported for capturable=False and foreach=True$"),
    ({"capturable": 1}, TypeError, r"capturable: expected a bool, got 1"),
]  # fmt: skip

ADAM = OptimInfo(
    name="ProxAdam",
    cls=regoptim.ProxAdam,
    torch_cls=torch.optim.Adam,
    ref=reference.adam_step,
    configs=_adam_configs(reg=True, adamw=False),
    torch_configs=_adam_configs(reg=False, adamw=False),
    error_inputs=_ADAM_ERRORS,
    extra_keys=("l1", "group_l1", "group_axes"),
)

ADAMW = OptimInfo(
    name="ProxAdamW",
    cls=regoptim.ProxAdamW,
    torch_cls=torch.optim.AdamW,
    ref=reference.adam_step,
    configs=_adam_configs(reg=True, adamw=True),
    torch_configs=_adam_configs(reg=False, adamw=True),
    error_inputs=_ADAM_ERRORS,
    extra_keys=("l1", "group_l1", "group_axes"),
)

OPTIMIZERS = [SGD, ADAM, ADAMW]


def config_id(config: dict[str, Any]) -> str:
    parts = []
    for k, v in config.items():
        if isinstance(v, bool):
            if v:
                parts.append(k)
        elif isinstance(v, tuple):
            parts.append(f"{k}={','.join(str(x) for x in v)}")
        else:
            parts.append(f"{k}={v}")
    return "-".join(parts) or "default"


def cases(attr: str) -> list[Any]:
    """pytest params over (optim info, config) with readable ids."""
    import pytest

    return [
        pytest.param(info, cfg, id=f"{info.name}-{config_id(cfg)}")
        for info in OPTIMIZERS
        for cfg in getattr(info, attr)
    ]

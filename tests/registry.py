"""Registry of regoptim's optimizers: their torch.optim counterparts, references, valid
configurations and error inputs. Generic tests iterate over it (as torch's common_optimizers)."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

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
    # (kwargs, exception type, regex the message must match)
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
    ({"lr": -1.0}, ValueError, r"learning rate: -1\.0"),
    ({"lr": float("nan")}, ValueError, r"learning rate: nan"),
    ({"lr": float("inf")}, ValueError, r"learning rate: inf"),
    ({"lr": torch.tensor([0.1, 0.2])}, ValueError, r"learning rate.*1-element"),
    ({"weight_decay": -0.1}, ValueError, r"weight_decay value: -0\.1"),
    ({"weight_decay": float("nan")}, ValueError, r"weight_decay value: nan"),
    ({"l1": -1e-3}, ValueError, r"l1 value: -0\.001"),
    ({"l1": float("inf")}, ValueError, r"l1 value: inf"),
    ({"l1": float("nan")}, ValueError, r"l1 value: nan"),
    ({"l1": "0.1"}, TypeError, r"l1: expected a float"),
    ({"maximize": 1}, TypeError, r"maximize: expected a bool"),
    ({"foreach": True, "fused": True}, RuntimeError, r"`fused` and `foreach` cannot be `True`"),
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
        ({"momentum": -0.5}, ValueError, r"momentum value: -0\.5"),
        ({"momentum": float("nan")}, ValueError, r"momentum value: nan"),
        ({"momentum": float("inf")}, ValueError, r"momentum value: inf"),
        ({"dampening": 1.5}, ValueError, r"dampening value: 1\.5"),
        ({"nesterov": True}, ValueError, r"Nesterov.*momentum=0\.0"),
        ({"nesterov": True, "momentum": 0.9, "dampening": 0.1}, ValueError, r"dampening=0\.1"),
    ],
    extra_keys=("decoupled_weight_decay", "l1"),
)

_ADAM_ERRORS = _COMMON_ERRORS + [
    ({"eps": -1e-8}, ValueError, r"eps value: -1e-08"),
    ({"eps": float("nan")}, ValueError, r"eps value: nan"),
    ({"betas": (1.0, 0.999)}, ValueError, r"beta parameter at index 0 value: 1\.0"),
    ({"betas": (0.9, -0.1)}, ValueError, r"beta parameter at index 1 value: -0\.1"),
    ({"betas": (0.9, float("nan"))}, ValueError, r"beta parameter at index 1 value: nan"),
    ({"betas": (0.9,)}, ValueError, r"betas"),
    ({"lr": torch.tensor(0.01), "foreach": True}, ValueError, r"Tensor lr.*foreach=True"),
]

ADAM = OptimInfo(
    name="ProxAdam",
    cls=regoptim.ProxAdam,
    torch_cls=torch.optim.Adam,
    ref=reference.adam_step,
    configs=_adam_configs(reg=True, adamw=False),
    torch_configs=_adam_configs(reg=False, adamw=False),
    error_inputs=_ADAM_ERRORS,
    extra_keys=("l1",),
)

ADAMW = OptimInfo(
    name="ProxAdamW",
    cls=regoptim.ProxAdamW,
    torch_cls=torch.optim.AdamW,
    ref=reference.adam_step,
    configs=_adam_configs(reg=True, adamw=True),
    torch_configs=_adam_configs(reg=False, adamw=True),
    error_inputs=_ADAM_ERRORS,
    extra_keys=("l1",),
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

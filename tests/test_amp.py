"""torch.amp.GradScaler + autocast(bfloat16) on every path regoptim runs on CPU.

A step whose scaled gradients overflow must leave the parameters and all optimizer state untouched
(on a skipped first step no momentum buffer / Adam moment may be left behind that the next, real
first step would see). Every other step must equal the unscaled math: the same model trained
without a scaler on the same batches, minus the overflowing one. GradScaler's scales are powers of
two, so scaling and unscaling are exact and the comparison is bitwise.

On the eager paths GradScaler unscales the gradients and skips ``step()`` itself; with
``fused=True`` regoptim sets ``_step_supports_amp_scaling`` and GradScaler hands ``grad_scale`` and
``found_inf`` to ``step()`` instead, so the skip and the unscale are regoptim's.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import regoptim
from tests._stack_helpers import (
    ALL_PATHS,
    assert_params_equal,
    assert_state_equal,
    loss_fn,
    make_batches,
    make_model,
    on_path,
    params_of,
)

N_STEPS = 4

OPTIMIZERS = [
    pytest.param(
        regoptim.ProxSGD,
        {
            "lr": 0.05,
            "momentum": 0.9,
            "weight_decay": 1e-2,
            "decoupled_weight_decay": True,
            "l1": 0.2,
        },
        id="ProxSGD",
    ),
    pytest.param(regoptim.ProxAdam, {"lr": 1e-2, "weight_decay": 1e-2, "l1": 0.5}, id="ProxAdam"),
    pytest.param(
        regoptim.ProxAdamW,
        {"lr": 1e-2, "weight_decay": 1e-2, "l1": 0.5, "amsgrad": True},
        id="ProxAdamW",
    ),
]


def _batches(overflow_at: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = make_batches(N_STEPS)
    x, y = batches[overflow_at]
    # a target near float32's max: the squared error is inf and the scaled gradient overflows
    batches[overflow_at] = (x, torch.full_like(y, 3e38))
    return batches


def _is_fresh_state(state: dict[str, Any]) -> bool:
    """State that is indistinguishable from none: step 0 and zero moments (torch's fused Adam
    creates it before the kernel sees found_inf)."""
    return all((float(v) == 0.0) if k == "step" else bool((v == 0).all()) for k, v in state.items())


def _train(
    cls: type,
    kwargs: dict[str, Any],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    scaler: torch.amp.GradScaler | None,
    overflow_at: int,
    clip: bool,
) -> tuple[list[torch.Tensor], Any, list[bool]]:
    model = make_model()
    opt = cls(model.parameters(), **kwargs)
    skipped = []
    for t, (x, y) in enumerate(batches):
        if scaler is None and t == overflow_at:
            continue  # the unscaled run never sees the overflowing batch
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, x, y)
        if scaler is None:
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            continue
        scaler.scale(loss).backward()
        if clip:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        before_params = params_of(model)
        before_state = copy.deepcopy(opt.state_dict())
        scale_before = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped.append(scaler.get_scale() < scale_before)
        if t == overflow_at:
            assert skipped[-1], "the overflowing step was not detected"
            assert_params_equal(params_of(model), before_params)
            after = opt.state_dict()
            if t == 0:
                # nothing may be left behind that the next (real) first step would pick up
                for s in after["state"].values():
                    assert "momentum_buffer" not in s
                    assert _is_fresh_state(s), s
            else:
                assert_state_equal(after, before_state)
    return params_of(model), opt, skipped


@pytest.mark.parametrize(
    "overflow_at,clip",
    [(0, False), (2, False), (2, True)],
    ids=["first-step-overflows", "step2-overflows", "step2-overflows-unscale+clip"],
)
@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize("cls,kwargs", OPTIMIZERS)
def test_grad_scaler_skips_overflow_and_matches_unscaled(
    cls: type, kwargs: dict[str, Any], path: dict[str, Any], overflow_at: int, clip: bool
) -> None:
    with on_path(path) as path_kwargs:
        _check_amp(cls, {**kwargs, **path_kwargs}, overflow_at, clip)


def _check_amp(cls: type, kwargs: dict[str, Any], overflow_at: int, clip: bool) -> None:
    batches = _batches(overflow_at)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=10_000)
    params, opt, skipped = _train(
        cls, kwargs, batches, scaler=scaler, overflow_at=overflow_at, clip=clip
    )
    assert skipped == [t == overflow_at for t in range(N_STEPS)]
    if kwargs.get("fused"):
        assert opt._step_supports_amp_scaling  # GradScaler handed grad_scale/found_inf to step()
    ref_params, ref_opt, _ = _train(
        cls, kwargs, batches, scaler=None, overflow_at=overflow_at, clip=clip
    )
    assert_params_equal(params, ref_params)
    assert_state_equal(opt.state_dict(), ref_opt.state_dict())
    assert any(bool((p == 0).any()) for p in params), "l1 produced no exact zeros"


@pytest.mark.parametrize("path", ALL_PATHS)
def test_first_step_skipped_creates_no_momentum_buffer(path: dict[str, Any]) -> None:
    model = make_model()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    x, y = _batches(0)[0]
    with on_path(path) as kwargs:
        opt = regoptim.ProxSGD(model.parameters(), lr=0.1, momentum=0.9, **kwargs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model, x, y)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert all("momentum_buffer" not in s for s in opt.state.values())

"""Shared test helpers: parameters, gradients and state snapshots for reference comparisons."""

from __future__ import annotations

from typing import Any

import torch

# implementation selections of the eager paths; "default" is foreach=None, fused=None
IMPLS: dict[str, dict[str, Any]] = {
    "loop": {"foreach": False},
    "foreach": {"foreach": True},
    "default": {},
}

SHAPES = [(5, 7), (), (3,), (0,)]


def make_params(dtype: torch.dtype, shapes: list[tuple[int, ...]] = SHAPES, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    real = torch.float64 if not dtype.is_complex else torch.complex128
    return [torch.randn(s, generator=g, dtype=real).to(dtype).requires_grad_() for s in shapes]


def set_grads(params: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    grads = []
    for p in params:
        real = torch.complex128 if p.is_complex() else torch.float64
        gr = torch.randn(p.shape, generator=g, dtype=real).to(p.dtype)
        p.grad = gr.clone()
        grads.append(gr)
    return grads


def ref_state(state: dict[str, Any]) -> dict[str, Any]:
    """float64 copy of an optimizer's per-parameter state, in the reference's format."""
    out: dict[str, Any] = {}
    for k, v in state.items():
        if k == "step":
            out[k] = int(float(v))
        elif isinstance(v, torch.Tensor):
            out[k] = v.detach().to(torch.complex128 if v.is_complex() else torch.float64).clone()
        else:
            out[k] = v
    return out


def clone_params(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone().requires_grad_() for p in params]


def assert_torch_fused_parity(a: torch.Tensor, b: torch.Tensor) -> None:
    """``a`` (regoptim's fused CPU kernel) against ``b`` (torch's fused CPU kernel): bitwise on
    the capabilities where regoptim verifies its mirroring of torch's rounding, else within one
    ulp (see ``regoptim.backends.cpu.capability``)."""
    from regoptim.backends.cpu.capability import torch_kernel_numerics

    if torch_kernel_numerics().verified or not a.is_floating_point():
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
        return
    ulp = (torch.nextafter(b, torch.full_like(b, float("inf"))) - b).abs()
    assert bool(((a - b).abs() <= ulp).all()), f"more than one ulp apart: {(a - b).abs().max()}"


def sgd_backend_step(fn: Any, params, grads, bufs, *, is_first_step: bool = False,
                     grad_scale=None, found_inf=None, **hyper: Any) -> None:  # fmt: skip
    """Call a fused backend's ``fused_prox_sgd_`` with the hyperparameters as keywords."""
    from regoptim.hyper import SgdHyper

    fn(params, grads, bufs, SgdHyper(**hyper), is_first_step=is_first_step,
       grad_scale=grad_scale, found_inf=found_inf)  # fmt: skip


def adam_backend_step(fn: Any, params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *,
                      grad_scale=None, found_inf=None, **hyper: Any) -> None:  # fmt: skip
    """Call a fused backend's ``fused_prox_adam_`` with the hyperparameters as keywords."""
    from regoptim.hyper import AdamHyper

    fn(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, AdamHyper(**hyper),
       grad_scale=grad_scale, found_inf=found_inf)  # fmt: skip

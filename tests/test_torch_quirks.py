"""Pins the torch behaviour that regoptim's dispatch works around, so a torch upgrade that fixes
it shows up here (the test then fails, and the workaround in regoptim.optimizer can go)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_torch_fused_cpu_sgd_is_wrong_for_low_precision(dtype):
    g = torch.Generator().manual_seed(0)
    p = torch.randn(100, generator=g).to(dtype).requires_grad_()
    q = p.detach().clone().requires_grad_()
    p.grad = torch.randn(100, generator=g).to(dtype)
    q.grad = p.grad.clone()
    torch.optim.SGD([p], lr=0.1, fused=True).step()
    torch.optim.SGD([q], lr=0.1, foreach=False).step()
    # the for-loop is within one bfloat16/float16 rounding of the exact step; fused is not
    exact = p.detach().double() * 0 + (q.detach().double())
    assert (q.detach().double() - exact).abs().max() == 0
    assert (p.detach().double() - q.detach().double()).abs().max() > 0.05


def test_regoptim_default_avoids_torch_fused_for_low_precision():
    from regoptim.backends.cpu.build import prebuilt_path
    from regoptim.optimizer import resolve_impl

    # float32 takes regoptim's own kernel where the install built it (test_default_cpu_path.py)
    f32 = "fused" if prebuilt_path() is not None else "torch_fused"
    for dtype, expected in [
        (torch.float32, f32),
        (torch.float64, "torch_fused"),
        (torch.bfloat16, "loop"),
        (torch.float16, "loop"),
    ]:
        p = torch.zeros(4, dtype=dtype)
        assert resolve_impl([p], [p], foreach=None, fused=None) == expected


def test_torch_fused_cpu_ignores_stride_mismatch():
    base = torch.randn(6, 4)
    p = base.t().detach().requires_grad_()
    q = p.detach().contiguous().requires_grad_()
    p.grad = torch.randn(4, 6)
    q.grad = p.grad.clone()
    torch.optim.SGD([p], lr=0.1, fused=True).step()
    torch.optim.SGD([q], lr=0.1, foreach=False).step()
    assert (p - q).abs().max() > 0.05


def test_regoptim_default_avoids_torch_fused_on_stride_mismatch():
    from regoptim.optimizer import resolve_impl

    p = torch.zeros(6, 4, dtype=torch.float64).t()
    assert resolve_impl([p], [torch.zeros(4, 6)], foreach=None, fused=None) == "loop"
    same = torch.zeros(6, 4, dtype=torch.float64).t()
    assert resolve_impl([p], [same], foreach=None, fused=None) == "torch_fused"

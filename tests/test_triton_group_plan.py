"""The group-lasso Triton kernels' launches and layouts: one launch per param group and step
whatever the number of tensors, int64 indexing, tensors addressed in their memory order or
through copies, validation, and the compiled variants built for sm_90 (no GPU needed).

The reference comparisons and their drivers are in tests/test_triton_group.py.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("triton")

from regoptim._kernels import fused_group_adam_, fused_group_sgd_  # noqa: E402
from test_triton_group import (  # noqa: E402
    DEVICES,
    LAYOUTS,
    _adam_state,
    _assert_zero_groups,
    run_adam,
    run_sgd,
)
from tolerances import assert_close_to_ref  # noqa: E402

from regoptim.hyper import AdamHyper, GroupLasso, SgdHyper  # noqa: E402
from regoptim.reference import (  # noqa: E402
    adam_denominator_ref,
    adam_step,
    group_prox_ref,
    sgd_step,
)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    return request.param


# ------------------------------------------------------------------------------------------------
# one launch per param group and step, whatever the number of tensors
# ------------------------------------------------------------------------------------------------


def _record_launches(monkeypatch: pytest.MonkeyPatch, device: str) -> list[tuple[str, int]]:
    """(kernel, grid) of every launch of regoptim's Triton kernels (``kernel[grid]``)."""
    from regoptim._kernels import _adam, _group_adam, _group_sgd, _sgd

    kernels = {
        "sgd": _sgd._prox_sgd_kernel.for_device(device),
        "adam": _adam._prox_adam_kernel.for_device(device),
        "group_sgd": _group_sgd._group_sgd_kernel.for_device(device),
        "group_adam": _group_adam._group_adam_kernel.for_device(device),
    }
    launches: list[tuple[str, int]] = []
    for cls in {type(k) for k in kernels.values()}:
        original = cls.__getitem__

        def getitem(self: Any, grid: Any, original: Any = original) -> Any:
            launches.extend((name, grid[0]) for name, k in kernels.items() if self is k)
            return original(self, grid)

        monkeypatch.setattr(cls, "__getitem__", getitem)
    return launches


@pytest.mark.parametrize("n_tensors", [2, 20])
def test_one_launch_per_step_whatever_the_tensors(device, monkeypatch, n_tensors):
    """2 or 20 tensors (every one a part of each of the 4 groups): one launch per step, grid 4,
    and nothing else launched; the results are the reference's."""
    layout = ([(4, 3)] * (n_tensors - 1) + [(4,)], [0] * n_tensors)
    launches = _record_launches(monkeypatch, device)
    run_sgd(layout, torch.float32, device, steps=2, momentum=0.9, l1=0.05)
    assert launches == [("group_sgd", 4)] * 2
    launches.clear()
    run_adam(layout, torch.float32, device, steps=2, weight_decay=0.1, l1=0.5)
    assert launches == [("group_adam", 4)] * 2


def test_int64_group_indexing(device, monkeypatch):
    """The WIDE variant (int64 indices, for a part of a group of 2**31 elements or more) is
    forced on small tensors: same results."""
    from regoptim._kernels import _group, _group_adam, _group_sgd

    monkeypatch.setattr(_group, "WIDE_FROM", 0)
    seen: list[bool] = []
    for dual in (_group_sgd._group_sgd_kernel, _group_adam._group_adam_kernel):
        kernel = dual.for_device(device)
        if hasattr(kernel, "add_pre_run_hook"):  # the interpreter: read the launch's flag

            def hook(*args: Any, **kwargs: Any) -> None:
                seen.append(kwargs["WIDE"])

            kernel.add_pre_run_hook(hook)
            monkeypatch.setattr(kernel, "pre_run_hooks", kernel.pre_run_hooks[:-1])
            kernel.pre_run_hooks.append(hook)
    run_sgd("conv_in_channels+bn", torch.float32, device, steps=2, momentum=0.9, l1=0.05)
    run_adam("conv_in_channels+bn", torch.float32, device, steps=2, amsgrad=True, l1=0.5)
    assert device != "cpu" or seen == [True] * 4


# ------------------------------------------------------------------------------------------------
# layouts: dense in another order (no copy), strided (copies, written back); validation
# ------------------------------------------------------------------------------------------------


def _layout_params(device: str) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    g = torch.Generator().manual_seed(3)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    cl = rnd(6, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    cl_grad = rnd(6, 3, 2, 2).contiguous(memory_format=torch.channels_last)
    params = [cl, rnd(5, 6).t(), rnd(6, 10)[:, ::2], rnd(6), rnd(6, 4).t()]
    grads = [cl_grad, rnd(5, 6).t(), rnd(6, 5), rnd(12)[::2], rnd(6, 4).t()]
    axes = [0, 0, 0, 0, 1]
    for t, a in zip(params + grads, axes + axes, strict=True):
        t.select(a, 1).mul_(1e-2)  # group 1 ends exactly zero
    return params, grads, axes


def test_layouts_in_place_or_through_copies(device):
    from regoptim._kernels import _group

    params, grads, axes = _layout_params(device)
    plan = _group.group_plan([params, grads], [True, False], axes, 6, torch.device(device))
    assert plan is not None
    # channels_last and transposed tensors are addressed in their memory order: only the strided
    # param is copied (and written back), and the strided grad (not written back)
    assert [id(o) for o, _ in plan.writeback] == [id(params[2])]
    outers, inners = plan.outers.tolist()[:5], plan.inners.tolist()[:5]
    assert list(zip(outers, inners, strict=True)) == [(1, 12), (5, 1), (1, 5), (1, 1), (1, 4)]
    storages = [p.data_ptr() for p in params]
    base = params[2]._base
    ref = [p.double().cpu() for p in params]
    ref_state: list[dict[str, Any]] = [{} for _ in params]
    bufs = [torch.empty_like(p) for p in params]
    rec = SgdHyper(0.1, 0.1, 0.9, 0.0, True, False, False, 0.05)
    for step in range(2):
        fused_group_sgd_(params, grads, bufs, rec, GroupLasso(2.0, tuple(axes)),
                         is_first_step=step == 0, grad_scale=None, found_inf=None)  # fmt: skip
        ref = [
            sgd_step(r, gr.cpu(), s, lr=0.1, weight_decay=0.1, momentum=0.9, nesterov=True, l1=0.05)
            for r, gr, s in zip(ref, grads, ref_state, strict=True)
        ]
        ref = group_prox_ref(ref, axes, lr=0.1, group_l1=2.0)
    assert [p.data_ptr() for p in params] == storages
    assert torch.equal(base[:, ::2], params[2])  # written into the base of the strided view
    for i, p in enumerate(params):
        assert_close_to_ref(p.cpu(), ref[i], torch.float32)
        assert_close_to_ref(bufs[i].cpu(), ref_state[i]["momentum_buffer"], torch.float32)
    _assert_zero_groups(params, axes, torch.arange(6) == 1)

    params, grads, axes = _layout_params(device)
    ref = [p.double().cpu() for p in params]
    ref_state = [{} for _ in params]
    state = _adam_state(params, True)
    rec_a = AdamHyper(0.01, 0.9, 0.999, 1e-8, 0.1, True, True, False, 0.5)
    for _ in range(2):
        fused_group_adam_(params, grads, **state, hyper=rec_a, lasso=GroupLasso(20.0, tuple(axes)),
                          grad_scale=None, found_inf=None)  # fmt: skip
        ref = [
            adam_step(r, gr.cpu(), s, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True,
                      amsgrad=True, l1=0.5)
            for r, gr, s in zip(ref, grads, ref_state, strict=True)
        ]  # fmt: skip
        ds = [
            adam_denominator_ref(s, betas=(0.9, 0.999), eps=1e-8, amsgrad=True) for s in ref_state
        ]
        ref = group_prox_ref(ref, axes, lr=0.01, group_l1=20.0, denominators=ds)
    for i, p in enumerate(params):
        assert_close_to_ref(p.cpu(), ref[i], torch.float32)
    _assert_zero_groups(params, axes, torch.arange(6) == 1)


def _sgd_call(params, grads, axes, bufs=None, momentum=0.0):
    rec = SgdHyper(0.1, 0.0, momentum, 0.0, False, False, False, 0.0)
    fused_group_sgd_(params, grads, bufs, rec, GroupLasso(1.0, tuple(axes)), is_first_step=True,
                     grad_scale=None, found_inf=None)  # fmt: skip


def test_invalid_inputs_raise_naming_the_parameter(device):
    def t(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(shape, dtype=dtype, device=device)

    with pytest.raises(ValueError, match="parameter 1 has 5 slices along axis 0, parameter 0 4"):
        _sgd_call([t(4, 3), t(5)], [t(4, 3), t(5)], [0, 0])
    with pytest.raises(ValueError, match="2 group axes for 1 parameters"):
        _sgd_call([t(4, 3)], [t(4, 3)], [0, 1])
    with pytest.raises(ValueError, match="group axis 2 of parameter 0"):
        _sgd_call([t(4, 3)], [t(4, 3)], [2])
    with pytest.raises(ValueError, match="grad of parameter 1 has 3 elements"):
        _sgd_call([t(4, 3), t(4)], [t(4, 3), t(3)], [0, 0])
    with pytest.raises(TypeError, match="parameter 0 is torch.complex64"):
        c = t(4, 3, dtype=torch.complex64)
        _sgd_call([c], [c.clone()], [0])
    with pytest.raises(TypeError, match="not torch.float64"):
        _sgd_call([t(4, 3, dtype=torch.float64)], [t(4, 3, dtype=torch.float64)], [0])
    with pytest.raises(ValueError, match="momentum_buffers must be given"):
        _sgd_call([t(4, 3)], [t(4, 3)], [0], momentum=0.9)


def test_empty_and_groupless(device):
    """No groups (size 0 along the axis) or empty tensors: nothing launched, Adam still counts."""
    p = [torch.zeros(0, 3, device=device), torch.zeros(0, device=device)]
    _sgd_call(p, [x.clone() for x in p], [0, 0])
    params = [torch.ones(3, 0, device=device), torch.ones(3, device=device)]
    grads = [torch.ones_like(x) for x in params]
    state = _adam_state(params, False)
    rec = AdamHyper(0.01, 0.9, 0.999, 1e-8, 0.0, False, False, False, 0.0)
    fused_group_adam_(params, grads, **state, hyper=rec, lasso=GroupLasso(1e-3, (0, 0)),
                      grad_scale=None, found_inf=None)  # fmt: skip
    assert [s.item() for s in state["state_steps"]] == [1.0, 1.0]
    # one Adam step moves each entry by lr: 1 - 0.01, then the (weak) group prox
    assert torch.allclose(params[1], torch.full_like(params[1], 0.99), atol=1e-3)
    assert (params[1] < 0.99).all()


# ------------------------------------------------------------------------------------------------
# the compiled variant: the exact launches made on CPU compile to a cubin for an H100 (sm_90)
# ------------------------------------------------------------------------------------------------


def _compile_step(family: str, dtype: torch.dtype, flags: dict[str, Any]) -> Any:
    shapes, axes = LAYOUTS["conv_in_channels+bn"]
    lasso = GroupLasso(2.0, tuple(axes))

    def step() -> None:
        params = [torch.randn(s).to(dtype) for s in shapes]
        grads = [torch.randn_like(p) for p in params]
        amp = dict(grad_scale=torch.tensor(2.0), found_inf=torch.tensor(0.0))
        if not flags.get("amp", True):
            amp = dict(grad_scale=None, found_inf=None)
        lr = torch.tensor(0.1) if flags.get("lr_tensor", True) else 0.1
        if family == "sgd":
            rec = SgdHyper(lr, 0.1, 0.9, 0.0, True, True, flags.get("decoupled", False), 0.05)
            bufs = [torch.zeros_like(p) for p in params]
            fused_group_sgd_(params, grads, bufs, rec, lasso, is_first_step=False, **amp)
        else:
            ams = flags.get("amsgrad", True)
            rec = AdamHyper(
                lr, 0.9, 0.999, 1e-8, 0.1, flags.get("decoupled", False), ams, True, 0.5
            )
            fused_group_adam_(params, grads, **_adam_state(params, ams), hyper=rec, lasso=lasso,
                              **amp)  # fmt: skip

    return step


COMPILE_CASES = {
    "sgd-all-bf16": ("sgd", torch.bfloat16, {}),
    "sgd-decoupled-fp32-wide": ("sgd", torch.float32, {"decoupled": True, "wide": True}),
    "adam-amsgrad-all-fp16": ("adam", torch.float16, {}),
    "adamw-fp32-noamp": (
        "adam", torch.float32, {"amsgrad": False, "decoupled": True, "amp": False,
                                "lr_tensor": False},
    ),
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("case", COMPILE_CASES.values(), ids=COMPILE_CASES.keys())
def test_compiled_variant_builds_for_sm90(case, monkeypatch):
    """Without a GPU: Triton's NVIDIA backend lowers the real launch (loops over the tensor
    table, the Newton while-loop, the reductions) to PTX and a cubin, after interpreted runs in
    this process (which must leave triton.language unpatched)."""
    from test_kernels import _capture_launch, _compile_for_sm90, _ptxas_missing

    if _ptxas_missing() is not None:
        pytest.skip(str(_ptxas_missing()))
    from regoptim._kernels import _group, _group_adam, _group_sgd

    family, dtype, flags = case
    if flags.get("wide"):
        monkeypatch.setattr(_group, "WIDE_FROM", 0)
    dual = _group_sgd._group_sgd_kernel if family == "sgd" else _group_adam._group_adam_kernel
    args, kwargs = _capture_launch(dual, _compile_step(family, dtype, flags))
    assert kwargs["WIDE"] == bool(flags.get("wide"))
    compiled = _compile_for_sm90(dual, args, kwargs)
    assert compiled.asm["cubin"]
    ptx = compiled.asm["ptx"]
    assert ".target sm_90" in ptx
    assert "local" not in ptx.split(".entry", 1)[1]  # no spills to local memory
    # the per-element group index division is 32-bit unless WIDE
    assert ("div.s64" in ptx or "__divdi3" in ptx) == bool(flags.get("wide")), ptx.count("div.")

"""Bad input: a clear exception naming the argument and the value, before any update."""

from __future__ import annotations

import pytest
import torch
from registry import OPTIMIZERS

ERROR_CASES = [
    pytest.param(info, kwargs, exc, match, id=f"{info.name}-{'-'.join(kwargs)}-{i}")
    for info in OPTIMIZERS
    for i, (kwargs, exc, match) in enumerate(info.error_inputs)
]


@pytest.mark.parametrize(("info", "kwargs", "exc", "match"), ERROR_CASES)
def test_constructor_rejects(info, kwargs, exc, match):
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(exc, match=match):
        info.cls([p], **kwargs)


@pytest.mark.parametrize(("info", "kwargs", "exc", "match"), ERROR_CASES)
def test_param_group_rejects(info, kwargs, exc, match):
    """A group's own values are validated too, and a rejected group is not added."""
    if "l2" in kwargs:
        pytest.skip("unknown keys in a group dict are kept, as torch.optim does")
    p, q = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt = info.cls([p])
    with pytest.raises(exc, match=match):
        opt.add_param_group({"params": [q], **kwargs})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
@pytest.mark.parametrize(
    ("key", "value", "match"),
    [("l1", -0.1, r"l1 value: -0\.1"), ("lr", float("nan"), "learning rate: nan"),
     ("weight_decay", float("inf"), "weight_decay value: inf")],
)  # fmt: skip
def test_value_changed_between_steps_is_checked_before_the_update(info, key, value, match):
    p = torch.nn.Parameter(torch.ones(3))
    opt = info.cls([p], lr=0.1)
    p.grad = torch.ones(3)
    opt.step()
    before = p.detach().clone()
    state_before = {k: torch.as_tensor(v).clone() for k, v in opt.state[p].items()}
    opt.param_groups[0][key] = value
    with pytest.raises(ValueError, match=match):
        opt.step()
    assert torch.equal(p, before)
    for k, v in state_before.items():
        assert torch.equal(torch.as_tensor(opt.state[p][k]), v)


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_fused_with_meta_params_builds_and_steps_after_to_empty(info):
    """As torch: the device is checked at step time, so the optimizer can be built before
    ``model.to_empty(device=...)`` moves a meta-device model onto a real device (swapping the
    tensors in place, so the optimizer's parameters are the model's)."""
    model = torch.nn.Linear(3, 2, device="meta")
    opt = info.cls(model.parameters(), lr=0.1, fused=True)
    swap = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap)
    assert opt.param_groups[0]["params"][0] is model.weight
    torch.nn.init.ones_(model.weight)
    torch.nn.init.zeros_(model.bias)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    assert not torch.equal(model.weight, torch.ones(2, 3))


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_fused_on_unsupported_device_says_what_it_needs_at_step(info):
    p = torch.nn.Parameter(torch.ones(3, device="meta"))
    opt = info.cls([p], fused=True)
    p.grad = torch.ones(3, device="meta")
    with pytest.raises(RuntimeError, match="fused=True supports CUDA tensors"):
        opt.step()


@pytest.mark.parametrize("info", OPTIMIZERS, ids=lambda i: i.name)
def test_fused_rejects_integer_params_at_step(info):
    p = torch.ones(3, dtype=torch.int64)
    opt = info.cls([p], fused=True)
    p.grad = torch.ones(3, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="floating point"):
        opt.step()
    assert torch.equal(p, torch.ones(3, dtype=torch.int64))


def test_sparse_gradients_rejected_by_adam_with_clear_message():
    import regoptim

    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = regoptim.ProxAdam(emb.parameters(), l1=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()

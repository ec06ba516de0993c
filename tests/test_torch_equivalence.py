"""With regularization off, each optimizer equals its torch.optim counterpart bit for bit.

Trained side by side on a real small model (an MLP on scikit-learn's digits, minibatches), for
every combination of the shared hyperparameters, with a float and a tensor lr, on every path:
for-loop and foreach against torch's for-loop and foreach, the default path against torch's fused
CPU kernel it builds on (and within float32 rounding of torch's default for-loop).
"""

from __future__ import annotations

import pytest
import torch
from registry import cases

# regoptim implementation -> torch implementation it must equal bit for bit
PAIRS = {
    "loop": ({"foreach": False}, {"foreach": False}),
    "foreach": ({"foreach": True}, {"foreach": True}),
    "default": ({}, {"fused": True}),
}


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    return x[:320], torch.tensor(y[:320])


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.Tanh(), torch.nn.Linear(24, 10))


def _train(model, opt, digits, steps=20, batch=32):
    x, y = digits
    for s in range(steps):
        i = (s * batch) % len(x)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x[i : i + batch]), y[i : i + batch])
        loss.backward()
        opt.step()


@pytest.mark.parametrize("tensor_lr", [False, True], ids=["float_lr", "tensor_lr"])
@pytest.mark.parametrize("impl", list(PAIRS))
@pytest.mark.parametrize(("info", "config"), cases("torch_configs"))
def test_equals_torch_optim(info, config, impl, tensor_lr, digits):
    ours_kw, theirs_kw = PAIRS[impl]
    cfg = dict(config)
    if tensor_lr:
        cfg["lr"] = torch.tensor(cfg["lr"])
        if info.name != "ProxSGD" and impl == "foreach":
            # torch.optim.Adam rejects this combination; so does regoptim, with the same type
            with pytest.raises(ValueError):
                info.torch_cls(_model(0).parameters(), **cfg, **theirs_kw)
            with pytest.raises(ValueError, match="lr"):
                info.cls(_model(0).parameters(), **cfg, **ours_kw)
            return
    ours, theirs = _model(0), _model(0)
    opt_ours = info.cls(ours.parameters(), **cfg, **ours_kw)
    opt_theirs = info.torch_cls(theirs.parameters(), **cfg, **theirs_kw)
    _train(ours, opt_ours, digits)
    _train(theirs, opt_theirs, digits)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        sa, sb = opt_ours.state[a], opt_theirs.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            assert torch.equal(torch.as_tensor(sa[key]), torch.as_tensor(sb[key])), key


@pytest.mark.parametrize(("info", "config"), cases("torch_configs")[:4])
def test_default_path_is_within_rounding_of_torch_default(info, config, digits):
    ours, theirs = _model(0), _model(0)
    _train(ours, info.cls(ours.parameters(), **config), digits)
    _train(theirs, info.torch_cls(theirs.parameters(), **config), digits)
    for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

"""The torch paths against the float64 reference: every flag combination, every dtype.

Each step is checked from the optimizer's current parameters and state (converted to float64),
so low-precision rounding does not accumulate into the comparison; a float32 trajectory test
checks that nothing drifts over many steps.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import IMPLS, make_params, ref_state, set_grads
from registry import ADAM, SGD, cases
from tolerances import assert_close_to_ref

from regoptim import reference

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("info", "config"), cases("configs"))
def test_step_matches_reference(info, config, dtype, impl):
    params = make_params(dtype)
    opt = info.cls(params, **config, **IMPLS[impl])
    ref_kwargs = info.ref_kwargs(config)
    for step in range(3):
        grads = set_grads(params, step)
        expected, expected_states = [], []
        for p, g in zip(params, grads, strict=True):
            st = ref_state(opt.state[p])
            expected.append(info.ref(p, g, st, **ref_kwargs))
            expected_states.append(st)
        opt.step()
        for p, e, st in zip(params, expected, expected_states, strict=True):
            assert_close_to_ref(p, e, dtype)
            for key, value in st.items():
                if isinstance(value, torch.Tensor):
                    assert_close_to_ref(opt.state[p][key], value, dtype)
                else:
                    assert int(float(opt.state[p][key])) == value


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize(
    ("info", "config"),
    [
        pytest.param(SGD, dict(lr=0.05, momentum=0.9, weight_decay=0.01, l1=0.5), id="sgd-l1"),
        pytest.param(
            SGD,
            dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.1, decoupled_weight_decay=True, l1=0.5),
            id="sgd-nesterov-decoupled-l1",
        ),
        pytest.param(ADAM, dict(lr=0.01, weight_decay=0.01, l1=1.0, amsgrad=True), id="adam-amsgrad-l1"),
        pytest.param(ADAM, dict(lr=0.01, weight_decay=0.1, decoupled_weight_decay=True, l1=1.0), id="adamw-l1"),
    ],
)  # fmt: skip
def test_float32_trajectory_matches_reference(info, config, impl):
    """40 steps from the same start: the float32 path stays on the float64 trajectory."""
    params = make_params(torch.float32, shapes=[(20, 10), (10,)])
    with torch.no_grad():
        for p in params:
            p.mul_(0.3)  # small weights, so the prox zeroes a good part of them
    ref_params = [p.detach().double().clone() for p in params]
    ref_states: list[dict] = [{} for _ in params]
    opt = info.cls(params, **config, **IMPLS[impl])
    for step in range(40):
        grads = set_grads(params, step)
        for i, g in enumerate(grads):
            ref_params[i] = info.ref(ref_params[i], g, ref_states[i], **info.ref_kwargs(config))
        opt.step()
    for p, e in zip(params, ref_params, strict=True):
        torch.testing.assert_close(p.double(), e, rtol=1e-4, atol=1e-5)
    zeros = sum(int((p == 0).sum()) for p in params)
    ref_zeros = sum(int((e == 0).sum()) for e in ref_params)
    assert zeros > 0 and abs(zeros - ref_zeros) <= 2, (zeros, ref_zeros)


def test_reference_is_float64():
    p = torch.randn(3, dtype=torch.float32)
    out = reference.sgd_step(p, torch.ones(3), {}, lr=0.1)
    assert out.dtype == torch.float64

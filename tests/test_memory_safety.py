"""Malformed tensors handed to a step never crash or corrupt memory (issue 10).

Each case ends in a clear exception naming the parameter index and what is wrong, or in the
values torch's for-loop computes from the same state. Cases that crashed the process (out-of-bounds
reads/writes in a kernel) run in a worker process (``_memory_safety_worker.py``), so a segfault
fails the test instead of killing pytest; the others run here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tolerances import TOL

from regoptim import ProxSGD
from regoptim.backends.cpu import kernel as cf

WORKER = Path(__file__).with_name("_memory_safety_worker.py")
PATHS = ["loop", "foreach", "default", "fused_cpp", "fused_triton"]
STATE_KEYS = {
    "sgd": ["momentum_buffer"],
    "adam": ["exp_avg", "exp_avg_sq", "step"],
    "adamw": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step"],
}
TENSOR_KINDS = ["short", "long", "reshaped", "bfloat16", "float64", "int32", "meta"]
TENSOR_KINDS += ["transposed", "strided", "missing"]
STEP_KINDS = ["nan_step", "neg_step", "missing", "float64"]

needs_cpp = pytest.mark.skipif(cf.available() is not None, reason=str(cf.available()))


def run_worker(cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [sys.executable, str(WORKER)],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},
    )
    assert proc.returncode == 0, f"worker died (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def assert_safe(case: dict[str, Any], out: dict[str, Any]) -> None:
    """A clear exception (ValueError, TypeError or RuntimeError, with a message), or the
    for-loop's values (within the tolerance of the lowest precision the state is stored in)."""
    if out["outcome"] == "exc":
        # (torch.optim.Adam's own KeyError for a missing moment is left as torch raises it)
        clear = out["clear"] or (out["type"] == "KeyError" and case["bad"] == "missing")
        assert clear and out["msg"], (case, out)
    else:
        assert out["equal"], (case, out)


def case(
    opt: str, path: str, bad: str, key: str, index: int = 1, via: str = "assign", warm: bool = True
) -> dict[str, Any]:
    """One worker case; ``warm``: the optimizer takes a step on its path (building its caches)
    before the state is malformed by assignment."""
    return {
        "opt": opt, "path": path, "bad": bad, "index": index, "key": key, "via": via,
        "warm": warm,
    }  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Regressions: one worker run for the cases that crashed or corrupted before


REGRESSIONS = [
    # 1. Triton: a state shorter than its param was read and written out of bounds
    case("sgd", "fused_triton", "short", "momentum_buffer"),
    case("adam", "fused_triton", "short", "exp_avg_sq"),
    case("adamw", "fused_triton", "short", "max_exp_avg_sq", via="load"),
    # 2. C++: a bfloat16 buffer on a float32 param at index >= 1 was written as float32; a
    # float64 state was read as float32 bytes
    case("sgd", "fused_cpp", "bfloat16", "momentum_buffer"),
    case("sgd", "fused_cpp", "float64", "momentum_buffer"),
    case("adamw", "fused_cpp", "bfloat16", "max_exp_avg_sq"),
    # torch's own fused CPU kernels (the default on CPU) read a short state out of bounds and a
    # transposed one in the param's layout
    case("sgd", "default", "short", "momentum_buffer"),
    case("adamw", "default", "short", "exp_avg"),
    case("adam", "default", "transposed", "exp_avg_sq", index=0),
    # a missing momentum buffer made its param take two steps (fused and default paths)
    case("sgd", "fused_cpp", "missing", "momentum_buffer"),
    case("sgd", "default", "missing", "momentum_buffer"),
]


@pytest.fixture(scope="module")
def regression_outcomes() -> list[dict[str, Any]]:
    return run_worker(REGRESSIONS)


@pytest.mark.parametrize("i", range(len(REGRESSIONS)), ids=lambda i: "-".join(
    str(v) for v in REGRESSIONS[i].values()))  # fmt: skip
def test_regression_case(i: int, regression_outcomes: list[dict[str, Any]]) -> None:
    c, out = REGRESSIONS[i], regression_outcomes[i]
    assert_safe(c, out)
    if c["bad"] == "short":  # no for-loop value to match: the error names index and numbers
        assert out["outcome"] == "exc" and f"{c['key']} of parameter 1 has " in out["msg"], out


# ---------------------------------------------------------------------------------------------
# The C++ kernel's cached table: keyed by every tensor's pointer, sizes, strides, dtype, bits


def _sgd(params: list[torch.Tensor], **kw: Any) -> ProxSGD:
    return ProxSGD(params, lr=0.1, weight_decay=0.01, l1=0.001, **kw)


def _twin_steps(rebind, momentum: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the same two steps (``rebind(p)`` between them) fused and on the for-loop; return
    both final storages (the whole underlying buffer, so writes outside the view show)."""
    out = []
    for kw in ({"fused": True}, {"foreach": False}):
        storage = torch.linspace(-1, 1, 40)
        p = torch.nn.Parameter(storage[:20].view(4, 5))
        opt = _sgd([p], momentum=momentum, **kw)
        p.grad = torch.full((40,), 0.5)[:20].view(4, 5)
        opt.step()
        rebind(p)
        opt.step()
        out.append(storage)
    return out[0], out[1]


def _shrink(p: torch.Tensor) -> None:  # same pointers, fewer elements
    p.data = p.data.view(-1)[:5]
    p.grad = p.grad.view(-1)[:5]


def _grow(p: torch.Tensor) -> None:  # same pointers, more elements
    p.data = torch.as_strided(p.data, (40,), (1,))
    p.grad = torch.as_strided(p.grad, (40,), (1,))


def _transpose(p: torch.Tensor) -> None:  # same pointer, other strides; a fresh grad
    p.data = p.data.t()
    p.grad = torch.arange(20.0).view(5, 4)


def _set(p: torch.Tensor) -> None:  # set_ onto a shorter window of the same storage
    with torch.no_grad():
        p.set_(p.untyped_storage(), 0, (2, 5))
    p.grad = p.grad.view(-1)[:10].view(2, 5)


@needs_cpp
@pytest.mark.parametrize("rebind", [_shrink, _grow, _transpose, _set], ids=lambda f: f.__name__)
def test_rebound_param_is_rechecked(rebind, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    fused, loop = _twin_steps(rebind)
    torch.testing.assert_close(fused, loop, **TOL[torch.float32])


@needs_cpp
@pytest.mark.parametrize("backend", ["0", "1"], ids=["cpp", "triton"])
def test_state_rebound_in_place_is_rechecked(backend: str, monkeypatch) -> None:
    """``buf.data = ...`` keeps the object and its pointer; the key sees the new numel."""
    monkeypatch.setenv("TRITON_INTERPRET", backend)
    ps = [torch.nn.Parameter(torch.randn(8)) for _ in range(2)]
    opt = _sgd(ps, momentum=0.9, fused=True)
    for p in ps:
        p.grad = torch.randn(8)
    opt.step()
    buf = opt.state[ps[1]]["momentum_buffer"]
    buf.data = buf.data[:3]
    with pytest.raises(ValueError, match="momentum_buffer of parameter 1 has 3 elements"):
        opt.step()


# ---------------------------------------------------------------------------------------------
# Gradients torch hands out that are not the param's dtype, or carry conj/neg bits


def _compare_paths(make_grads, dtype: torch.dtype = torch.float32, momentum: float = 0.9):
    results = []
    for kw in ({"fused": True}, {"foreach": False}):
        gen = torch.Generator().manual_seed(3)
        ps = [torch.nn.Parameter(torch.randn(7, generator=gen, dtype=dtype)) for _ in range(3)]
        opt = _sgd(ps, momentum=momentum, **kw)
        for step in range(3):
            make_grads(ps, step)
            opt.step()
        results.append([p.detach().clone() for p in ps])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])


@needs_cpp
@pytest.mark.parametrize("grad_dtype", [torch.float64, torch.bfloat16])
def test_grad_of_another_dtype_on_a_later_param(grad_dtype, monkeypatch) -> None:
    """``Parameter.grad_dtype`` gives such grads; the table refresh checked the first only."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")

    def grads(ps: list[torch.Tensor], step: int) -> None:
        gen = torch.Generator().manual_seed(10 + step)
        for i, p in enumerate(ps):
            g = torch.randn(7, generator=gen)
            if i == 2 and step > 0:  # a step after the table was built
                p.grad_dtype = None
                # inside a larger buffer: a kernel that reads it as float32 stays in bounds
                g = torch.empty(28, dtype=grad_dtype)[:7].copy_(g)
            p.grad = g

    _compare_paths(grads)


@needs_cpp
def test_conjugate_and_negative_grads_are_resolved(monkeypatch) -> None:
    """``(z.conj() * c).real.sum().backward()`` gives a conj-bit grad; ``.imag`` of a conj view
    a neg-bit one. The kernel read their raw memory."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    c = torch.randn(7, dtype=torch.complex64, generator=torch.Generator().manual_seed(4))

    def grads(ps: list[torch.Tensor], step: int) -> None:
        for p in ps:
            p.grad = None
        (ps[0].conj() * c).real.sum().backward()
        assert ps[0].grad.is_conj()
        ps[1].grad = c * (step + 1)
        ps[2].grad = c.conj().conj().clone().conj()
        assert ps[2].grad.is_conj()

    _compare_paths(grads, dtype=torch.complex64)

    def neg_grads(ps: list[torch.Tensor], step: int) -> None:
        for p in ps:
            p.grad = (c * (step + 1)).conj().imag
        assert ps[0].grad.is_neg()

    _compare_paths(neg_grads)


@needs_cpp
@pytest.mark.parametrize("backend", ["0", "1"], ids=["cpp", "triton"])
def test_error_names_the_index_in_the_step_not_in_a_dtype_group(backend: str, monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", backend)
    ps = [torch.nn.Parameter(torch.randn(4, dtype=torch.bfloat16))]
    ps += [torch.nn.Parameter(torch.randn(n)) for n in (5, 6)]
    opt = _sgd(ps, momentum=0.9, fused=True)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    # a view into a larger buffer: code that misses the check stays inside the allocation
    opt.state[ps[2]]["momentum_buffer"] = torch.zeros(8)[:2]
    with pytest.raises(ValueError, match="momentum_buffer of parameter 2 has 2 elements"):
        opt.step()


# ---------------------------------------------------------------------------------------------
# Property: any malformed state, any optimizer, any path


@st.composite
def malformed_cases(draw: st.DrawFn) -> dict[str, Any]:
    opt = draw(st.sampled_from(sorted(STATE_KEYS)))
    key = draw(st.sampled_from([*STATE_KEYS[opt], "extra"]))
    kinds = STEP_KINDS if key == "step" else TENSOR_KINDS
    return case(
        opt,
        draw(st.sampled_from(PATHS)),
        draw(st.sampled_from(kinds)),
        key,
        index=draw(st.integers(0, 2)),
        via=draw(st.sampled_from(["load", "assign"])),
        warm=draw(st.booleans()),
    )


@settings(max_examples=2, deadline=None, database=None)
@given(cases=st.lists(malformed_cases(), min_size=24, max_size=24))
def test_malformed_state_property(cases: list[dict[str, Any]]) -> None:
    for c, out in zip(cases, run_worker(cases), strict=True):
        assert_safe(c, out)


@pytest.mark.slow
def test_malformed_state_every_combination() -> None:
    cases = [
        case(opt, path, bad, key, index=1, via=via, warm=via == "assign")
        for opt, keys in STATE_KEYS.items()
        for key in keys
        for bad in (STEP_KINDS if key == "step" else TENSOR_KINDS)
        for path in PATHS[1:]
        for via in ("load", "assign")
    ]
    for c, out in zip(cases, run_worker(cases), strict=True):
        assert_safe(c, out)

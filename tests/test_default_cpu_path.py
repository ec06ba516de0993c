"""The default CPU path: regoptim's one-pass C++ kernel, built at install time (setup.py), chosen
per CPU at run time, with torch's paths as the fallback wherever it cannot serve a group."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import regoptim
from regoptim import reference as ref
from regoptim.backends.cpu import build as _cpu_build
from regoptim.backends.cpu.abi import declare
from regoptim.optimizer import resolve_impl
from tests.tolerances import assert_close_to_ref

ROOT = Path(__file__).resolve().parent.parent
installed = pytest.mark.skipif(
    _cpu_build.prebuilt_path() is None,
    reason="regoptim was installed without building the CPU kernel (no C++ compiler then)",
)


def _run(code: str, **env: str) -> str:
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr


@pytest.mark.skipif(_cpu_build._compiler() is None, reason="no C++ compiler: nothing was built")
def test_install_built_the_variant_for_this_cpu() -> None:
    assert _cpu_build.prebuilt_path() is not None, (
        f"no install-time build of variant {_cpu_build.prebuilt_variant()} next to "
        f"{_cpu_build.__file__}"
    )


@installed
def test_first_default_step_compiles_nothing() -> None:
    code = (
        "import time, torch, regoptim, regoptim.backends.cpu.build as b\n"
        "m = torch.nn.Linear(64, 64)\n"
        "opt = regoptim.ProxSGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, l1=1e-4)\n"
        "m(torch.randn(8, 64)).sum().backward()\n"
        "t = time.perf_counter(); opt.step(); dt = time.perf_counter() - t\n"
        "print(b.build_info()['source'], b.build_count(), f'{dt:.4f}')\n"
    )
    empty = str(ROOT / ".no-such-cache-dir")  # no JIT cache to fall back on
    source, builds, _ = _run(code, REGOPTIM_CACHE_DIR=empty, CXX="/nonexistent").split()[:3]
    assert (source, builds) == ("prebuilt", "0")


@installed
def test_variant_follows_torchs_capability() -> None:
    code = "import regoptim.backends.cpu.build as b; print(b.prebuilt_variant())"
    assert _run(code, ATEN_CPU_CAPABILITY="default").split()[-1] == "baseline"


def test_without_the_build_default_is_eager_with_one_warning() -> None:
    code = (
        "import warnings, torch, regoptim\n"
        "from regoptim.optimizer import resolve_impl\n"
        "warnings.simplefilter('always')\n"
        "ps = [torch.zeros(3)]\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    impls = {resolve_impl(ps, ps, foreach=None, fused=None) for _ in range(3)}\n"
        "print(sorted(impls), sum('not built' in str(x.message) for x in w))\n"
    )
    out = _run(code, REGOPTIM_NO_PREBUILT="1")
    assert "['torch_fused'] 1" in out


@installed
def test_installed_variants_compute_the_same() -> None:
    """Every variant this CPU can run gives bitwise the same step (the ISA changes speed, not
    results), with and without FMA mirroring."""
    runnable = {"baseline"} | {
        "AVX2": {"avx2"},
        "AVX512": {"avx2", "avx512"},
    }.get(torch.backends.cpu.get_cpu_capability(), set())
    libs = {}
    for variant in sorted(runnable):
        path = _cpu_build.prebuilt_path_for(variant)
        if path is not None:
            lib = _cpu_build._try_load(path)
            assert lib is not None, path
            declare(lib)
            libs[variant] = lib
    assert len(libs) >= 1
    g = torch.Generator().manual_seed(0)
    n = 4099
    p0, grad, buf0 = (torch.randn(n, generator=g) for _ in range(3))
    results = {}
    for variant, lib in libs.items():
        for flags in (16 | 4 | 8, 16 | 4 | 8 | 256):  # momentum, coupled wd, l1, (no FMA)
            p, b = p0.clone(), buf0.clone()
            tables = [torch.tensor([x]) for x in (n, p.data_ptr(), grad.data_ptr(), b.data_ptr())]
            rows = [t.data_ptr() for t in tables]
            rc = lib.regoptim_sgd(0, 1, *rows, 0.1, 1e-2, 0.9, 0.0, 1.0, 1e-3, 1.0, flags, 1, 8)
            assert rc == 0
            results.setdefault(flags, {})[variant] = (p, b)
    for by_variant in results.values():
        first = next(iter(by_variant.values()))
        for p, b in by_variant.values():
            assert torch.equal(p, first[0]) and torch.equal(b, first[1])


def _params(kind: str) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if kind == "float32":
        return [torch.randn(5, 7, generator=g), torch.randn(3, generator=g)]
    if kind == "float64":
        return [torch.randn(5, 7, generator=g, dtype=torch.float64)]
    if kind == "mixed":
        return [torch.randn(5, 7, generator=g), torch.randn(3, generator=g, dtype=torch.float64)]
    if kind == "bfloat16":
        return [torch.randn(5, 7, generator=g).bfloat16()]
    if kind == "complex64":
        return [torch.randn(4, generator=g, dtype=torch.complex64)]
    if kind == "channels_last":
        return [torch.randn(2, 3, 4, 5, generator=g).to(memory_format=torch.channels_last)]
    raise AssertionError(kind)


# what the default path picks on CPU, and it computes the reference's step
FALLBACKS = {
    "float32": "fused",
    "channels_last": "fused",  # a dense layout the kernel addresses in place
    "float64": "torch_fused",
    "mixed": "torch_fused",
    "bfloat16": "loop",  # torch 2.13's fused CPU kernels are wrong in bf16 (test_torch_quirks)
    "complex64": "loop",
}


@installed
@pytest.mark.parametrize("kind", list(FALLBACKS))
def test_default_path_choice_and_result(kind: str) -> None:
    params = [p.requires_grad_() for p in _params(kind)]
    g = torch.Generator().manual_seed(2)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype).to(
            memory_format=torch.channels_last
            if kind == "channels_last"
            else torch.contiguous_format
        )
    grads = [p.grad for p in params]
    assert resolve_impl(params, grads, foreach=None, fused=None) == FALLBACKS[kind]
    hp = {"lr": 0.1, "momentum": 0.9, "weight_decay": 1e-2, "l1": 0.05}
    expected = [ref.sgd_step(p, p.grad, {}, **hp) for p in params]
    regoptim.ProxSGD(params, **hp).step()
    for p, e in zip(params, expected, strict=True):
        assert_close_to_ref(p, e, p.dtype)


@installed
def test_grad_with_other_strides_falls_back() -> None:
    p = torch.randn(6, 4).requires_grad_()
    p.grad = torch.randn(4, 6).t()  # the same values, transposed memory
    assert resolve_impl([p], [p.grad], foreach=None, fused=None) == "loop"
    expected = ref.sgd_step(p, p.grad, {}, lr=0.1, l1=0.05)
    regoptim.ProxSGD([p], lr=0.1, l1=0.05).step()
    assert_close_to_ref(p, expected, torch.float32)

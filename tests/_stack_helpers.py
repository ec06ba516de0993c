"""Shared pieces of the "works in the real training stack" tests (issue 6).

A tiny deterministic model and data, the implementation paths regoptim runs on CPU, and a bounded
two-process launcher for the gloo tests (loopback only).
"""

from __future__ import annotations

import contextlib
import os
import socket
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import regoptim

# regoptim optimizer -> its torch.optim counterpart (equal to it with l1=0)
COUNTERPART: dict[type, type] = {
    regoptim.ProxSGD: torch.optim.SGD,
    regoptim.ProxAdam: torch.optim.Adam,
    regoptim.ProxAdamW: torch.optim.AdamW,
}


def fused_skip_reason(backend: str) -> str | None:
    """Why ``fused=True`` cannot run on CPU with ``backend`` ("cpu": the C++ kernel, "triton":
    the Triton kernels in Triton's interpreter), or None."""
    from regoptim.backends.dispatch import fused_unavailable_reason

    with fused_backend_env(backend):
        return fused_unavailable_reason("cpu")


@contextlib.contextmanager
def fused_backend_env(backend: str | None) -> Iterator[None]:
    """Select the backend ``fused=True`` uses for CPU tensors (chosen per call from the env)."""
    if backend is None:
        yield
        return
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if backend == "triton" else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


@contextlib.contextmanager
def on_path(path: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """``with on_path(path) as kwargs``: the optimizer kwargs of ``path``, its backend selected."""
    kwargs = {k: v for k, v in path.items() if k != "backend"}
    with fused_backend_env(path.get("backend")):
        yield kwargs


def _fused_param(backend: str) -> Any:
    reason = fused_skip_reason(backend)
    marks = (
        [pytest.mark.skip(reason=f"regoptim fused=True unavailable: {reason}")] if reason else []
    )
    return pytest.param({"fused": True, "backend": backend}, id=f"fused-{backend}", marks=marks)


# The paths regoptim runs on CPU: torch's for-loop, torch's foreach, the default (torch's fused
# CPU kernel plus regoptim's extra pass) and regoptim's own fused=True kernels: the C++ CPU kernel
# and the Triton kernels (interpreted on CPU; compiled on CUDA).
EAGER_PATHS = [
    pytest.param({"foreach": False}, id="loop"),
    pytest.param({"foreach": True}, id="foreach"),
    pytest.param({}, id="default"),
]
FUSED_PATHS = [_fused_param("cpu"), _fused_param("triton")]
ALL_PATHS = [*EAGER_PATHS, *FUSED_PATHS]


def torch_kwargs(path: dict[str, Any]) -> dict[str, Any]:
    """torch.optim flags that run the same torch code as regoptim's ``path`` (l1=0)."""
    if not path or path.get("fused"):
        return {"fused": True}
    return dict(path)


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def make_batches(
    n: int, batch: int = 8, seed: int = 1, dtype: torch.dtype = torch.float32
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 6, generator=g, dtype=dtype),
            torch.randn(batch, 3, generator=g, dtype=dtype),
        )
        for _ in range(n)
    ]


def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((model(x) - y) ** 2).mean()


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def assert_params_equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def assert_state_equal(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Two ``optimizer.state_dict()`` s hold the same state, tensor for tensor (bitwise)."""
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        sa, sb = a["state"][k], b["state"][k]
        assert sa.keys() == sb.keys(), (sa.keys(), sb.keys())
        for key in sa:
            va, vb = sa[key], sb[key]
            if isinstance(va, torch.Tensor):
                torch.testing.assert_close(va.cpu().double(), vb.cpu().double(), rtol=0, atol=0)
            else:
                assert va == vb


# --- two gloo processes on loopback, bounded in time ---------------------------------------------

WORLD = 2
SPAWN_TIMEOUT_S = 45.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(
    rank: int, fn: Callable[..., None], port: int, args: tuple[Any, ...], err_dir: str
) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            rank=rank,
            world_size=WORLD,
            timeout=__import__("datetime").timedelta(seconds=SPAWN_TIMEOUT_S),
        )
        try:
            fn(rank, *args)
        finally:
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(err_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise


def run_distributed(fn: Callable[..., None], *args: Any, tmp_path: Any) -> None:
    """Run ``fn(rank, *args)`` in 2 spawned processes joined by gloo on 127.0.0.1.

    Fails with the ranks' tracebacks if one raises, and kills both if they are not done within
    ``SPAWN_TIMEOUT_S`` seconds. ``fn`` must be a module-level function (picklable).
    """
    import time

    import torch.multiprocessing as mp

    err_dir = str(tmp_path)
    ctx = mp.start_processes(
        _entry,
        args=(fn, free_port(), args, err_dir),
        nprocs=WORLD,
        join=False,
        start_method="fork",  # the children inherit the imports: seconds instead of tens
    )
    deadline = time.monotonic() + SPAWN_TIMEOUT_S
    try:
        while not ctx.join(timeout=max(0.1, min(1.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                raise TimeoutError(f"distributed test did not finish in {SPAWN_TIMEOUT_S} s")
    except Exception as exc:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
        msgs = []
        for r in range(WORLD):
            path = os.path.join(err_dir, f"rank{r}.txt")
            if os.path.exists(path):
                with open(path) as f:
                    msgs.append(f"--- rank {r} ---\n{f.read()}")
        raise AssertionError(f"{exc}\n" + "\n".join(msgs)) from None


def skip_unless_torch_parity_verified() -> None:
    """Skip a multi-step bitwise comparison of regoptim's fused C++ kernel with torch's fused CPU
    kernels where regoptim promises one ulp per step, not bitwise (see regoptim.backends.cpu.capability);
    test_cpu_fused.py tests that bound step by step there."""
    import platform

    from regoptim.backends.cpu.capability import torch_kernel_numerics

    numerics = torch_kernel_numerics()
    if not numerics.verified:
        pytest.skip(
            f"bitwise parity with torch's fused CPU kernels is verified on x86-64 DEFAULT/AVX2/"
            f"AVX512, not on {platform.machine()} {numerics.capability} (one ulp per step there)"
        )

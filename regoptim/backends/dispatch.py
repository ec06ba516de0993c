"""Dispatch of ``fused=True`` steps to the backend that serves a (device, dtype) group.

* CUDA tensors, or CPU tensors while ``TRITON_INTERPRET=1``: the Triton kernels
  (``regoptim._kernels``).
* CPU tensors otherwise: the fused CPU kernel (``regoptim.backends.cpu.kernel``).

Both backends expose the same two functions with the signatures below, taking the family's
hyperparameter record (``regoptim.hyper``); the optimizers call :func:`fused_prox_sgd_` /
:func:`fused_prox_adam_` once per (device, dtype) group.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from regoptim.hyper import AdamHyper, SgdHyper

__all__ = [
    "call_fused",
    "fused_backend",
    "fused_prox_adam_",
    "fused_prox_sgd_",
    "fused_unavailable_reason",
]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and not _NATIVE_CPU.get()


# Set while the *default* path (no ``fused`` argument) runs a fused step: CPU tensors then take
# the compiled C++ kernel even under TRITON_INTERPRET=1, which only redirects an explicit
# ``fused=True`` (how the Triton kernels are validated without a GPU).
_NATIVE_CPU: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "regoptim_native_cpu", default=False
)


@contextlib.contextmanager
def _native_cpu_backend() -> Iterator[None]:
    """Within: CPU tensors take the C++ kernel whatever ``TRITON_INTERPRET`` says."""
    token = _NATIVE_CPU.set(True)
    try:
        yield
    finally:
        _NATIVE_CPU.reset(token)


def call_fused(call: Callable[[], None], *, default_path: bool) -> None:
    """Run ``call`` (a fused step); on the default path (no ``fused`` argument) CPU tensors take
    the C++ kernel even under ``TRITON_INTERPRET=1``. Never while compiling: the default path
    takes no fused CPU kernel then, and dynamo does not trace a ContextVar."""
    if default_path and not torch.compiler.is_compiling():
        with _native_cpu_backend():
            call()
    else:
        call()


def fused_backend(device_type: str) -> str:
    """Name of the backend ``fused=True`` uses for tensors on ``device_type``."""
    if device_type == "cuda" or (device_type == "cpu" and _interpreting()):
        return "triton"
    if device_type == "cpu":
        return "cpu"
    return "none"


def fused_unavailable_reason(device_type: str) -> str | None:
    """``None`` if ``fused=True`` can run on ``device_type``, else a message saying what it needs."""
    backend = fused_backend(device_type)
    if backend == "triton":
        try:
            from regoptim._kernels import available
        except ImportError as exc:  # pragma: no cover - depends on the install
            return f"fused=True on {device_type} needs the Triton kernels: {exc}"
        return available()
    if backend == "cpu":
        try:
            from regoptim.backends.cpu.kernel import available as cpu_available
        except ImportError as exc:
            return f"fused=True on CPU needs the fused CPU kernel: {exc}"
        return cpu_available()
    return (
        f"fused=True supports CUDA tensors (Triton) and CPU tensors, not device type "
        f"'{device_type}'; use fused=None"
    )


def fused_prox_sgd_(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor] | None,
    hyper: SgdHyper,
    *,
    is_first_step: bool,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One ProxSGD step for tensors of one device and dtype (see ``ProxSGD`` for the math).

    ``momentum_buffers`` is ``None`` when ``hyper.momentum == 0``; otherwise one buffer per
    parameter, freshly allocated (contents undefined) when ``is_first_step``. ``hyper.lr`` may be a
    1-element tensor on the params' device. ``grad_scale``/``found_inf`` follow torch's
    fused-optimizer protocol: the kernel divides the gradient by ``grad_scale`` and, where
    ``found_inf != 0``, leaves parameters and state untouched.
    """
    backend = _backend_module(params[0].device.type)
    backend.fused_prox_sgd_(
        params,
        grads,
        momentum_buffers,
        hyper,
        is_first_step=is_first_step,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


def fused_prox_adam_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    max_exp_avg_sqs: list[Tensor] | None,
    state_steps: list[Tensor],
    hyper: AdamHyper,
    *,
    grad_scale: Tensor | None,
    found_inf: Tensor | None,
) -> None:
    """One ProxAdam/ProxAdamW step for tensors of one device and dtype (see ``ProxAdam``).

    ``state_steps`` are float32 0-d tensors on the params' device, incremented here (not when
    ``found_inf`` is set). ``max_exp_avg_sqs`` is ``None`` unless ``hyper.amsgrad``.
    """
    backend = _backend_module(params[0].device.type)
    backend.fused_prox_adam_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        max_exp_avg_sqs,
        state_steps,
        hyper,
        grad_scale=grad_scale,
        found_inf=found_inf,
    )


def _backend_module(device_type: str):  # noqa: ANN202 - returns a module
    reason = fused_unavailable_reason(device_type)
    if reason is not None:
        raise RuntimeError(reason)
    if fused_backend(device_type) == "triton":
        import regoptim._kernels as mod
    else:
        import regoptim.backends.cpu.kernel as mod
    return mod

"""Shared base of regoptim's optimizers: validation helpers, implementation choice, AMP helpers.

The grouping of tensors by device and dtype is torch's own
(``Optimizer._group_tensors_by_device_and_dtype``); nothing here rewrites it.
"""

from __future__ import annotations

import functools
import math
import numbers
import operator
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = [
    "Impl",
    "on_device",
    "ProxOptimizer",
    "resolve_impl",
    "validate_betas",
    "validate_lr",
    "validate_non_negative",
]

Impl = Literal["loop", "foreach", "torch_fused", "fused"]


# --- validation helpers: one rule each, the message names the argument and the value -----------


def _is_number(value: object) -> bool:
    # numbers.Real covers Python ints/floats and numpy's scalars (np.float32(0.1)), as torch takes
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_range(value: float, label: str, name: str) -> None:
    # torch's rule and text for a negative value, regoptim's own for NaN and inf (torch lets some of
    # them through); both name the argument and the value
    if value < 0.0:
        raise ValueError(f"Invalid {label}: {value}")
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"Invalid {label}: {value} ({name} must be a finite number >= 0)")


def validate_non_negative(value: Any, name: str, label: str | None = None) -> None:
    """Raise unless ``value`` is a finite real number ``>= 0`` (numpy scalars included).

    ``label`` is the wording of torch's message for the same rule (``"epsilon value"`` for
    ``eps``); by default ``"{name} value"``, as torch says ``Invalid weight_decay value: -1``.
    """
    if isinstance(value, Tensor):
        raise TypeError(f"Invalid {name}: expected a float, got a Tensor ({value!r})")
    if not _is_number(value):
        raise TypeError(f"Invalid {name}: expected a float, got {type(value).__name__} ({value!r})")
    _check_range(value, label or f"{name} value", name)


def validate_lr(lr: Any, *, differentiable: bool = False) -> None:
    """A learning rate is a finite real ``>= 0`` or a 1-element tensor holding one.

    A tensor lr may require grad only with ``differentiable=True`` (the step is then part of the
    autograd graph; elsewhere it runs under ``no_grad`` and the flag would be a mistake).
    """
    if isinstance(lr, Tensor):
        if lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr.is_complex() or not lr.is_floating_point():
            raise ValueError(
                f"Invalid learning rate: a Tensor lr must be floating point, got {lr.dtype}"
            )
        if lr.requires_grad and not differentiable:
            raise ValueError(
                "Invalid learning rate: a Tensor lr may require grad only with differentiable=True"
            )
        # read the value only where that is free: not on CUDA (a sync), not while compiling
        if lr.device.type == "cpu" and not torch.compiler.is_compiling():
            _check_range(float(lr.detach()), "learning rate", "lr")
        return
    if not _is_number(lr):
        raise TypeError(
            f"Invalid learning rate: expected a float or Tensor, got {type(lr).__name__}"
        )
    _check_range(lr, "learning rate", "lr")


def validate_betas(betas: Any, *, capturable: bool = False, foreach: bool | None = None) -> None:
    """torch.optim.Adam's rules for ``betas``, in its order and with its messages.

    Two floats in [0, 1), or two 1-element tensors (then not with ``foreach=True`` unless
    ``capturable=True``). As torch, ints and numpy float32 scalars are not floats here.
    """
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: expected a pair of floats, got {betas!r}")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            if beta.numel() != 1 or beta.device.type != "cpu" or torch.compiler.is_compiling():
                # not read: torch's comparison fails on several elements (the 1-element rule
                # below says what is wrong) and would sync on a device
                continue
            value: Any = float(beta.detach())
        elif _is_number(beta):
            value = beta
        else:
            raise TypeError(
                f"Invalid beta parameter at index {i}: expected a float or Tensor, "
                f"got {type(beta).__name__} ({beta!r})"
            )
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
    if not (all(isinstance(b, float) for b in betas) or all(isinstance(b, Tensor) for b in betas)):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, Tensor):
            if foreach and not capturable:
                raise ValueError(
                    f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True"
                )
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")


def validate_flag(value: Any, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: expected a bool, got {value!r}")


def validate_optional_flag(value: Any, name: str) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"Invalid {name}: expected None or a bool, got {value!r}")


# --- implementation choice ----------------------------------------------------------------------


def _triton_fused_default_ok(params: list[Tensor]) -> bool:
    from regoptim.backends.dispatch import fused_unavailable_reason

    return fused_unavailable_reason("cuda") is None


# torch 2.13's fused CPU SGD is wrong for bfloat16/float16 tensors of 16 or more elements (off by
# up to 0.3 after one lr=0.1 step) and its fused CPU Adam overflows in float16; see
# tests/test_torch_quirks.py. The default path only builds on them for these dtypes, and only when
# every gradient has its parameter's strides (they walk both as flat memory; autograd's gradient
# layout contract makes that the usual case, a gradient assigned by hand may break it).
_TORCH_FUSED_CPU_DTYPES = (torch.float32, torch.float64)
_PLAIN_TENSOR_TYPES = {torch.Tensor, torch.nn.Parameter}
_TORCH_FUSED_CPU_DTYPE_SET = set(_TORCH_FUSED_CPU_DTYPES)
_DTYPE = operator.attrgetter("dtype")
_IS_CPU = operator.attrgetter("is_cpu")
_IS_CUDA = operator.attrgetter("is_cuda")
_IS_SPARSE = operator.attrgetter("is_sparse")
_STRIDE = torch._C.TensorBase.stride


def resolve_impl(
    params: list[Tensor],
    grads: list[Tensor],
    *,
    foreach: bool | None,
    fused: bool | None,
    torch_fused_ok: bool = True,
    differentiable: bool = False,
    capturable: bool = False,
    fused_ok: bool = True,
) -> Impl:
    """Pick the implementation of one step for one param group.

    ``fused=True`` -> regoptim's fused kernels (Triton on CUDA, the fused CPU kernel on CPU).
    ``foreach=True`` -> torch's foreach ops. Either flag given as ``False`` with the other ``None``
    -> what torch would do then (the for-loop). Both ``None``: regoptim's Triton kernels for CUDA
    tensors when triton imports; regoptim's fused C++ kernel for float32 CPU tensors when the
    install built it; torch's own fused CPU kernels plus the regularizers' extra pass for float64
    (and for float32 without that build); torch's default otherwise. Sparse gradients always take a
    for-loop/foreach path (the fused kernels are dense). With neither flag given,
    ``differentiable=True`` takes the for-loop (autograd through the step) and ``capturable=True``
    what torch picks (its capturable for-loop/foreach, which never reads the step on the host).
    ``fused_ok=False`` (a regularizer regoptim's fused kernels lack, as group lasso): neither flag
    given never picks regoptim's fused kernels (Triton, C++), only torch's paths.
    """
    compiling = torch.compiler.is_compiling()
    if any(g.is_sparse for g in grads) if compiling else any(map(_IS_SPARSE, grads)):
        return "foreach" if foreach else "loop"
    if fused:
        return "fused"
    if foreach:
        return "foreach"
    if foreach is not None or fused is not None:
        return "loop"
    if not params or differentiable:
        return "loop"
    if capturable:
        return _torch_default(params)
    if compiling:  # traced: Triton's custom ops on CUDA, else torch's choice (no fused CPU kernel)
        cuda = all(p.device.type == "cuda" for p in params)
        floating = all(p.is_floating_point() for p in params)
        plain = all(type(p) in _PLAIN_TENSOR_TYPES for p in params)
        if plain and floating and cuda and _triton_fused_default_ok(params):
            return "fused"
        return _torch_default(params)
    # column checks over the tensors (this runs every step): C-level maps, no Python loop body
    plain = set(map(type, params)) <= _PLAIN_TENSOR_TYPES
    dtypes = set(map(_DTYPE, params))
    floating = all(d.is_floating_point for d in dtypes)
    cpu = all(map(_IS_CPU, params))
    cuda = not cpu and all(map(_IS_CUDA, params))
    torch_fused_dtypes = dtypes <= _TORCH_FUSED_CPU_DTYPE_SET
    float32 = dtypes == {torch.float32}
    same_strides = list(map(_STRIDE, params)) == list(map(_STRIDE, grads))
    if fused_ok and plain and floating and cuda and _triton_fused_default_ok(params):
        return "fused"
    # plain tensors only: torch's fused SGD kernel has no DTensor (FSDP2) sharding strategy, and
    # under torch.compile torch runs its fused kernels outside dynamo (graph breaks)
    if torch_fused_ok and plain and cpu and torch_fused_dtypes and same_strides:
        # float32: regoptim's one-pass C++ kernel, built at install time (bitwise torch's fused
        # kernel when the regularizers are off); without that build, torch's fused kernel plus
        # the regularizers' extra pass
        if fused_ok and float32 and _cpu_kernel_installed():
            return "fused"
        return "torch_fused"
    return _torch_default(params)


def _torch_default(params: list[Tensor]) -> Impl:
    from torch.optim.optimizer import _default_to_fused_or_foreach

    _, use_foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    return "foreach" if use_foreach else "loop"


@functools.cache
def _cpu_kernel_installed() -> bool:
    """Whether the fused CPU kernel was built at install time for this CPU (checked once; warns
    once when it was not, since the default CPU path is then the slower eager one)."""
    from regoptim.backends.cpu.build import prebuilt_path

    if prebuilt_path() is not None:
        return True
    warnings.warn(
        "regoptim: the fused CPU kernel was not built when regoptim was installed (no C++ "
        "compiler then?), so the default CPU path is torch's fused kernel plus an extra pass for "
        "the regularizers. Reinstall with a C++ compiler on PATH for the one-pass kernel, or pass "
        "fused=True to compile it now (cached on disk).",
        RuntimeWarning,
        stacklevel=4,
    )
    return False


def on_device(value: Any, device: torch.device) -> Any:
    """``value`` on ``device`` if it is a tensor (lr, grad_scale, found_inf); floats and None as they are."""
    return value.to(device) if isinstance(value, Tensor) else value


# --- AMP on the eager paths ---------------------------------------------------------------------


def unscale_or_skip(
    grads: list[Tensor], grad_scale: Tensor | None, found_inf: Tensor | None
) -> bool:
    """For eager paths under ``fused=True`` + GradScaler: unscale ``grads`` in place.

    Returns True when the step must be skipped (``found_inf`` set). Reads ``found_inf`` on the host:
    only the eager fallback of a fused optimizer (sparse or complex tensors) comes here.
    """
    if found_inf is not None and bool(found_inf.item()):
        return True
    if grad_scale is not None:
        inv = grad_scale.double().reciprocal().item()
        for g in grads:
            g.mul_(inv)
    return False


# --- base class ----------------------------------------------------------------------------------


class ProxOptimizer(Optimizer):
    """Base of regoptim's optimizers: validates every param group's hyperparameters.

    Subclasses implement :meth:`_validate_group` with one rule per hyperparameter. Validation runs
    when a group is added (construction, ``add_param_group``) and again before each step, so a
    value set by hand between steps (an L1 ramp, a typo) is caught before it touches a parameter.
    """

    def __init__(self, params: Any, defaults: dict[str, Any]) -> None:
        self._validate_group(defaults)
        super().__init__(params, defaults)
        if defaults.get("fused"):  # (fused with foreach was rejected by _validate_group)
            # GradScaler hands grad_scale/found_inf to step() instead of syncing on the host.
            self._step_supports_amp_scaling = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group.get("decay_scaling") == "schedule" and "initial_lr" not in group:
            # the reference lr of decay_scaling="schedule" when no scheduler set one (torch's
            # schedulers keep it: they setdefault "initial_lr"; OneCycleLR sets its own)
            lr = group["lr"]
            group["initial_lr"] = lr.clone() if isinstance(lr, Tensor) else lr
        try:
            # devices and dtypes are checked at step time, as torch does: a model built on the
            # meta device and moved with ``to_empty`` after the optimizer was made is fine
            self._validate_group(self.param_groups[-1])
        except Exception:
            self.param_groups.pop()  # a rejected group leaves the optimizer as it was
            raise

    def _validate_group(self, group: dict[str, Any]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _step_groups(
        self, closure: Callable[[], Any] | None, step_group: Callable[..., None]
    ) -> Any:
        # torch's grad mode for a step: off, or on with ``differentiable=True`` (the step is then
        # part of the autograd graph). A context manager, not torch's decorator: that one breaks
        # the graph under torch.compile.
        with torch.set_grad_enabled(bool(self.defaults.get("differentiable", False))):
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            for group in self.param_groups:
                if not torch.compiler.is_compiling():
                    self._revalidate(group)
                step_group(group)
            return loss

    def _revalidate(self, group: dict[str, Any]) -> None:
        """Validate ``group`` again unless its hyperparameters are exactly those it last passed
        with (a value set by hand between steps is caught before it touches a parameter).
        Tensor values (a tensor lr a scheduler updates in place) are validated every step."""
        snapshot: list[tuple[str, Any]] | None = [(k, v) for k, v in group.items() if k != "params"]
        if any(_holds_tensor(v) for _, v in snapshot):  # type: ignore[union-attr]
            snapshot = None
        cache = self.__dict__.setdefault("_validated", {})
        if snapshot is not None and cache.get(id(group)) == snapshot:
            return
        self._validate_group(group)
        if snapshot is not None:
            cache[id(group)] = snapshot


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return any(isinstance(v, Tensor) for v in value)
    return isinstance(value, Tensor)


def check_fused_params(params: list[Tensor]) -> None:
    """Raise, at step time, if ``fused=True`` cannot update ``params`` (a dtype or a device).

    Torch checks here too (not at construction), so an optimizer built over meta-device parameters
    before ``model.to_empty(device=...)`` works.
    """
    if torch.compiler.is_compiling():
        return
    from regoptim.backends.dispatch import fused_unavailable_reason

    device_types = set()
    for p in params:
        if not (p.is_floating_point() or p.is_complex()):
            raise RuntimeError(f"`fused=True` requires floating point parameters, got {p.dtype}")
        device_types.add(p.device.type)
    for device_type in sorted(device_types):
        reason = fused_unavailable_reason(device_type)
        if reason is not None:
            raise RuntimeError(reason)


def group_tensors(tensorlists: list[list[Tensor | None]]) -> Iterable[tuple[Any, Any]]:
    """torch's device/dtype grouping (with indices), re-exported for the paths that need it."""
    grouped = Optimizer._group_tensors_by_device_and_dtype(tensorlists, with_indices=True)  # type: ignore[arg-type]
    return grouped.items()

r"""Differentiable L1 and L2 penalties, for when the regularizer belongs in the loss.

.. math::
    \text{l1\_penalty}(w) = \sum_i |w_i| \qquad
    \text{l2\_penalty}(w) = \tfrac12 \sum_i w_i^2

Both run one fused multi-tensor norm (``torch._foreach_norm``) per (device, dtype) bucket and one
final sum, instead of a Python loop of per-parameter reductions. Complex entries count by their
modulus.

**The exact equivalence.** :math:`\nabla\, \tfrac{wd}{2}\|w\|^2 = wd \cdot w`, so::

    loss = criterion(model(x), y) + wd * l2_penalty(params)
    torch.optim.SGD(params, lr, momentum, weight_decay=0.0)

takes exactly the same steps (up to floating-point rounding) as::

    loss = criterion(model(x), y)
    torch.optim.SGD(params, lr, momentum, weight_decay=wd)

and the same holds for any optimizer with *coupled* weight decay (``Adam``, ``ProxSGD``,
``ProxAdam`` with ``decoupled_weight_decay=False``). Decoupled decay (``AdamW``, ``ProxAdamW``,
``decoupled_weight_decay=True``) is *not* a loss term: it scales the weights outside the
gradient's momentum or adaptive metric.

**The double-regularization pitfall.** Do one *or* the other. Adding ``wd * l2_penalty`` to the
loss *and* passing ``weight_decay=wd`` regularizes twice (strength ``2 * wd`` for coupled decay).
Two more mistakes of the common recipe: ``torch.norm(w)`` (unsquared) is not weight decay, its
gradient ``w / ||w||`` has unit length whatever the size of ``w``; and the factor ``1/2`` matters,
``sum(w**2)`` is weight decay of strength ``2 * wd``.

**L1 in the loss never gives exact zeros.** A (sub)gradient step on ``l1 * l1_penalty`` moves each
weight by ``lr * l1`` towards zero and overshoots it: weights oscillate around 0 and almost none is
exactly 0. The proximal step of :class:`regoptim.ProxSGD` / :class:`regoptim.ProxAdamW`
(``l1=...``) sets them to exactly 0. Use :func:`l1_penalty` for monitoring or for objectives
that need it as a value.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

__all__ = ["l1_penalty", "l2_penalty"]

ParamsArg = Tensor | nn.Module | Iterable[Tensor]


def _as_tensors(params: ParamsArg, fn: str) -> list[Tensor]:
    if isinstance(params, Tensor):
        return [params]
    if isinstance(params, nn.Module):
        return list(params.parameters())
    if isinstance(params, dict):
        raise TypeError(
            f"{fn}: params must be tensors or a module, got a dict "
            "(for a param group pass group['params'])"
        )
    try:
        tensors = list(params)
    except TypeError:
        raise TypeError(
            f"{fn}: params must be a tensor, an iterable of tensors or an nn.Module, "
            f"got {type(params).__name__}"
        ) from None
    for t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: params must hold tensors, got {type(t).__name__}")
    return tensors


def _sum_of_norms(params: ParamsArg, ord: float, fn: str) -> Tensor:
    tensors = [t for t in _as_tensors(params, fn) if t.numel() > 0]
    if not tensors:
        return torch.zeros(())
    for t in tensors:
        if not (t.is_floating_point() or t.is_complex()):
            raise TypeError(f"{fn}: params must be floating point, got {t.dtype}")
    buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for t in tensors:
        buckets.setdefault((t.device, t.dtype), []).append(t)
    device = tensors[0].device
    # the result dtype: the parameters' common real dtype, at least float32
    dtype = torch.float32
    for t in tensors:
        real = t.real.dtype if t.is_complex() else t.dtype
        dtype = torch.promote_types(dtype, real)
    partial: list[Tensor] = []
    for bucket in buckets.values():
        norms = torch._foreach_norm(bucket, ord)
        stacked = torch.stack(norms).to(device=device, dtype=dtype)
        partial.append(stacked.square().sum() if ord == 2 else stacked.sum())
    return partial[0] if len(partial) == 1 else torch.stack(partial).sum()


def l1_penalty(params: ParamsArg) -> Tensor:
    r"""Return :math:`\sum_i |w_i|` over all entries of ``params``, differentiable.

    Its gradient is ``sign(w)`` (``0`` at ``w == 0``). Adding ``l1 * l1_penalty(params)`` to the
    loss is the common L1 recipe; it shrinks weights but never makes them exactly zero. For exact
    zeros use the ``l1=`` option of :class:`regoptim.ProxSGD` / :class:`regoptim.ProxAdamW`.

    Args:
        params: a tensor, an iterable of tensors (e.g. ``group["params"]``) or an ``nn.Module``
            (all its parameters, biases included: pass the weights only to match
            :func:`regoptim.param_groups`).

    Returns:
        A 0-d tensor in the parameters' common real dtype (at least float32), on the first
        parameter's device. ``0.`` for no parameters.
    """
    return _sum_of_norms(params, 1, "l1_penalty")


def l2_penalty(params: ParamsArg) -> Tensor:
    r"""Return :math:`\tfrac12 \sum_i w_i^2` over all entries of ``params``, differentiable.

    Its gradient is ``w``, so ``loss + wd * l2_penalty(params)`` is *exactly* coupled weight
    decay ``weight_decay=wd`` (see the module docstring). Never combine both: that is
    ``2 * wd``.

    Args:
        params: a tensor, an iterable of tensors or an ``nn.Module``.

    Returns:
        A 0-d tensor in the parameters' common real dtype (at least float32), on the first
        parameter's device. ``0.`` for no parameters.
    """
    return 0.5 * _sum_of_norms(params, 2, "l2_penalty")
